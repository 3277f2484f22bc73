"""Netron, the graph viewer, from any notebook front end: JupyterLab, the classic notebook, Colab.

Netron serves its viewer over HTTP from the kernel's machine. In a local Jupyter the browser
reaches that server directly (an IFrame); in Colab the kernel runs on a remote VM, so Colab's
output proxy embeds the port. Run headless (nbconvert, nbval, a script) or with KWS_NETRON=print,
nothing is started and only the command for a terminal is printed.
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kws_utils import config


def netron_command(path: str | Path) -> str:
    """The terminal command that opens ``path`` in Netron (the ``netron`` package installs it)."""
    return f"netron {shlex.quote(str(Path(path).resolve()))}"


def frontend() -> str:
    """Where this code runs: ``colab``, ``jupyter`` (an IPython kernel) or ``none``."""
    if "google.colab" in sys.modules:
        return "colab"
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return "jupyter" if shell is not None and hasattr(shell, "kernel") else "none"


_served: dict[str, tuple[str, int]] = {}   # the one server this module started, by role


@contextlib.contextmanager
def _quiet_netron() -> Iterator[None]:
    """Keep Netron's INFO lines ("Serving ...", "Stopping ...") out of the notebook's stderr."""
    root, netron_log = logging.getLogger(), logging.getLogger("netron.server")
    # netron configures the root logger (to stderr) when it has no handler: give it a silent one
    quiet, level = logging.NullHandler(), netron_log.level
    root.addHandler(quiet)
    netron_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        netron_log.setLevel(level)


def serve(path: str | Path) -> tuple[str, int]:
    """Serve ``path`` with Netron in the background (no browser); return (host, port).

    Re-running a notebook cell replaces the previous server instead of adding one per run, and
    the address is printed on stdout (Netron would log it to stderr).
    """
    import netron   # imported here: only the interactive path needs it

    stop()
    with _quiet_netron():
        address = netron.start(str(path), browse=False)
    _served["viewer"] = address
    print(f"Netron is serving {Path(path).name} at http://{address[0]}:{address[1]}")
    return address


def stop(timeout: float = 5.0) -> None:
    """Stop the Netron server that ``serve`` started last (if any) and wait until it is down."""
    address = _served.pop("viewer", None)
    if address is None:
        return
    import netron

    with _quiet_netron():
        netron.stop(address)
    deadline = time.monotonic() + timeout
    while netron.status(address) and time.monotonic() < deadline:
        time.sleep(0.05)   # its thread notices the stop request within 0.25 s


def show_netron(path: str | Path, height: int = 600) -> tuple[str, int] | None:
    """Embed Netron for ``path`` where the front end allows, else print the command to run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"show_netron: {path} does not exist; export the model first "
                                "(the cell above writes it).")
    print(f"To open it in a terminal, in the environment where the course is installed: "
          f"{netron_command(path)}")
    where = frontend()
    if config.netron_mode() == "print" or where == "none":
        return None
    host, port = serve(path)
    if where == "colab":
        from google.colab import output   # Colab's proxy from the browser to a kernel port

        output.serve_kernel_port_as_iframe(port, height=str(height))
    else:
        from IPython.display import IFrame, display

        display(IFrame(f"http://{host}:{port}", width="100%", height=height))
    return host, port
