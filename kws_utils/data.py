"""Data: reading audio, the MLPerf kws01 benchmark files, and the Speech Commands v2 dataset.

The 12 MLPerf Tiny classes (config.LABELS): the 10 keywords, silence and unknown (the other 25
words). Train/validation come from the main folder: validation = validation_list.txt, train =
every clip in neither list (testing_list.txt clips are the test speakers' and are used for
neither); silence = 1 s cuts of the background recordings. Test = the official balanced test set
folder (speech_commands_test_set_v0.02: one folder per keyword plus _silence_ and _unknown_).
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import os
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from torch.utils.data import WeightedRandomSampler

from kws_utils import config, files, holdout, progress, synthetic
from kws_utils.files import atomic_path
from kws_utils.errors import (FileFormatError, InputError, InputTypeError, KWSError,
                              MissingFileError)

KWS01_SCALE = 0.5847029   # input scale of the MLPerf reference TFLite model
KWS01_ZERO_POINT = 83


class AudioError(FileFormatError):
    """A wav file that cannot be used as a clip (corrupt, truncated, empty, non-finite)."""


def _check_sample_rate(sample_rate: object) -> int:
    """The target sample rate as an int, or a clear error unless it is a positive whole number."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InputTypeError(f"sample_rate={sample_rate!r}: give the rate in Hz as a whole number "
                             f"(e.g. {config.SAMPLE_RATE}).")
    if not 1 <= sample_rate <= 1_000_000:
        raise InputError(f"sample_rate={sample_rate}: a sample rate must be a positive number of "
                         f"Hz (e.g. {config.SAMPLE_RATE}).")
    return int(sample_rate)


def load_audio(path: str | Path, sample_rate: int = config.SAMPLE_RATE) -> np.ndarray:
    """Read a wav file as mono int16 at ``sample_rate`` (resampled, mixed down), any length."""
    sample_rate = _check_sample_rate(sample_rate)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such audio file. Check the path (or prepare the "
                               "dataset again).")
    try:
        # float64 reads every subtype (int, float, u-law...) at its true level in [-1, 1].
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable wav file ({err}). Delete it or re-extract the "
                         "dataset archive.") from err
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples. Delete it or re-extract the dataset.")
    if data.shape[1] > 2:
        raise AudioError(f"{path}: {data.shape[1]} channels; the course reads mono or stereo "
                         "clips. Mix it down to mono first (e.g. with sox or audacity).")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: holds NaN or infinite samples, so it has no defined level. "
                         "Re-export the recording or delete it.")
    peak = float(np.abs(data).max())
    if peak > 1.0:
        raise AudioError(f"{path}: float samples reach {peak:.3g}, beyond full scale (1.0), so "
                         "they cannot become int16 without clipping. Normalise it to [-1, 1].")
    _check_not_truncated(path, data.shape[0])
    mono = data.mean(axis=1) * 32768.0
    if rate != sample_rate:
        gcd = np.gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // gcd, rate // gcd)
    return np.clip(np.round(mono), -32768, 32767).astype(np.int16)


def _declared_wav_frames(path: Path) -> tuple[int, int] | None:
    """(bytes the WAV header promises for the samples, bytes present), or None if not a WAV."""
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                return length, size - fh.tell()
            fh.seek(length + (length & 1), os.SEEK_CUR)


def _check_not_truncated(path: Path, frames: int) -> None:
    """Refuse a WAV cut short (libsndfile quietly returns just the part that is there)."""
    sizes = _declared_wav_frames(path)
    # 0 and 0xFFFFFFFF mean "unknown length" (written by streaming recorders): nothing to check.
    if sizes is None or sizes[0] in (0, 0xFFFFFFFF):
        return
    declared, present = sizes
    if present < declared:
        raise AudioError(f"{path}: truncated wav (header promises {declared} bytes of samples, "
                         f"only {present} present, {frames} frames readable). The download or "
                         "extraction was interrupted: delete the dataset folder and prepare it "
                         "again.")


