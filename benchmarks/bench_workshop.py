"""Time the whole course on the workshop profile: can each notebook run in 5 minutes on 2 cores?

Runs what an instructor runs: `scripts/prepare_data.py` (the evening before), then every notebook
headless, in order, with KWS_PROFILE=workshop, each into output/workshop/notebooks/. A notebook's
time is read from its cell timestamps (as scripts/notebook_times.py does for the committed run).

    python benchmarks/bench_workshop.py          # about 25 min on 2 cores, the first time

Writes output/benchmarks/workshop.json and prints the README's table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import nbformat  # noqa: E402

from kws_utils import config, files  # noqa: E402
from notebook_times import exact, run_seconds  # noqa: E402

BUDGET_S = 5 * 60   # the goal per notebook


def workshop_env() -> dict[str, str]:
    """The environment of a workshop run: the workshop profile, headless Netron."""
    return {**os.environ, "KWS_PROFILE": "workshop", "KWS_NETRON": "print"}


def run() -> dict:
    """Prepare the data, execute every notebook, and return the measured seconds of each."""
    out = config.output_dir() / "workshop" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py")], env=workshop_env(), check=True)
    figures = {"prepare_data_s": round(time.perf_counter() - start, 1), "notebooks": {}}
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                        "--ExecutePreprocessor.timeout=-1", "--output-dir", str(out), str(path)],
                       env=workshop_env(), check=True)
        seconds = run_seconds(nbformat.read(out / path.name, as_version=4))
        figures["notebooks"][path.name[:2]] = round(seconds, 1)
        print(f"{path.name}: {exact(seconds)}", flush=True)
    return figures


def main() -> None:
    """Run, save the JSON atomically, print the table."""
    figures = run()
    files.write_text(config.output_dir() / "benchmarks" / "workshop.json", json.dumps(figures, indent=1))
    print(f"\nprepare_data (the evening before): {exact(figures['prepare_data_s'])}")
    print("| notebook | workshop profile, 2-core CPU | within 5 min |\n|---|---|---|")
    for key, seconds in figures["notebooks"].items():
        print(f"| {key} | {exact(seconds)} | {'yes' if seconds <= BUDGET_S else 'NO'} |")


if __name__ == "__main__":
    main()
