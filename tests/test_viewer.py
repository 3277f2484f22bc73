"""The Netron helper: embeds where a front end can show it, prints the command everywhere."""
from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import pytest

from kws_utils import config, export, model, viewer


@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    """A real exported DS-CNN graph."""
    return export.export_onnx(model.DSCNN().eval(), tmp_path / "dscnn graph.onnx")


def test_headless_prints_the_command_and_starts_nothing(onnx_file: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_NETRON", "embed")   # even when asked to embed: no front end here
    assert viewer.frontend() == "none"
    assert viewer.show_netron(onnx_file) is None
    out = capsys.readouterr().out
    assert f"netron '{onnx_file.resolve()}'" in out and ".venv" not in out


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx.*export the model first"):
        viewer.show_netron(tmp_path / "missing.onnx")


def test_netron_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KWS_NETRON", raising=False)
    monkeypatch.setenv("KWS_PROFILE", "ci")
    assert config.netron_mode() == "print"
    monkeypatch.setenv("KWS_PROFILE", "default")
    assert config.netron_mode() == "embed"
    monkeypatch.setenv("KWS_NETRON", "iframe")
    with pytest.raises(ValueError, match="KWS_NETRON='iframe'"):
        config.netron_mode()


def test_serve_really_serves_the_viewer(onnx_file: Path) -> None:
    import netron

    host, port = viewer.serve(onnx_file)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as page:
            assert page.status == 200 and b"netron" in page.read().lower()
    finally:
        netron.stop((host, port))


def live_servers() -> int:
    """Netron server threads still running in this process."""
    return sum(type(t).__name__ == "_HTTPServerThread" and t.alive() for t in threading.enumerate())


def test_serving_again_replaces_the_server_and_logs_to_stdout(onnx_file: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    import netron

    first = viewer.serve(onnx_file)
    try:
        second = viewer.serve(onnx_file)
        assert live_servers() == 1, "the second call should have stopped the first server"
        assert netron.status(second) and (first == second or not netron.status(first))
        out, err = capfd.readouterr()
        assert "Serving" not in err and out.count("Netron is serving dscnn graph.onnx") == 2
    finally:
        viewer.stop()
    assert live_servers() == 0
