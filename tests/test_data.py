"""Dataset preparation: download, extraction, validation, splits, loading, class balance."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kws_utils import config, data, synthetic

RATE = config.SAMPLE_RATE
# A hand-made miniature Speech Commands: speaker -> split, chosen freely (lists are explicit).
SPEAKERS = {"aaaa0001": "train", "aaaa0002": "train", "bbbb0001": "validation",
            "cccc0001": "testing"}
NOISE_SECONDS = 3


def _write(path: Path, wave: np.ndarray, rate: int = RATE) -> Path:
    """Write int16 samples as a PCM-16 wav, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.astype(np.int16), rate, subtype="PCM_16")
    return path


def _tone(value: int, n: int = RATE) -> np.ndarray:
    """A constant clip whose value identifies where it came from."""
    return np.full(n, value, dtype=np.int16)


def make_train_dir(root: Path) -> Path:
    """One clip per word and speaker; each clip's sample value encodes its word index."""
    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    for w, word in enumerate(config.ALL_WORDS):
        for speaker, split in SPEAKERS.items():
            rel = f"{word}/{speaker}_nohash_0.wav"
            _write(root / rel, _tone(w + 1, RATE - 100 * w))     # some shorter than 1 s
            if split != "train":
                lists[split].append(rel)
    for split, names in lists.items():
        (root / f"{split}_list.txt").write_text("\n".join(names) + "\n")
    for i, name in enumerate(("white_noise.wav", config.VALIDATION_NOISE_FILE)):
        _write(root / config.BACKGROUND_NOISE_DIR / name,
               np.arange(NOISE_SECONDS * RATE) % 1000 + 1000 * i)
    return root


def make_test_dir(root: Path, per_class: int = 3) -> Path:
    """A balanced test folder: ``per_class`` clips in each of the 12 class folders."""
    for name in data.TEST_FOLDERS:
        for j in range(per_class):
            _write(root / name / f"cccc0001_nohash_{j}.wav", _tone(j))
    return root


@pytest.fixture()
def info(tmp_path: Path) -> data.DatasetInfo:
    """A complete miniature dataset (with markers) and its DatasetInfo."""
    train = make_train_dir(tmp_path / "sc")
    test = make_test_dir(tmp_path / "sc_test")
    for folder in (train, test):
        (folder / config.COMPLETE_MARKER).write_text('{"kind": "test"}')
    return data.DatasetInfo("synthetic", train, test, "miniature")


# ----------------------------------------------------------------------------- splits
def test_split_labels_follow_mlperf_order(info: data.DatasetInfo) -> None:
    parts = data.splits(info)
    for clip in parts["train"] + parts["validation"]:
        if clip.offset is not None:
            assert clip.label == config.SILENCE_INDEX
            continue
        word = Path(clip.path).parent.name
        expected = config.LABELS.index(word) if word in config.KEYWORDS else config.UNKNOWN_INDEX
        assert clip.label == expected
    assert config.LABELS[0] == "down" and config.LABELS[9] == "yes"
    counts = data.class_counts(parts["train"])
    assert list(counts[:10]) == [2] * 10                  # two training speakers per keyword
    assert counts[config.UNKNOWN_INDEX] == 2 * 25


def test_splits_respect_lists_and_drop_testing_clips(info: data.DatasetInfo) -> None:
    parts = data.splits(info)
    speaker = {name: {Path(c.path).name.split("_nohash_")[0] for c in parts[name]
                      if c.offset is None} for name in ("train", "validation")}
    assert speaker["train"] == {"aaaa0001", "aaaa0002"}
    assert speaker["validation"] == {"bbbb0001"}         # the testing speaker is in neither


def test_silence_segments(info: data.DatasetInfo) -> None:
    parts = data.splits(info)
    per_file = (NOISE_SECONDS * RATE - config.CLIP_SAMPLES) // config.SILENCE_HOP + 1
    for split, file in (("train", "white_noise.wav"), ("validation", config.VALIDATION_NOISE_FILE)):
        silence = [c for c in parts[split] if c.label == config.SILENCE_INDEX]
        assert len(silence) == per_file
        assert {Path(c.path).name for c in silence} == {file}
        assert [c.offset for c in silence] == [i * config.SILENCE_HOP for i in range(per_file)]
    cut = data.load_clips([parts["train"][-1]])[0]
    whole = data.load_audio(parts["train"][-1].path)
    offset = parts["train"][-1].offset
    assert np.array_equal(cut, whole[offset:offset + config.CLIP_SAMPLES])


