"""Safe writing: every file the course writes appears complete, or not at all.

Writers never open their final path. They write to a unique temporary name in the same folder
(same file system, so the final rename is atomic) and rename it into place only when the write
succeeded. A crash, a full disk or Ctrl-C leaves the previous file intact and no partial file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".kws-tmp-"   # temporary names start with this, so a left-over is recognisable


def _umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Errors that mean "this place cannot take the file", reported with the target's name.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.ENOTDIR, errno.EEXIST, errno.EIO}


def _write_error(target: Path, err: OSError) -> Exception:
    """A WriteError naming ``target`` (not the hidden temporary file) and what to do."""
    from kws_utils.errors import WriteError
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        advice = ("free some space there, or point KWS_DATA_ROOT / KWS_OUTPUT to a disk with room")
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"the folder {target.parent} is not writable: choose another path or fix its permissions"
    else:
        advice = "check the path"
    return WriteError(err.errno, f"could not write {target}: {err.strerror or err}; {advice}. "
                      "Any previous file there is kept.")


def _check_parent(target: Path) -> None:
    """Refuse a target whose folder (or a folder above it) is a regular file."""
    from kws_utils.errors import WriteError
    for folder in target.parents:
        if folder.exists():
            if not folder.is_dir():
                raise WriteError(errno.ENOTDIR, f"cannot write {target}: {folder} is a file, not a "
                                 "folder. Move that file away or choose another path.")
            return


def pid_alive(pid: int) -> bool:
    """True if a process with this id is running (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # it exists but belongs to another user
    return pid > 0


def _dead_owner(name: str, prefix: str) -> bool:
    """True if a temporary name ``prefix<pid>.<...>`` belongs to a process that has exited."""
    pid = name[len(prefix):].split(".", 1)[0]
    return pid.isdigit() and not pid_alive(int(pid))


def remove_dead_temps(target: Path) -> None:
    """Delete temporary files beside ``target`` left by runs that were killed (their pid is gone)."""
    prefix = f"{TEMP_PREFIX}{target.name}."
    for leftover in target.parent.glob(glob.escape(prefix) + "*"):
        if leftover.is_file() and _dead_owner(leftover.name, prefix):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder: give the path of a file to write.")
    _check_parent(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(target)
        # Keep the suffix: some writers (onnx.save, torch.save) look at it. The pid in the name
        # lets a later run delete what a killed run left behind.
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.{os.getpid()}.",
                                    suffix=target.suffix, dir=target.parent)
    except OSError as err:
        raise _write_error(target, err) from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise OSError(f"writing {target} produced no data; the previous file is kept.")
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except OSError as err:
        from kws_utils.errors import KWSError
        if isinstance(err, KWSError) or err.errno not in _WRITE_ERRNOS:
            raise
        raise _write_error(target, err) from err
    finally:
        tmp.unlink(missing_ok=True)


def lock_owner(lock: Path) -> str | None:
    """The pid holding ``lock`` if that process is alive (or the lock is just being written)."""
    try:
        owner, age = lock.read_text(errors="replace").strip(), time.time() - lock.stat().st_mtime
    except OSError:
        return None
    if owner.isdigit():
        return owner if pid_alive(int(owner)) else None
    return "unknown" if age < 10 else None   # an empty lock: its writer may not have written yet


def wait_unlocked(target: str | Path, timeout_s: float = 3600.0) -> None:
    """Wait while another live run holds ``<target>.lock`` (e.g. a second notebook generating data)."""
    lock = Path(target).with_name(Path(target).name + ".lock")
    deadline, told = time.monotonic() + timeout_s, False
    while lock.exists() and lock_owner(lock) is not None and time.monotonic() < deadline:
        if not told:
            print(f"{target} is being written by another run (lock file {lock}): waiting for it.")
            told = True
        time.sleep(1.0)


@contextlib.contextmanager
def folder_lock(target: str | Path) -> Iterator[Path]:
    """Hold ``<target>.lock`` (our pid inside) while writing ``target``; refuse a live owner's."""
    from kws_utils.errors import BusyError
    target = Path(target)
    lock = target.with_name(target.name + ".lock")
    _check_parent(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = lock_owner(lock)
            if owner is not None:
                raise BusyError(f"{target} is being written by another run (process {owner}; lock "
                                f"file {lock}). Wait for that run to finish; if no such run is "
                                f"going on, delete {lock} and run again.") from None
            lock.unlink(missing_ok=True)    # the run that held it was killed: take it over
    else:
        raise BusyError(f"could not take the lock file {lock}: delete it and run again.")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()


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
