"""MLPerf artifacts: local copies first, else a verified download (tested over a loopback server)."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from kws_utils import config, data, mlperf, model, training
from kws_utils.files import TEMP_PREFIX

SHARED = Path("/work/shared/mlperf")
if not SHARED.is_dir():   # the real files may also sit beside the repository
    SHARED = config.REPO_ROOT.parent / "shared" / "mlperf"
pytestmark = pytest.mark.skipif(not (SHARED / "kws01").is_dir()
                                or not (SHARED / mlperf.CHECKPOINT).is_file(),
                                reason="real MLPerf artifacts (../shared/mlperf) not present")


@pytest.fixture()
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A loopback HTTP server over a copy of the real files; yields (base URL, www, requests)."""
    www = tmp_path / "www"
    shutil.copytree(SHARED / "kws01", www / "kws01")
    (www / "ckpt").mkdir()
    shutil.copy(SHARED / mlperf.CHECKPOINT, www / "ckpt" / mlperf.CHECKPOINT)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        """Serves ``www`` and records every path asked for."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            """Serve from the test folder."""
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

        def do_GET(self) -> None:
            """Record the request, then serve the file."""
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requests
    httpd.shutdown()
    thread.join(timeout=5)


def _urls(base: str) -> dict[str, str]:
    """The two override variables pointing at the loopback mirror."""
    return {"KWS_MLPERF_KWS01_URL": f"{base}/kws01",
            "KWS_MLPERF_CHECKPOINT_URL": f"{base}/ckpt/{mlperf.CHECKPOINT}"}


@pytest.fixture()
def no_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As in a fresh clone: no KWS_MLPERF_DIR, no ../shared; returns the empty data folder."""
    monkeypatch.delenv("KWS_MLPERF_DIR", raising=False)
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "clone" / "repo")
    monkeypatch.setenv("KWS_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path / "data"


def _leftovers(folder: Path) -> list[str]:
    """Temporary or partial files left in ``folder``."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)
            or p.name.endswith(".part")]


def test_fresh_clone_downloads_then_scores_reference(mirror: tuple[str, Path, list[str]],
                                                     tmp_path: Path) -> None:
    # A real clone: the package copied to a folder with no ../shared beside it, run as a learner.
    base, _, requests = mirror
    clone = tmp_path / "clone"
    shutil.copytree(config.REPO_ROOT / "kws_utils", clone / "kws_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "KWS_MLPERF_DIR"}
    env.update(_urls(base), PYTHONPATH=str(clone), KWS_DATA_ROOT=str(tmp_path / "data"),
               KWS_DEVICE="cpu")
    script = ("from kws_utils import config, data, model, training\n"
              "x, y, _ = data.load_kws01()\n"
              "acc = training.evaluate(model.reference_model(), x, y).accuracy\n"
              "print(config.mlperf_dir(), len(y), f'{acc:.4f}')\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=600).stdout.split()
    assert out == [str(tmp_path / "data" / "mlperf"), "1000", "0.9040"]
    assert len(requests) == 1002    # y_labels.csv, 1,000 .bin files, the checkpoint
    assert (tmp_path / "data" / "mlperf" / "kws01" / config.COMPLETE_MARKER).is_file()


def test_previous_download_is_reused_offline(mirror: tuple[str, Path, list[str]],
                                             no_local_copy: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, requests = mirror
    for name, url in _urls(base).items():
        monkeypatch.setenv(name, url)
    first = mlperf.kws01_dir(), mlperf.checkpoint_path()
    asked = len(requests)
    for name in _urls(base):   # now "offline": a closed port
        monkeypatch.setenv(name, "http://127.0.0.1:9/x")
    assert (mlperf.kws01_dir(), mlperf.checkpoint_path()) == first
    assert len(requests) == asked and first[0] == no_local_copy / "mlperf" / "kws01"


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_kws01_file_is_refused_and_not_kept(mirror: tuple[str, Path, list[str]],
                                                    no_local_copy: Path, damage: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base, www, _ = mirror
    victim = sorted((www / "kws01").glob("*.bin"))[500]   # half-way through the download
    blob = victim.read_bytes()
    victim.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]) if damage == "corrupt" else blob[:300])
    for name, url in _urls(base).items():
        monkeypatch.setenv(name, url)
    with pytest.raises(data.DownloadError, match=f"{victim.name} refused and not kept"):
        data.load_kws01()
    folder = no_local_copy / "mlperf" / "kws01"
    assert not (folder / victim.name).exists() and not _leftovers(no_local_copy)
    assert not (folder / config.COMPLETE_MARKER).exists()
    victim.write_bytes(blob)   # the mirror is repaired: the next run resumes and completes
    assert len(data.load_kws01()[1]) == 1000


def test_truncated_checkpoint_is_refused_and_not_kept(mirror: tuple[str, Path, list[str]],
                                                      no_local_copy: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base, www, _ = mirror
    ckpt = www / "ckpt" / mlperf.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:50_000])
    for name, url in _urls(base).items():
        monkeypatch.setenv(name, url)
    with pytest.raises(data.DownloadError, match="refused and not kept.*manifest"):
        model.reference_model()
    assert not (no_local_copy / "mlperf" / mlperf.CHECKPOINT).exists() and not _leftovers(no_local_copy)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_network_gives_clear_message_and_skip(no_local_copy: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    for name, url in _urls(dead).items():
        monkeypatch.setenv(name, url)
    with pytest.raises(data.NetworkUnavailable, match="KWS_MLPERF_DIR"):
        data.load_kws01()
    assert training.kws01_scores({"m": model.DSCNN()}) is None
    assert mlperf.available() is False
    assert "SKIPPED" in capsys.readouterr().out
    assert not (no_local_copy / "mlperf").exists()   # not even an empty folder is left


def test_local_copy_wins_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "clone" / "repo")
    monkeypatch.setenv("KWS_MLPERF_DIR", str(SHARED))
    monkeypatch.setenv("KWS_MLPERF_KWS01_URL", "http://127.0.0.1:9/x")
    assert mlperf.kws01_dir() == SHARED / "kws01"
    assert mlperf.checkpoint_path() == SHARED / mlperf.CHECKPOINT


def test_manifest_matches_the_real_files() -> None:
    entries = mlperf.manifest()
    assert len(entries["kws01"]) == 1001
    for name in ("y_labels.csv", *sorted(entries["kws01"])[:20]):
        assert data.file_sha256(SHARED / "kws01" / name) == entries["kws01"][name][0]
    assert data.file_sha256(SHARED / mlperf.CHECKPOINT) == entries["checkpoint"][mlperf.CHECKPOINT][0]