def fix_length(wave: np.ndarray, length: int = config.CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad a shorter clip at the end or crop a longer one to ``length`` samples."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise InputError(f"length={length!r}: give the clip length as a positive whole number of "
                         f"samples (e.g. {config.CLIP_SAMPLES}).")
    wave = np.asarray(wave)
    if wave.ndim == 0:
        raise InputError("wave is a single number: pass a clip (T,) or a batch of clips (N, T).")
    if wave.shape[-1] >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
    return np.pad(wave, pad)


def load_kws01(folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the EEMBC/MLPerf kws01 files: float MFCC (N, 1, 49, 10), labels (N,), file names."""
    if folder is None:
        from kws_utils import mlperf   # imported here: mlperf downloads with this module's code
        folder = mlperf.kws01_dir()
    folder = Path(folder)
    labels_csv = folder / "y_labels.csv"
    if not labels_csv.is_file():
        raise MissingFileError(f"{labels_csv} not found: point to the kws01 folder of the MLPerf "
                                "artifacts (KWS_MLPERF_DIR), which holds y_labels.csv and the .bin files.")
    names, labels, feats, first_label = [], [], [], {}
    # utf-8-sig: a byte order mark (Excel's "CSV UTF-8") is not part of the first file name
    with labels_csv.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if not row or (parsed := _kws01_row(labels_csv, line, row)) is None:
                continue
            name, label = parsed
            if name in first_label:
                raise FileFormatError(f"{labels_csv} line {line}: {name} is listed a second time "
                                      f"(first with label {first_label[name]}); each file must "
                                      "appear once. Copy the kws01 folder again.")
            first_label[name] = label
            if not (folder / name).is_file():
                raise MissingFileError(f"{folder / name}: named in {labels_csv} line {line} but "
                                       "missing; copy the complete kws01 folder again.")
            raw = (folder / name).read_bytes()
            if len(raw) != config.N_FRAMES * config.N_MFCC:
                raise FileFormatError(f"{folder / name}: {len(raw)} bytes, expected "
                                 f"{config.N_FRAMES * config.N_MFCC} (49 x 10 int8 MFCC).")
            feats.append(np.frombuffer(raw, dtype=np.int8))
            labels.append(label)
            names.append(name)
    if not feats:
        raise FileFormatError(f"{labels_csv} lists no inputs: copy the complete kws01 folder "
                              "(y_labels.csv with one row per .bin file).")
    q = torch.from_numpy(np.stack(feats).astype(np.float32))
    x = ((q - KWS01_ZERO_POINT) * KWS01_SCALE).reshape(-1, *config.INPUT_SHAPE)
    holdout.register_test_inputs(x, "MLPerf kws01")   # real test clips: scoring only
    return x, torch.tensor(labels, dtype=torch.long), names


def _kws01_row(labels_csv: Path, line: int, row: list[str]) -> tuple[str, int] | None:
    """(file name, label) of one y_labels.csv row; None for a header row on line 1."""
    fields = [field.strip() for field in row]
    if len(fields) < 3 or not fields[0]:
        raise FileFormatError(f"{labels_csv} line {line}: {row} has missing fields; each row "
                              "must be 'file name, 12, label'. Copy the kws01 folder again.")
    try:
        n_classes, label = int(fields[1]), int(fields[2])
    except ValueError:
        if line == 1:
            return None    # a column header such as "file,classes,label"
        raise FileFormatError(f"{labels_csv} line {line}: {row} holds no integer class count "
                              "and label; each row must be 'file name, 12, label'.") from None
    if n_classes != len(config.LABELS) or not 0 <= label < n_classes:
        raise FileFormatError(f"{labels_csv} line {line}: row {row} is not a 12-class kws01 "
                              "label (expected 12 classes and a label 0-11).")
    return fields[0], label


# =============================================================================== the dataset
# Archives and their checksums, from TensorFlow Datasets' record of them
# (tensorflow/datasets: tensorflow_datasets/url_checksums/speech_commands.txt).
TRAIN_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
TRAIN_SHA256 = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
TRAIN_BYTES = 2_428_923_189
TEST_URL = "http://download.tensorflow.org/data/speech_commands_test_set_v0.02.tar.gz"
TEST_SHA256 = "cc2a00c1147c2254e9be3fa0f779d8c17421dc349b86366567a8edfa9acd51df"
TEST_BYTES = 112_563_277
DOWNLOAD_TIMEOUT_S = 30
LABEL_INDEX = {label: i for i, label in enumerate(config.LABELS)}
TEST_FOLDERS = {**{w: LABEL_INDEX[w] for w in config.KEYWORDS},
                config.TEST_SILENCE_DIR: config.SILENCE_INDEX,
                config.TEST_UNKNOWN_DIR: config.UNKNOWN_INDEX}


class DatasetError(KWSError, RuntimeError):
    """A dataset folder that is missing, incomplete or not in the Speech Commands layout."""


class DownloadError(DatasetError):
    """A download that failed or did not match its checksum (nothing usable was kept)."""


class NetworkUnavailable(DownloadError):
    """The server could not be reached at all (offline machine, DNS, firewall)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Which dataset the course uses and where its two folders are."""

    kind: str              # "real" or "synthetic"
    train_dir: Path        # speech_commands_v0.02 layout (train/validation + noise)
    test_dir: Path         # speech_commands_test_set_v0.02 layout (balanced test set)
    description: str


@dataclass(frozen=True)
class Clip:
    """One example: a wav file and its label; ``offset`` marks a 1 s cut of a long recording."""

    path: str
    label: int
    offset: int | None = None    # sample offset into a background recording, else None


# ----------------------------------------------------------------------------- download
def _offline_help(url: str, err: object) -> str:
    """What to do when the dataset server cannot be reached."""
    return (f"Could not reach {url} ({err}). This machine seems to have no internet access. "
            "Either set KWS_DATASET=synthetic to use the generated offline dataset (synthetic "
            "speech, same layout), or download speech_commands_v0.02.tar.gz and "
            "speech_commands_test_set_v0.02.tar.gz on another machine, extract each into its own "
            "folder, and set KWS_DATA_DIR and KWS_TEST_DIR to those folders.")


def _fetch(url: str, part: Path, size: int | None, show_progress: bool = True) -> str:
    """Stream ``url`` into ``part`` with a progress bar; return the SHA-256 of what arrived."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: the server answered {err.code} {err.reason}.") from err
    except (urllib.error.URLError, OSError) as err:
        raise NetworkUnavailable(_offline_help(url, err)) from err
    digest, received = hashlib.sha256(), 0
    expected = size or int(response.headers.get("Content-Length") or 0) or None
    try:
        with response, part.open("wb") as out, \
                progress.bar(total=expected, unit="B", unit_scale=True, desc=Path(url).name,
                             disable=not show_progress) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"{url}: the download broke off after {received} bytes ({err!r}). "
                            "Run again to restart it.") from err
    if expected is not None and received != expected:
        raise DownloadError(f"{url}: the download stopped after {received} of {expected} bytes.")
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, size: int | None = None,
             show_progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via a temporary name, renamed into place only if verified."""
    dest, sha256 = Path(dest), _check_sha256(sha256)
    if not isinstance(url, str) or url.split("://", 1)[0] not in ("http", "https", "ftp", "file"):
        raise InputError(f"url={url!r}: give a full address starting with https:// or http://.")
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    # atomic_path deletes the temporary file on any error (even Ctrl-C), so nothing that could
    # pass as complete is ever left behind.
    with atomic_path(dest) as part:
        digest = _fetch(url, part, size, show_progress)
        if digest != sha256:
            raise DownloadError(f"{url}: checksum mismatch (got sha256 {digest}, expected "
                                f"{sha256}). The file was deleted; try again later.")
    return dest


def _check_sha256(sha256: object) -> str:
    """The expected checksum in lower case, or a clear error unless it is 64 hex digits."""
    text = sha256.strip().lower() if isinstance(sha256, str) else ""
    if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
        raise InputError(f"sha256={sha256!r}: give the file's SHA-256 checksum as 64 hex digits.")
    return text


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- extraction
def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Reject archive members that would land outside ``root`` or are not plain files/folders."""
    target = (root / member.name).resolve()
    if member.name.startswith("/") or not target.is_relative_to(root.resolve()):
        raise DatasetError(f"unsafe archive member {member.name!r} (outside the target folder); "
                           "the archive is not a genuine Speech Commands file. Delete it.")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"unexpected archive member {member.name!r} (a link or device); "
                           "the archive is not a genuine Speech Commands file. Delete it.")


