"""Issue 12: no lost data, no silent wrong answer, clear errors (one test per class of bad input).

The broad table of bad inputs is tests/test_bad_inputs.py; these tests pin each finding.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kws_utils import config, data, deploy, export, features, files, model, synthetic, training
from kws_utils.errors import (ConfigError, FileFormatError, InputError, KWSError,
                              TargetExistsError, TrainingDiverged)

REPO = Path(__file__).resolve().parent.parent


def _tone(level: float = 0.5, n: int = 16000) -> np.ndarray:
    return level * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)


def _no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if files.TEMP_PREFIX in p.name or ".partial" in p.name]


def _disk_full_after(n_bytes: int):
    """A write function that writes ``n_bytes`` and then fails like a full disk."""
    def write(path: Path, content: bytes) -> None:
        Path(path).open("wb").write(content[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


# ----------------------------------------------------------------------------- finding 1
@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE", "PCM_24", "PCM_32", "PCM_U8"])
def test_float_and_other_wav_subtypes_load_at_true_level(tmp_path: Path, subtype: str) -> None:
    sf.write(tmp_path / "x.wav", _tone(0.5), 16000, subtype=subtype)
    wave = data.load_audio(tmp_path / "x.wav")
    assert wave.dtype == np.int16
    assert abs(np.abs(wave).max() / 32768 - 0.5) < 0.01


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.0])
def test_non_finite_or_over_full_scale_wav_is_refused(tmp_path: Path, bad: float) -> None:
    x = _tone()
    x[5] = bad
    sf.write(tmp_path / "bad.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(data.AudioError, match="bad.wav"):
        data.load_audio(tmp_path / "bad.wav")


def test_other_channel_counts_and_bad_sample_rates_are_refused(tmp_path: Path) -> None:
    sf.write(tmp_path / "six.wav", np.zeros((1000, 6)), 16000)
    with pytest.raises(data.AudioError, match="6 channels"):
        data.load_audio(tmp_path / "six.wav")
    sf.write(tmp_path / "ok.wav", _tone(), 16000)
    for rate in (0, -16000):
        with pytest.raises(InputError, match="sample_rate"):
            data.load_audio(tmp_path / "ok.wav", rate)


# ----------------------------------------------------------------------------- finding 2
def test_extract_refuses_a_user_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    import tarfile
    (tmp_path / "src.txt").write_text("x")
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "src.txt", "w/src.txt")
    user = tmp_path / "target"
    user.mkdir()
    (user / "mine.txt").write_text("precious")
    with pytest.raises(TargetExistsError, match="target"):
        data.extract(archive, user, {"kind": "t"})
    assert (user / "mine.txt").read_text() == "precious"
    regular = tmp_path / "file_target"
    regular.write_text("mine")
    with pytest.raises(FileExistsError):
        data.extract(archive, regular, {})
    assert regular.read_text() == "mine"
    assert _no_leftovers(tmp_path)
    # Its own previous extraction is replaced.
    data.extract(archive, tmp_path / "fresh", {"kind": "t"})
    data.extract(archive, tmp_path / "fresh", {"kind": "t"})
    assert (tmp_path / "fresh" / "w" / "src.txt").is_file() and _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- finding 3
def test_export_onnx_on_a_full_disk_keeps_the_old_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    good = export.export_onnx(model.DSCNN(), tmp_path / "m.onnx")
    before = good.read_bytes()
    real_export = torch.onnx.export

    def failing_export(*args, **kwargs):
        real_export(*args, **kwargs)
        path = Path(args[2])
        _disk_full_after(1000)(path, path.read_bytes())
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(OSError):
        export.export_onnx(model.DSCNN(), tmp_path / "m.onnx")
    assert good.read_bytes() == before and _no_leftovers(tmp_path)


def test_write_header_and_save_checkpoint_on_a_full_disk_keep_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kws_model.h").write_text("old header")
    monkeypatch.setattr(deploy, "header_text", lambda source: "#define X 1\n" * 1000)
    monkeypatch.setattr(Path, "write_bytes", lambda self, b: _disk_full_after(100)(self, b))
    with pytest.raises(OSError):
        deploy.write_header("unused.onnx", tmp_path / "kws_model.h")
    assert (tmp_path / "kws_model.h").read_text() == "old header"
    monkeypatch.undo()

    path = tmp_path / "float.pth"
    training.save_checkpoint(model.DSCNN(), path)
    before = path.read_bytes()
    (tmp_path / "float.tmp").write_text("a user's file")
    monkeypatch.setattr(torch, "save", lambda obj, f: _disk_full_after(500)(f, before))
    with pytest.raises(OSError):
        training.save_checkpoint(model.DSCNN(), path)
    assert path.read_bytes() == before
    assert (tmp_path / "float.tmp").read_text() == "a user's file"
    assert _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- finding 4
@pytest.fixture
def sigint_default() -> Iterator[None]:
    """Ctrl-C raising KeyboardInterrupt, as in a terminal, even if this run inherited it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_espeak_synthesis_is_not_swallowed(sigint_default: None) -> None:
    with synthetic.Espeak() as espeak:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in range(50):     # far longer than the timer, if Ctrl-C were lost
                    espeak.speak("one two three four five six seven eight nine ten " * 5, "en",
                                 170, 50, 50)
        finally:
            timer.cancel()
        assert time.monotonic() - start < 1.0
        # The instance still works after an interrupted utterance.
        assert espeak.speak("yes", "en", 170, 50, 50).size > 0