def test_test_split_is_balanced_by_folder(info: data.DatasetInfo) -> None:
    test = data.splits(info)["test"]
    assert list(data.class_counts(test)) == [3] * 12


def test_load_clips_pads_short_clips(info: data.DatasetInfo) -> None:
    clip = next(c for c in data.splits(info)["train"] if Path(c.path).parent.name == "zero")
    wave = data.load_clips([clip])[0]
    length = RATE - 100 * config.ALL_WORDS.index("zero")
    assert wave.shape == (config.CLIP_SAMPLES,) and wave.dtype == np.int16
    assert (wave[:length] == config.ALL_WORDS.index("zero") + 1).all() and not wave[length:].any()


def test_noise_bank_scale_and_validation_holdout(info: data.DatasetInfo) -> None:
    bank = data.noise_bank(info)
    assert len(bank) == 1 and bank[0].dtype == np.float32
    assert np.isclose(bank[0].max(), 999 / 32768)
    assert len(data.noise_bank(info, include_validation=True)) == 2


# ----------------------------------------------------------------------------- validation
def test_validation_errors_are_specific(tmp_path: Path, info: data.DatasetInfo) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DatasetError, match="empty"):
        data.validate_train_dir(empty)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.validate_test_dir(tmp_path / "nothing")
    (info.train_dir / config.COMPLETE_MARKER).unlink()
    with pytest.raises(data.DatasetError, match="completion marker"):
        data.validate_train_dir(info.train_dir)
    data.validate_train_dir(info.train_dir, require_marker=False)   # a user copy: layout only
    (info.train_dir / "testing_list.txt").unlink()
    with pytest.raises(data.DatasetError, match="testing_list.txt"):
        data.validate_train_dir(info.train_dir, require_marker=False)
    (info.train_dir / "marvin").rename(tmp_path / "marvin")
    with pytest.raises(data.DatasetError, match="marvin"):
        data.validate_train_dir(info.train_dir, require_marker=False)


def test_unexpected_folder_is_not_silently_labelled(info: data.DatasetInfo) -> None:
    _write(info.train_dir / "hello" / "x_nohash_0.wav", _tone(1))
    with pytest.raises(data.DatasetError, match="hello"):
        data.validate_train_dir(info.train_dir)
    _write(info.test_dir / "maybe" / "x.wav", _tone(1))
    with pytest.raises(data.DatasetError, match="maybe"):
        data.validate_test_dir(info.test_dir)


def test_list_naming_a_missing_clip_is_an_error(info: data.DatasetInfo) -> None:
    (info.train_dir / "yes" / "bbbb0001_nohash_0.wav").unlink()
    with pytest.raises(data.DatasetError, match="missing"):
        data.splits(info)


# ----------------------------------------------------------------------------- bad audio
def test_bad_audio_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(data.AudioError, match="not a readable"):
        data.load_audio(corrupt)
    good = _write(tmp_path / "good.wav", _tone(5))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:10_000])
    with pytest.raises(data.AudioError, match="truncated"):
        data.load_audio(truncated)
    empty = _write(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(data.AudioError, match="no samples"):
        data.load_audio(empty)


def test_resampling_stereo_and_length(tmp_path: Path) -> None:
    slow = _write(tmp_path / "8k.wav", _tone(1000, 4000), rate=8000)     # 0.5 s at 8 kHz
    assert data.load_audio(slow).shape == (8000,)
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([_tone(30000, 100), _tone(20000, 100)], 1), RATE,
             subtype="PCM_16")
    assert (data.load_audio(stereo) == 25000).all()                       # no int16 overflow
    long = _write(tmp_path / "long.wav", _tone(7, 3 * RATE))
    assert data.fix_length(data.load_audio(long)).shape == (config.CLIP_SAMPLES,)