def extract(archive: Path, target: Path, marker: dict) -> Path:
    """Safely extract a tar archive into ``target`` via a temp folder, marker written last."""
    target = Path(target)
    if not Path(archive).is_file():
        raise MissingFileError(f"{archive}: no such archive; download it first.")
    with files.folder_lock(target):
        return _extract_locked(Path(archive), target, marker)


def _extract_locked(archive: Path, target: Path, marker: dict) -> Path:
    """extract() while holding the target's lock file."""
    synthetic.check_replaceable(target)    # never delete or rename what the course did not make
    partial = synthetic.fresh_partial(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, partial)
            tar.extractall(partial, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(f"{archive}: cannot be extracted ({err}); delete it and download "
                           "again.") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        synthetic.finish_folder(partial, target, dict(marker))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- validation
def _subfolders(folder: Path) -> set[str]:
    """Names of the sub-folders of ``folder``."""
    return {entry.name for entry in os.scandir(folder) if entry.is_dir()}


def _check_marker(folder: Path, require_marker: bool, what: str) -> None:
    """Raise unless ``folder`` exists, is not empty and (if required) carries a complete marker."""
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist.")
    if not any(folder.iterdir()):
        raise DatasetError(f"{what} folder {folder} is empty. Delete it and run again to "
                           "download/generate it, or point KWS_DATA_DIR/KWS_TEST_DIR elsewhere.")
    if require_marker and synthetic.read_marker(folder) is None:
        raise DatasetError(
            f"{what} folder {folder} has no completion marker ({config.COMPLETE_MARKER}): its "
            "download, extraction or generation did not finish. Delete the folder and run again. "
            "If you extracted it yourself, set KWS_DATA_DIR / KWS_TEST_DIR to it instead.")


def validate_train_dir(folder: Path, require_marker: bool = True) -> None:
    """Raise DatasetError unless ``folder`` is a complete Speech Commands v2 style folder."""
    folder = Path(folder)
    _check_marker(folder, require_marker, "Speech Commands")
    subfolders = _subfolders(folder)
    missing = [w for w in (*config.ALL_WORDS, config.BACKGROUND_NOISE_DIR) if w not in subfolders]
    if missing:
        raise DatasetError(f"{folder} lacks the folders {missing}: not a complete Speech Commands "
                           "v2 folder (half extracted?). Delete it and prepare it again.")
    unexpected = sorted(subfolders - {*config.ALL_WORDS, config.BACKGROUND_NOISE_DIR})
    if unexpected:
        raise DatasetError(f"{folder} holds unexpected folders {unexpected}; their clips would "
                           "get no sensible label. Remove them or use a clean copy.")
    for name in ("validation_list.txt", "testing_list.txt"):
        if not (folder / name).is_file():
            raise DatasetError(f"{folder} lacks {name}, so the official splits are unknown. "
                               "Delete the folder and prepare it again.")
    if not any((folder / config.BACKGROUND_NOISE_DIR).glob("*.wav")):
        raise DatasetError(f"{folder / config.BACKGROUND_NOISE_DIR} holds no recordings, so there "
                           "is no silence class. Delete the folder and prepare it again.")
    for path in (folder / config.BACKGROUND_NOISE_DIR).glob("*.wav"):
        _check_noise_length(path)


def _check_noise_length(path: Path) -> None:
    """Refuse a background recording too short to cut one 1 s silence clip from."""
    try:
        frames = _noise_frames(path)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise AudioError(f"{path}: not a readable wav file ({err}). Replace or delete it.") from None
    if frames < config.CLIP_SAMPLES:
        raise AudioError(f"{path}: {frames} samples, shorter than one 1 s silence clip "
                         f"({config.CLIP_SAMPLES}); use longer background recordings or delete it.")


def validate_test_dir(folder: Path, require_marker: bool = True) -> None:
    """Raise DatasetError unless ``folder`` is a complete balanced test set (12 class folders)."""
    folder = Path(folder)
    _check_marker(folder, require_marker, "Test set")
    subfolders = _subfolders(folder)
    missing = [name for name in TEST_FOLDERS if name not in subfolders]
    empty = [name for name in TEST_FOLDERS if name in subfolders and not _wav_files(folder / name)]
    if missing or empty:
        raise DatasetError(f"{folder}: class folders missing {missing} or empty {empty}; not a "
                           "complete speech_commands_test_set_v0.02 folder. Delete it and prepare "
                           "it again.")
    unexpected = sorted(subfolders - set(TEST_FOLDERS))
    if unexpected:
        raise DatasetError(f"{folder} holds unexpected folders {unexpected}; their clips would "
                           "get no sensible label. Remove them or use a clean copy.")


# ----------------------------------------------------------------------------- choosing
def _user_dir(variable: str) -> bool:
    """True if the user pointed to an existing copy through an environment variable."""
    return bool(os.environ.get(variable))


def _prepare_real_folder(folder: Path, url: str, sha256: str, size: int | None, variable: str,
                         validate: Callable[..., None]) -> None:
    """Make one real folder ready: check a user copy, or download and extract ours."""
    if _user_dir(variable):
        # A copy the user vouches for has no marker of ours; check its layout instead.
        validate(folder, require_marker=False)
        return
    if not synthetic.is_complete(folder, {"kind": "real", "sha256": sha256}):
        if folder.exists():
            _check_marker(folder, True, "Speech Commands")     # explains what is wrong
        archive = download(url, config.data_root() / "downloads" / Path(url).name, sha256, size)
        extract(archive, folder, {"kind": "real", "url": url, "sha256": sha256})
        archive.unlink()    # 2.4 GB; the extracted folder's marker records its checksum
    validate(folder)


def prepare_real() -> tuple[Path, Path]:
    """The real train and test folders, downloaded and extracted first if needed."""
    train, test = config.real_data_dir(), config.real_test_dir()
    _prepare_real_folder(train, TRAIN_URL, TRAIN_SHA256, TRAIN_BYTES, "KWS_DATA_DIR",
                         validate_train_dir)
    return train, prepare_real_test()


def prepare_real_test() -> Path:
    """Only the official test set (112 MB), downloaded and extracted first if needed."""
    _prepare_real_folder(config.real_test_dir(), TEST_URL, TEST_SHA256, TEST_BYTES, "KWS_TEST_DIR",
                         validate_test_dir)
    return config.real_test_dir()


def real_ready() -> bool:
    """True if both real folders are present and complete (no download needed)."""
    try:
        validate_train_dir(config.real_data_dir(), require_marker=not _user_dir("KWS_DATA_DIR"))
        validate_test_dir(config.real_test_dir(), require_marker=not _user_dir("KWS_TEST_DIR"))
    except DatasetError:
        return False
    return True


def _real_info(train: Path, test: Path) -> DatasetInfo:
    """DatasetInfo for the real Speech Commands v2."""
    return DatasetInfo("real", train, test, "Google Speech Commands v2 (real recordings), cut to "
                       "the 12 MLPerf Tiny KWS classes; test = the official balanced test set.")


def _synthetic_info(reason: str = "") -> DatasetInfo:
    """Generate (if needed) and describe the synthetic dataset of the active profile."""
    prof = config.profile()
    recipe = synthetic.Recipe(tts_voices=prof.tts_voices)
    train, test = synthetic.ensure_synthetic(config.synthetic_data_dir(),
                                             config.synthetic_test_dir(), prof.synth_speakers,
                                             prof.synth_test_per_class, config.SEED, recipe=recipe)
    validate_train_dir(train)
    validate_test_dir(test)
    voices = ("espeak-ng speech" if not recipe.tts_share else
              f"espeak-ng speech and {recipe.tts_voices} neural TTS voices (Kokoro-82M) for "
              f"{recipe.tts_share:.0%} of the training speakers")
    if recipe.tts_share and recipe.tts_other_words < len(synthetic.AUX_WORDS):
        voices += f" (each voice says the keywords and {recipe.tts_other_words} of the other words)"
    text = (f"SYNTHETIC stand-in for Speech Commands v2: {voices}, {prof.synth_speakers} "
            f"synthetic speakers (profile '{prof.name}', seed {config.SEED}), same folder layout "
            "and 12 MLPerf Tiny classes.")
    return DatasetInfo("synthetic", train, test, f"{text} {reason}".strip())


def ensure_dataset() -> DatasetInfo:
    """The dataset chosen by KWS_DATASET, made ready; artifacts then go to its own folder."""
    info = _resolve_dataset()
    config.set_active_dataset(info.kind)
    return info


def _resolve_dataset() -> DatasetInfo:
    """The dataset chosen by KWS_DATASET, made ready (downloaded, extracted or generated)."""
    choice = config.dataset_choice()
    if choice == "synthetic":
        return _synthetic_info()
    if choice == "real" or real_ready():
        return _real_info(*prepare_real())
    try:
        return _real_info(*prepare_real())
    except NetworkUnavailable as err:
        reason = f"(KWS_DATASET=auto fell back to it: the real data could not be downloaded: {err})"
        rule = "!" * 78
        print(f"{rule}\n!!! No network: using the SYNTHETIC offline dataset instead of the real "
              f"Speech Commands.\n!!! {err}\n{rule}")
        return _synthetic_info(reason)


def banner(info: DatasetInfo) -> str:
    """The dataset notice every notebook prints, so no result is read with the wrong data."""
    lines = [f"Dataset: {info.description}",
             f"  train/validation: {info.train_dir}", f"  test:             {info.test_dir}"]
    if info.kind == "synthetic":
        rule = "=" * 78
        lines = [rule, "SYNTHETIC DATA (text-to-speech voices, generated offline)", *lines,
                 "Accuracy on this data is NOT comparable with MLPerf Tiny / Speech Commands "
                 "figures.",
                 "For real results: KWS_DATASET=real (downloads 2.5 GB) or set KWS_DATA_DIR and "
                 "KWS_TEST_DIR.", rule]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- splits
def _read_list(path: Path) -> set[str]:
    """The relative clip paths of a split list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); use the "
                           "list file of the original dataset (one clip path per line).") from None
    return {line.strip() for line in text.splitlines() if line.strip()}


def word_label(word: str) -> int:
    """The MLPerf class of a Speech Commands word: itself if a keyword, else unknown."""
    return LABEL_INDEX[word] if word in config.KEYWORDS else config.UNKNOWN_INDEX


def _speech_files(root: Path) -> dict[str, str]:
    """Every word clip of a train folder, as relative path -> word."""
    files = {}
    for word in config.ALL_WORDS:
        for entry in os.scandir(root / word):
            if entry.name.lower().endswith(".wav"):
                files[f"{word}/{entry.name}"] = word
    return files


def _noise_frames(path: Path) -> int:
    """Length of a background recording in samples at the course's sample rate."""
    info = sf.info(str(path))
    return info.frames * config.SAMPLE_RATE // info.samplerate


def silence_clips(root: Path) -> dict[str, list[Clip]]:
    """1 s silence segments cut from the background recordings, per split."""
    # As TFDS (used by the MLPerf Tiny reference): a cut every 0.5 s, and one whole recording
    # (running_tap) kept for validation so no validation segment overlaps a training one. That
    # gives about 600 training segments for the real data, a fifth of a keyword class; the
    # balanced sampler / class weights make up for the difference.
    out: dict[str, list[Clip]] = {"train": [], "validation": []}
    for path in sorted((root / config.BACKGROUND_NOISE_DIR).glob("*.wav")):
        split = "validation" if path.name == config.VALIDATION_NOISE_FILE else "train"
        _check_noise_length(path)
        last = _noise_frames(path) - config.CLIP_SAMPLES
        out[split] += [Clip(str(path), config.SILENCE_INDEX, offset)
                       for offset in range(0, last + 1, config.SILENCE_HOP)]
    return out


def _wav_files(folder: Path) -> list[Path]:
    """The wav files of a folder, sorted; the extension in any case (.wav, .WAV)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file())


def test_clips(folder: Path) -> list[Clip]:
    """The balanced test set: the class is the folder name (keyword, _silence_, _unknown_)."""
    clips = []
    for name, label in TEST_FOLDERS.items():
        clips += [Clip(str(path), label) for path in _wav_files(folder / name)]
    return clips


def splits(info: DatasetInfo) -> dict[str, list[Clip]]:
    """Train, validation and test clips of the 12 MLPerf classes (see the module comments)."""
    root = Path(info.train_dir)
    validate_train_dir(root, require_marker=False)     # a clear error for a half-extracted folder
    files = _speech_files(root)
    validation, testing = (_read_list(root / f"{s}_list.txt") for s in ("validation", "testing"))
    unknown = sorted((validation | testing) - files.keys())
    if unknown:
        raise DatasetError(f"{root}: {len(unknown)} clips named in the split lists are missing "
                           f"(e.g. {unknown[0]}); the folder is incomplete. Prepare it again.")
    out: dict[str, list[Clip]] = {"train": [], "validation": []}
    for rel in sorted(files):
        # testing_list clips belong to the official test speakers: used for neither split.
        if rel not in testing:
            split = "validation" if rel in validation else "train"
            out[split].append(Clip(str(root / rel), word_label(files[rel])))
    for split, clips in silence_clips(root).items():
        out[split] += clips
    out["test"] = test_clips(Path(info.test_dir))
    return out


# ----------------------------------------------------------------------------- loading
def load_clips(clips: list[Clip], desc: str = "loading clips") -> np.ndarray:
    """Read clips as int16 (N, 16000): 1 s, zero-padded/cropped; silence cuts from recordings."""
    out = np.zeros((len(clips), config.CLIP_SAMPLES), dtype=np.int16)
    recordings: dict[str, np.ndarray] = {}     # each long background file is read once
    for i, clip in enumerate(progress.bar(clips, desc=desc, unit="clip")):
        if clip.offset is None:
            out[i] = fix_length(load_audio(clip.path))
            continue
        if clip.path not in recordings:
            recordings[clip.path] = load_audio(clip.path)
        segment = recordings[clip.path][clip.offset:clip.offset + config.CLIP_SAMPLES]
        if segment.size < config.CLIP_SAMPLES:
            raise AudioError(f"{clip.path}: offset {clip.offset} is past the end of the recording "
                             f"({recordings[clip.path].size} samples); the file changed since the "
                             "splits were built.")
        out[i] = segment
    return out


def noise_bank(info: DatasetInfo, include_validation: bool = False) -> list[np.ndarray]:
    """The background recordings as float32 in [-1, 1] (x / 32768), for noise augmentation."""
    # By default the recording reserved for validation silence is left out, so augmentation
    # never shows training the noise that validation calls silence.
    folder = Path(info.train_dir) / config.BACKGROUND_NOISE_DIR
    return [load_audio(path).astype(np.float32) / 32768 for path in sorted(folder.glob("*.wav"))
            if include_validation or path.name != config.VALIDATION_NOISE_FILE]


# ----------------------------------------------------------------------------- balance
def class_counts(clips: list[Clip]) -> np.ndarray:
    """Number of clips of each of the 12 classes, in config.LABELS order."""
    labels = [clip.label for clip in clips]
    bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, (int, np.integer))
           or not 0 <= label < len(config.LABELS)]
    if bad:
        raise InputError(f"clips hold label {bad[0]!r}: a label must be a class index 0.."
                         f"{len(config.LABELS) - 1} (config.LABELS). Build the clips with data.splits.")
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(config.LABELS))


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (for a weighted loss)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (len(config.LABELS),):
        raise InputError(f"counts has shape {counts.shape}: give one count per class "
                         f"({len(config.LABELS)},), e.g. data.class_counts(clips).")
    if (counts <= 0).any():
        empty = [config.LABELS[i] for i in np.nonzero(counts <= 0)[0]]
        raise InputError(f"classes {empty} have no clips: a split without them cannot be "
                         "weighted (wrong dataset folder?).")
    weights = 1.0 / counts
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def weighted_sampler(clips: list[Clip], generator: torch.Generator | None = None
                     ) -> WeightedRandomSampler:
    """A sampler drawing every class equally often (with replacement), one epoch = len(clips)."""
    if len(clips) == 0:
        raise InputError("clips is empty: a sampler needs at least one clip (check the split).")
    counts = class_counts(clips)
    per_clip = 1.0 / counts[[clip.label for clip in clips]]
    return WeightedRandomSampler(torch.as_tensor(per_clip, dtype=torch.double),
                                 num_samples=len(clips), replacement=True, generator=generator)
