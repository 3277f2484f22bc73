"""Round two of the bad-input work: one focused test per family of findings (issue 19)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kws_utils import config, data, deploy, export, features, files, model, streaming, synthetic, training
from kws_utils.errors import (BusyError, FileFormatError, InputError, InputTypeError, KWSError,
                              WriteError)


def _dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _train_dir(root: Path, noise_s: float = 2.0) -> data.DatasetInfo:
    """A tiny Speech Commands style folder (one clip per word) plus a one-clip-per-class test set."""
    tone = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    for word in config.ALL_WORDS:
        (root / "train" / word).mkdir(parents=True)
        sf.write(root / "train" / word / "a_nohash_0.wav", tone, 16000, subtype="PCM_16")
    noise = root / "train" / config.BACKGROUND_NOISE_DIR
    noise.mkdir()
    sf.write(noise / "hum.wav", np.resize(tone, int(noise_s * 16000)), 16000, subtype="PCM_16")
    (root / "train" / "validation_list.txt").write_text("yes/a_nohash_0.wav\n")
    (root / "train" / "testing_list.txt").write_text("no/a_nohash_0.wav\n")
    for name in data.TEST_FOLDERS:
        (root / "test" / name).mkdir(parents=True)
        sf.write(root / "test" / name / "t.wav", tone, 16000, subtype="PCM_16")
    return data.DatasetInfo("synthetic", root / "train", root / "test", "tiny")


# ------------------------------------------------------------------------ silent wrong results
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8])
def test_unsigned_or_8_bit_audio_is_refused(dtype: type) -> None:
    with pytest.raises(InputTypeError, match="int16"):
        features.mfcc(np.full(16000, 7, dtype))


def test_mix_background_refuses_int16_clips() -> None:
    clips = torch.full((2, 16000), 1000, dtype=torch.int16)
    with pytest.raises(InputTypeError, match="clips.*normalize"):
        features.mix_background(clips, [np.zeros(20000, np.float32)], torch.Generator().manual_seed(0))


def test_short_noise_recording_is_named(tmp_path: Path) -> None:
    info = _train_dir(tmp_path, noise_s=0.5)
    with pytest.raises(data.AudioError, match="hum.wav.*shorter than one 1 s"):
        data.validate_train_dir(info.train_dir, require_marker=False)


def test_class_counts_refuses_label_outside_classes() -> None:
    with pytest.raises(InputError, match="label 12"):
        data.class_counts([data.Clip("x.wav", 12)])


def test_kws01_file_listed_twice(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(490))
    (tmp_path / "y_labels.csv").write_text("a.bin,12,3\na.bin,12,4\n")
    with pytest.raises(FileFormatError, match="a.bin is listed a second time"):
        data.load_kws01(tmp_path)


def test_nan_checkpoint_is_refused_and_model_untouched(tmp_path: Path) -> None:
    state = model.DSCNN().state_dict()
    state["fc6.weight"] = torch.full_like(state["fc6.weight"], float("nan"))
    torch.save(state, tmp_path / "m.pth")
    net = model.DSCNN()
    with pytest.raises(FileFormatError, match="NaN"):
        model.load_checkpoint(net, tmp_path / "m.pth")
    assert torch.isfinite(net.fc6.weight).all()


@pytest.mark.parametrize("kwargs", [{"n_classes": 0}, {"filters": 2.5}])
def test_dscnn_size_arguments(kwargs: dict) -> None:
    with pytest.raises(InputError, match=next(iter(kwargs))):
        model.DSCNN(**kwargs)


def test_pack_refuses_wrap_around_and_unpack_counts() -> None:
    with pytest.raises(InputError, match="4-bit range -8..7"):
        deploy.pack(np.array([9]), 4)
    with pytest.raises(InputError, match="whole numbers"):
        deploy.pack(np.array([1.5]), 4)
    with pytest.raises(InputError, match="count=9"):
        deploy.unpack(np.zeros(2, np.uint8), 4, 9)
    assert deploy.unpack(deploy.pack(np.array([-8, 7, 0]), 4), 4, 3).tolist() == [-8, 7, 0]


def test_header_guard_must_be_a_c_identifier() -> None:
    with pytest.raises(InputError, match="guard='1BAD'"):
        deploy.header_text(None, "1BAD")   # checked before the model is read


def test_stream_refuses_a_model_without_12_outputs(tmp_path: Path) -> None:
    path = export.export_onnx(model.DSCNN(n_classes=10), tmp_path / "ten.onnx")
    with pytest.raises(InputError, match="10 outputs"):
        streaming.run_stream(str(path), np.zeros(20000, np.float32), progress=False)


def test_opset_outside_supported_range(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="opset_version=99"):
        export.export_onnx(model.DSCNN(), tmp_path / "m.onnx", opset_version=99)
    assert not (tmp_path / "m.onnx").exists()


def test_empty_data_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_DATA_ROOT", "")
    with pytest.raises(KWSError, match="KWS_DATA_ROOT"):
        config.data_root()


def test_test_set_with_no_clips_per_class(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="per_class=0"):
        synthetic.generate_test_set(tmp_path / "t", 3, 0, workers=1)
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------ stale caches
def test_cache_key_follows_clip_content_and_marker(tmp_path: Path) -> None:
    info = _train_dir(tmp_path)
    key = lambda: training.feature_cache_dir(info, data.splits(info))  # noqa: E731
    first = key()
    assert key() == first
    sf.write(info.train_dir / "yes" / "a_nohash_0.wav", np.zeros(12000), 16000, subtype="PCM_24")
    second = key()
    assert second != first
    (info.train_dir / config.COMPLETE_MARKER).write_text(json.dumps({"kind": "synthetic"}))
    assert key() != second


def test_cache_of_wrong_shape_is_named(tmp_path: Path) -> None:
    torch.save(torch.zeros(5, 1, 49, 10), tmp_path / "test.pt")
    with pytest.raises(FileFormatError, match=r"test.pt holds \(5, 1, 49, 10\).*Delete it"):
        features.cached(tmp_path / "test.pt", lambda: torch.zeros(3, 1, 49, 10), shape=(3, 1, 49, 10))


# ------------------------------------------------------------------------ raw tracebacks
def test_splits_of_half_extracted_folder(tmp_path: Path) -> None:
    info = _train_dir(tmp_path)
    (info.train_dir / "validation_list.txt").unlink()
    with pytest.raises(data.DatasetError, match="validation_list.txt"):
        data.splits(info)


def test_split_list_not_utf8(tmp_path: Path) -> None:
    info = _train_dir(tmp_path)
    (info.train_dir / "validation_list.txt").write_bytes(b"yes/caf\xe9.wav\n")
    with pytest.raises(data.DatasetError, match="validation_list.txt is not UTF-8"):
        data.splits(info)


def test_fit_names_bad_labels() -> None:
    x, y = torch.randn(4, 1, 49, 10), torch.tensor([0, 1, 2, 12])
    with pytest.raises(InputError, match="train_y.*0..11"):
        training.fit(model.DSCNN(), [x], y, x, y, 1, 0.05, 2, torch.Generator(), channels_last=False)


@pytest.mark.parametrize("seed", [-1, 1.5, 2**32])
def test_set_seed_range(seed: object) -> None:
    with pytest.raises(InputError, match="seed="):
        training.set_seed(seed)


def test_destination_inside_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("mine")
    with pytest.raises(WriteError, match="blocker is a file, not a folder"):
        files.write_text(tmp_path / "blocker" / "a.txt", "x")
    assert (tmp_path / "blocker").read_text() == "mine"


def test_full_disk_names_the_target(tmp_path: Path) -> None:
    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(WriteError, match=r"out.bin: No space left.*previous file there is kept") as err:
        with files.atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert ".kws-tmp" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_read_header_of_a_binary_file(tmp_path: Path) -> None:
    (tmp_path / "k.h").write_bytes(bytes(range(256)))
    with pytest.raises(FileFormatError, match="k.h is not a text file"):
        deploy.read_header(tmp_path / "k.h")


def test_onnx_predict_of_an_empty_batch(tmp_path: Path) -> None:
    path = export.export_onnx(model.DSCNN(), tmp_path / "m.onnx")
    assert export.onnx_predict(path, torch.zeros(0, 1, 49, 10)).shape == (0, 12)


def test_model_called_with_keyword() -> None:
    net = model.DSCNN().eval()
    x = torch.randn(2, 1, 49, 10)
    assert torch.equal(net(x=x), net(x))
    with pytest.raises(InputError, match="one input batch"):
        net()


# ------------------------------------------------------------------------ unclear errors
def test_upper_case_checksum_is_accepted(tmp_path: Path) -> None:
    import hashlib
    (tmp_path / "src.bin").write_bytes(b"archive")
    sha = hashlib.sha256(b"archive").hexdigest().upper()
    dest = data.download((tmp_path / "src.bin").as_uri(), tmp_path / "d.bin", sha, show_progress=False)
    assert dest.read_bytes() == b"archive"
    with pytest.raises(InputError, match="url='not a url'"):
        data.download("not a url", tmp_path / "e.bin", sha)


def test_kws01_with_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(490))
    (tmp_path / "y_labels.csv").write_bytes(b"\xef\xbb\xbfa.bin,12,3\n")
    assert data.load_kws01(tmp_path)[2] == ["a.bin"]


def test_upper_case_wav_extension(tmp_path: Path) -> None:
    for name in data.TEST_FOLDERS:
        (tmp_path / name).mkdir()
        sf.write(tmp_path / name / "c.WAV", np.zeros(16000), 16000, subtype="PCM_16")
    data.validate_test_dir(tmp_path, require_marker=False)
    assert len(data.test_clips(tmp_path)) == len(data.TEST_FOLDERS)


def test_whole_float_hop_and_channels_first_recording() -> None:
    assert streaming.hop_frames(100.0) == 5
    assert streaming.prepare_recording(np.zeros((1, 20000))).shape == (20000,)
    with pytest.raises(InputError, match=r"mean\(axis=0\)"):
        streaming.prepare_recording(np.zeros((2, 20000)))


def test_ptq_on_nan_names_the_calibration_data() -> None:
    from kws_utils import quant
    with pytest.raises(InputError, match="calib_x holds NaN"):
        quant.ptq(model.DSCNN(), 8, torch.full((4, 1, 49, 10), float("nan")))


@pytest.mark.parametrize("layout", ["module", "state_dict"])
def test_common_checkpoint_layouts_load(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    state = model.DSCNN().state_dict()
    saved = {f"module.{k}": v for k, v in state.items()} if layout == "module" else {"state_dict": state}
    torch.save(saved, tmp_path / "m.pth")
    loaded = model.load_checkpoint(model.DSCNN(), tmp_path / "m.pth").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ------------------------------------------------------------------------ collisions and killed runs
def test_live_lock_is_refused_stale_lock_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "target.lock"
    lock.write_text(f"{os.getppid()}\n")
    with pytest.raises(BusyError, match="target.lock"):
        with files.folder_lock(tmp_path / "target"):
            pass
    assert lock.read_text().strip() == str(os.getppid())
    lock.write_text(f"{_dead_pid()}\n")
    with files.folder_lock(tmp_path / "target"):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_killed_run_temp_file_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{files.TEMP_PREFIX}d.bin.{_dead_pid()}.xyz.bin"
    live = tmp_path / f"{files.TEMP_PREFIX}d.bin.{os.getppid()}.xyz.bin"
    dead.write_bytes(b"half")
    live.write_bytes(b"another run")
    files.write_bytes(tmp_path / "d.bin", b"done")
    assert not dead.exists() and live.exists()


def test_created_dataset_folder_is_readable_by_others(tmp_path: Path) -> None:
    import io
    import tarfile
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("a/x.wav")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    target = data.extract(archive, tmp_path / "target", {"kind": "t"})
    assert target.stat().st_mode & 0o777 == 0o777 & ~files._umask()


def test_second_generation_waits_for_the_first(tmp_path: Path) -> None:
    import threading
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    threading.Thread(target=proc.wait, daemon=True).start()    # reaped as soon as it exits
    (tmp_path / "target.lock").write_text(f"{proc.pid}\n")
    files.wait_unlocked(tmp_path / "target", timeout_s=60)
    assert proc.poll() is not None


def test_unwritable_folder_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*_a: object, dir: object = None, **_k: object) -> None:   # noqa: A002
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(str(dir)) / ".kws-tmp-x"))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)     # as root, chmod 0500 would not stop a write
    with pytest.raises(WriteError, match=r"report.txt: Permission denied.*not writable") as err:
        files.write_text(tmp_path / "report.txt", "x")
    assert ".kws-tmp" not in str(err.value)