# ----------------------------------------------------------------------------- download
def _tar_of(folder: Path, archive: Path) -> str:
    """Pack a folder's contents (without the folder itself, like the real archives); sha256."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname="./" + path.relative_to(folder).as_posix(), recursive=False)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        """Serves ``www``; ``cut.bin`` simulates a connection lost mid-download."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            """Serve from the test folder."""
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

        def do_GET(self) -> None:
            """Serve a file, or break off ``cut.bin`` early."""
            if self.path.endswith("/cut.bin"):      # promises 1000 bytes, sends 10, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"0123456789")
                return
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    thread.join(timeout=5)


def test_download_verifies_and_renames(server: tuple[str, Path], tmp_path: Path) -> None:
    url, www = server
    payload = b"speech" * 1000
    (www / "a.tar.gz").write_bytes(payload)
    dest = tmp_path / "dl" / "a.tar.gz"
    data.download(f"{url}/a.tar.gz", dest, hashlib.sha256(payload).hexdigest(), len(payload))
    assert dest.read_bytes() == payload and not list(dest.parent.glob("*.part"))
    file_dest = tmp_path / "dl2" / "a.tar.gz"
    data.download((www / "a.tar.gz").as_uri(), file_dest, hashlib.sha256(payload).hexdigest())
    assert file_dest.read_bytes() == payload


def test_checksum_mismatch_keeps_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, www = server
    (www / "a.tar.gz").write_bytes(b"not what we expect")
    dest = tmp_path / "dl" / "a.tar.gz"
    with pytest.raises(data.DownloadError, match="checksum"):
        data.download(f"{url}/a.tar.gz", dest, "0" * 64)
    assert not dest.exists() and not list(dest.parent.glob("*"))


def test_interrupted_download_keeps_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "dl" / "cut.bin"
    with pytest.raises(data.DownloadError):
        data.download(f"{url}/cut.bin", dest, "0" * 64)
    assert not dest.exists() and not list(dest.parent.glob("*"))


def test_no_network_says_what_to_do(tmp_path: Path) -> None:
    # Port 9 (discard) on localhost is closed here: as good as an offline machine.
    with pytest.raises(data.NetworkUnavailable, match="KWS_DATASET=synthetic"):
        data.download("http://127.0.0.1:9/x.tar.gz", tmp_path / "x.tar.gz", "0" * 64)


def test_extract_is_atomic_and_marked(tmp_path: Path) -> None:
    source = make_test_dir(tmp_path / "src")
    archive = tmp_path / "t.tar.gz"
    _tar_of(source, archive)
    target = data.extract(archive, tmp_path / "out", {"kind": "real", "sha256": "x"})
    data.validate_test_dir(target)
    assert synthetic.is_complete(target, {"kind": "real", "sha256": "x"})


@pytest.mark.parametrize("kind", ["escape", "symlink"])
def test_unsafe_member_rejected(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("../evil.txt" if kind == "escape" else "link")
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(member, io.BytesIO(b"") if kind == "escape" else None)
    with pytest.raises(data.DatasetError, match="archive member"):
        data.extract(archive, tmp_path / "out" / "target", {})
    assert not (tmp_path / "out" / "target").exists()
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_prepare_real_end_to_end_on_local_archives(server: tuple[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, www = server
    train_sha = _tar_of(make_train_dir(tmp_path / "src_train"), www / "train.tar.gz")
    test_sha = _tar_of(make_test_dir(tmp_path / "src_test"), www / "test.tar.gz")
    for name, value in (("TRAIN_URL", f"{url}/train.tar.gz"), ("TRAIN_SHA256", train_sha),
                        ("TEST_URL", f"{url}/test.tar.gz"), ("TEST_SHA256", test_sha),
                        ("TRAIN_BYTES", None), ("TEST_BYTES", None)):
        monkeypatch.setattr(data, name, value)
    for var in ("KWS_DATA_DIR", "KWS_TEST_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KWS_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("KWS_DATASET", "real")
    info = data.ensure_dataset()
    assert info.kind == "real" and data.real_ready()
    assert len(data.splits(info)["test"]) == 36
    assert not list((tmp_path / "root" / "downloads").glob("*"))      # archives removed


def test_auto_falls_back_to_synthetic_when_offline(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(data, "TRAIN_URL", "http://127.0.0.1:9/train.tar.gz")
    monkeypatch.setattr(data, "_synthetic_info",
                        lambda reason="": data.DatasetInfo("synthetic", tmp_path, tmp_path, reason))
    for var in ("KWS_DATA_DIR", "KWS_TEST_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KWS_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("KWS_DATASET", "auto")
    info = data.ensure_dataset()
    assert info.kind == "synthetic" and "fell back" in info.description
    assert "SYNTHETIC" in capsys.readouterr().out
    monkeypatch.setenv("KWS_DATASET", "real")
    with pytest.raises(data.NetworkUnavailable):
        data.ensure_dataset()


def test_banner_flags_synthetic_data() -> None:
    text = data.banner(data.DatasetInfo("synthetic", Path("a"), Path("b"), "generated"))
    assert "SYNTHETIC" in text and "text-to-speech" in text and "NOT comparable" in text
    assert "SYNTHETIC" not in data.banner(data.DatasetInfo("real", Path("a"), Path("b"), "real"))


# ----------------------------------------------------------------------------- balance
def test_class_weights_inverse_frequency_mean_one() -> None:
    counts = np.array([10] * 10 + [5, 40])
    weights = data.class_weights(counts)
    assert torch.isclose(weights.mean(), torch.tensor(1.0))
    assert torch.isclose(weights[10] / weights[0], torch.tensor(2.0))
    assert torch.isclose(weights[0] / weights[11], torch.tensor(4.0))
    with pytest.raises(ValueError, match="silence"):
        data.class_weights(np.array([10] * 10 + [0, 40]))


def test_weighted_sampler_balances_classes() -> None:
    clips = [data.Clip(f"{i}.wav", label) for i, label in
             enumerate([0] * 50 + list(range(1, 11)) * 20 + [11] * 2000)]
    sampler = data.weighted_sampler(clips, torch.Generator().manual_seed(0))
    drawn = data.class_counts([clips[i] for i in sampler])
    assert len(list(sampler)) == len(clips)
    share = drawn / drawn.sum()
    assert np.allclose(share, 1 / 12, atol=0.02)


# ----------------------------------------------------------------------------- kws01
def _write_kws01(folder: Path, rows: list[tuple[str, int, int]], size: int = 490) -> Path:
    """A miniature kws01 folder: y_labels.csv plus one int8 .bin per row."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "y_labels.csv").write_text("".join(f"{n},{k},{label}\n" for n, k, label in rows))
    for i, (name, _, _) in enumerate(rows):
        (folder / name).write_bytes(np.full(size, i - 1, dtype=np.int8).tobytes())
    return folder


