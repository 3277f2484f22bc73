"""The real MLPerf Tiny KWS artifacts: the 1,000 kws01 inputs and the reference DS-CNN weights.

A local copy is used when there is one (KWS_MLPERF_DIR, then ``../shared/mlperf`` beside the
repository, then an earlier download in the data folder). Otherwise every file is downloaded
from its public source at a pinned commit (config.MLPERF_KWS01_URL, config.MLPERF_CHECKPOINT_URL),
checked against the SHA-256 and size in ``mlperf_manifest.json`` and renamed into place only
when it matches. The kws01 folder gets its completion marker only after all 1,001 files passed.
"""
from __future__ import annotations

import contextlib
import json
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from kws_utils import config, data, files, synthetic

MANIFEST = Path(__file__).with_name("mlperf_manifest.json")
KWS01 = "kws01"
CHECKPOINT = "kws_dscnn_pb2pth_checkpoint.pth"


@cache
def manifest() -> dict[str, dict[str, tuple[str, int]]]:
    """{"kws01": {name: (sha256, bytes)}, "checkpoint": {name: (sha256, bytes)}} of every file."""
    return {group: {name: (sha, size) for name, (sha, size) in entries.items()}
            for group, entries in json.loads(MANIFEST.read_text()).items()}


def _manifest_id() -> str:
    """SHA-256 of the manifest file: a download marked with another one is checked again."""
    return data.file_sha256(MANIFEST)


def _help(what: str, variable: str) -> str:
    """What a learner can do when the MLPerf files cannot be downloaded."""
    return (f"The real MLPerf {what} cannot be used here; notebook cells that need the real "
            "MLPerf files skip. To get them: run again with internet access (they are downloaded "
            "once, into "
            f"{config.mlperf_download_dir()}), or copy the MLPerf artifacts folder (kws01/ and "
            f"{CHECKPOINT}) to this machine and set KWS_MLPERF_DIR to it, or set {variable} to a "
            "mirror.")


def _fetch_verified(url: str, dest: Path, sha256: str, size: int, what: str,
                    variable: str) -> Path:
    """Download one manifest file, re-raising failures with the MLPerf-specific advice."""
    try:
        return data.download(url, dest, sha256, size, show_progress=False)
    except data.NetworkUnavailable as err:
        _drop_empty_folders(dest.parent)
        raise data.NetworkUnavailable(f"Could not reach {url} ({err.__cause__}). "
                                      f"{_help(what, variable)}") from err
    except data.DownloadError as err:
        _drop_empty_folders(dest.parent)
        raise data.DownloadError(f"{dest.name} refused and not kept: {err} The file does not "
                                 "match the course's manifest (kws_utils/mlperf_manifest.json): "
                                 f"a corrupted or truncated copy. {_help(what, variable)}") from err


def _drop_empty_folders(folder: Path) -> None:
    """Remove ``folder`` and the download folder if a failed first download left them empty."""
    for path in (folder, config.mlperf_download_dir()):
        with contextlib.suppress(OSError):   # not empty (or already gone): keep it
            path.rmdir()


def _local_kws01() -> Path | None:
    """The kws01 folder of the first local copy that has one."""
    return next((d / KWS01 for d in config.mlperf_local_dirs()
                 if (d / KWS01 / "y_labels.csv").is_file()), None)


def _download_complete(folder: Path) -> bool:
    """True if ``folder`` is a finished, verified kws01 download for the current manifest."""
    marker = synthetic.read_marker(folder)
    return marker is not None and marker.get("manifest_sha256") == _manifest_id()


def kws01_dir() -> Path:
    """The kws01 folder: a local copy, an earlier verified download, or a fresh download."""
    local = _local_kws01()
    if local is not None:
        return local
    folder = config.mlperf_download_dir() / KWS01
    if not _download_complete(folder):
        download_kws01(folder)
    return folder


def download_kws01(folder: Path) -> Path:
    """Fetch y_labels.csv and the 1,000 .bin files, each verified; mark the folder complete last."""
    base, entries = config.mlperf_kws01_url(), manifest()[KWS01]
    (folder / config.COMPLETE_MARKER).unlink(missing_ok=True)
    # Files already there and matching their hash are kept, so an interrupted run resumes.
    for name, (sha, size) in tqdm(entries.items(), desc="MLPerf kws01", unit="file"):
        _fetch_verified(f"{base}/{name}", folder / name, sha, size, "kws01 inputs",
                        "KWS_MLPERF_KWS01_URL")
    marker = {"source": base, "files": len(entries), "manifest_sha256": _manifest_id()}
    files.write_text(folder / config.COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")
    return folder


def checkpoint_path() -> Path:
    """The reference DS-CNN checkpoint: a local copy, else a verified (cached) download."""
    local = next((d / CHECKPOINT for d in config.mlperf_local_dirs()
                  if (d / CHECKPOINT).is_file()), None)
    if local is not None:
        return local
    sha, size = manifest()["checkpoint"][CHECKPOINT]
    # download() returns at once when a verified copy is already there.
    return _fetch_verified(config.mlperf_checkpoint_url(), config.mlperf_download_dir() / CHECKPOINT,
                           sha, size, "reference checkpoint", "KWS_MLPERF_CHECKPOINT_URL")


def available() -> bool:
    """Make both artifacts ready (downloading if needed); print why and return False if not."""
    try:
        kws01_dir()
        checkpoint_path()
    except data.DownloadError as err:
        print(f"SKIPPED (real MLPerf artifacts unavailable): {err}")
        return False
    return True
