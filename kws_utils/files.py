"""Safe writing: every file the course writes appears complete, or not at all.

Writers never open their final path. They write to a unique temporary name in the same folder
(same file system, so the final rename is atomic) and rename it into place only when the write
succeeded. A crash, a full disk or Ctrl-C leaves the previous file intact and no partial file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".kws-tmp-"   # temporary names start with this, so a left-over is recognisable


def _umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder: give the path of a file to write.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers (onnx.save, torch.save) look at it.
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", suffix=target.suffix,
                                dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise OSError(f"writing {target} produced no data; the previous file is kept.")
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return write_bytes(path, text.encode("utf-8"))


def load_torch(path: str | Path, what: str = "file") -> object:
    """torch.load a file the course wrote (tensors only), with a clear error if it is corrupt."""
    import torch   # here, so that writing files does not need torch

    from kws_utils.errors import FileFormatError, MissingFileError
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} not found: check the path, or run the step that "
                               "writes it.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's own message advises weights_only=False, which would run code from the file.
        raise FileFormatError(f"{path}: this {what} is corrupt, truncated or not saved by the "
                              f"course ({type(err).__name__}). Delete it and run the step that "
                              "writes it again; do not load it with weights_only=False.") from None