def test_ignored_ctrl_c_leaves_espeak_utterances_whole() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)     # as in a shell's background job
    try:
        text = "one two three four five six seven eight nine ten " * 60    # about 0.15 s of work
        with synthetic.Espeak() as espeak:      # a fresh instance each: espeak's first utterance
            whole = espeak.speak(text, "en", 170, 50, 50)     # differs from its later ones
        with synthetic.Espeak() as espeak:
            timer = threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            again = espeak.speak(text, "en", 170, 50, 50)
            timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert np.array_equal(again, whole)


def test_ctrl_c_stops_generation_and_leaves_no_marker(tmp_path: Path) -> None:
    target = tmp_path / "synth"
    code = ("from kws_utils import synthetic\n"
            f"synthetic.generate_dataset({str(target)!r}, speakers=30, seed=3, workers=1,\n"
            "                           recipe=synthetic.Recipe(tts_share=0.0))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # A shell's background job (nohup ... &) inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt; give the child the default disposition a terminal would.
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # Wait until clips are being written into the (hidden, dot-named) work folder, then press
    # Ctrl-C; glob's "*" skips dot-names, so the work folder is named by its prefix.
    while not any(tmp_path.glob(f"{files.TEMP_PREFIX}*/[a-z]*/*.wav")):   # word clips, by espeak
        assert proc.poll() is None, "generation finished before any clip was seen in its work folder"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("generation still ran 60 s after Ctrl-C: " + proc.communicate()[1].decode()[-2000:])
    elapsed = time.monotonic() - sent
    stderr = proc.stderr.read().decode()
    assert proc.returncode != 0, "generation ran to completion despite Ctrl-C"
    assert "KeyboardInterrupt" in stderr, stderr[-2000:]
    # About 1 s on an idle 2-core machine (interpreter exit included), against about 10 s for the
    # whole generation: a lost Ctrl-C would show here.
    assert elapsed < 5, f"{elapsed:.1f} s from Ctrl-C to exit"
    assert not target.exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- findings 6, 8
@pytest.mark.parametrize("shape", [(16000, 2), (16000, 1)])
def test_samples_by_channels_array_is_not_read_as_16000_clips(shape: tuple[int, int]) -> None:
    with pytest.raises(InputError, match="wave"):
        features.mfcc(np.zeros(shape, np.int16))
    with pytest.raises(InputError, match="waves"):
        features.compute_features(np.zeros(shape, np.int16))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_compute_features_refuses_a_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(InputError, match="batch_size"):
        features.compute_features(np.zeros((2, 16000), np.int16), batch_size=batch_size)


# ----------------------------------------------------------------------------- finding 7
def _fit(x: torch.Tensor, lr: float, epochs: int = 1) -> training.History:
    torch.manual_seed(0)
    y = torch.arange(len(x)) % 12
    return training.fit(model.DSCNN(), [x], y, x, y, epochs, lr, 4,
                        torch.Generator().manual_seed(0), channels_last=False)


def test_training_stops_on_a_non_finite_loss_and_says_why() -> None:
    x = torch.randn(8, *config.INPUT_SHAPE)
    with pytest.raises(TrainingDiverged, match="input batch holds NaN"):
        _fit(torch.full_like(x, float("nan")), 0.05)
    with pytest.raises(TrainingDiverged, match="learning rate"):
        _fit(x, 1e6, epochs=4)
    with pytest.raises(InputError, match="lr="):
        _fit(x, float("nan"))


# ----------------------------------------------------------------------------- the "Also" list
@pytest.mark.parametrize("rows", [["a.bin"], ["a.bin,12"], ["a.bin,12,3", "a.bin,x,3"]])
def test_kws01_rows_with_missing_fields(tmp_path: Path, rows: list[str]) -> None:
    (tmp_path / "y_labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "a.bin").write_bytes(bytes(490))
    with pytest.raises(FileFormatError, match="y_labels.csv line"):
        data.load_kws01(tmp_path)


def test_kws01_header_row_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "y_labels.csv").write_text("file,classes,label\na.bin,12,3\n")
    (tmp_path / "a.bin").write_bytes(bytes(490))
    x, y, names = data.load_kws01(tmp_path)
    assert x.shape == (1, 1, 49, 10) and y.tolist() == [3] and names == ["a.bin"]


def test_a_non_onnx_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x00\xff" * 300)
    with pytest.raises(FileFormatError, match="m.onnx"):
        export.onnx_predict(tmp_path / "m.onnx", torch.zeros(1, *config.INPUT_SHAPE))


def test_confusion_matrix_refuses_out_of_range_labels() -> None:
    with pytest.raises(InputError, match="labels holds class 12"):
        training.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 12]))


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_kws_seed_names_the_variable(value: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KWS_SEED": value}
    out = subprocess.run([sys.executable, "-c", "import kws_utils.config"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "ConfigError: KWS_SEED=" in out.stderr.strip().splitlines()[-1]
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_corrupt_checkpoint_or_cache_gives_course_advice(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "c.pth").write_bytes(content)
    for load in (lambda: model.load_checkpoint(model.DSCNN(), tmp_path / "c.pth"),
                 lambda: features.cached(tmp_path / "c.pth", lambda: torch.zeros(1))):
        with pytest.raises(FileFormatError, match="c.pth") as info:
            load()
        assert "Delete it" in str(info.value) and "retry" not in str(info.value).lower()
    assert issubclass(FileFormatError, KWSError)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_swallowed_by_a_finalizer_still_stops_generation(tmp_path: Path, monkeypatch) -> None:
    """Python drops a KeyboardInterrupt raised inside __del__; the shard loop must raise it again."""
    class Finalizer:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):     # the handler runs between bytecodes, here inside __del__
                pass

    written: list[str] = []

    def fake_render(espeak, job, speakers) -> np.ndarray:
        written.append(job.relpath)
        if len(written) == 1:
            Finalizer()               # created and finalized at once: Ctrl-C lands in __del__
        return np.zeros(160, dtype=np.float32)

    monkeypatch.setattr(synthetic, "render_job", fake_render)
    jobs = [types.SimpleNamespace(relpath=f"yes/clip{i}.wav") for i in range(5)]
    (tmp_path / "yes").mkdir()
    with pytest.raises(KeyboardInterrupt):
        synthetic._render_shard((str(tmp_path), jobs, []))
    assert written == ["yes/clip0.wav"], "generation went on after Ctrl-C"