def test_load_kws01_dequantizes_frame_major(tmp_path: Path) -> None:
    folder = _write_kws01(tmp_path, [("a.bin", 12, 3), ("b.bin", 12, 11)])
    x, y, names = data.load_kws01(folder)
    assert x.shape == (2, 1, 49, 10) and y.tolist() == [3, 11] and names == ["a.bin", "b.bin"]
    assert torch.allclose(x[0], torch.full((1, 49, 10), (-1 - data.KWS01_ZERO_POINT) * data.KWS01_SCALE))


def test_load_kws01_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="y_labels.csv"):
        data.load_kws01(tmp_path / "missing")
    with pytest.raises(ValueError, match="490"):
        data.load_kws01(_write_kws01(tmp_path / "short", [("a.bin", 12, 0)], size=400))
    with pytest.raises(ValueError, match="12-class"):
        data.load_kws01(_write_kws01(tmp_path / "label", [("a.bin", 12, 12)]))


@pytest.mark.skipif(not (config.mlperf_dir() / "kws01").is_dir(), reason="MLPerf kws01 not present")
def test_real_kws01_set() -> None:
    x, y, names = data.load_kws01()
    assert x.shape == (1000, 1, 49, 10) and len(names) == 1000
    assert all(int(n.rsplit("_", 1)[1].split(".")[0]) == label for n, label in zip(names, y.tolist()))
