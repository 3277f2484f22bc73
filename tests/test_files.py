"""kws_utils.files: atomic writes keep the old file on failure and leave no partial file."""
import os

import pytest

from kws_utils import files


def test_write_text_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    files.write_text(target, "one")
    files.write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failure_keeps_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_empty_write_is_refused(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="no data"):
        with files.atomic_path(target):
            pass
    assert target.read_bytes() == b"old"


def test_temp_keeps_suffix_and_permissions(tmp_path):
    target = tmp_path / "w.onnx"
    with files.atomic_path(target) as tmp:
        assert tmp.suffix == ".onnx" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"x")
    mode = target.stat().st_mode & 0o777
    assert mode == 0o666 & ~files._umask()


def test_directory_target_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        files.write_text(tmp_path, "x")
