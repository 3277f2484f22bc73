"""Real speech without the 2.3 GB training set: the official test set, real noise, calibration clips.

Three sources of real Speech Commands audio, each found on its own, so that models trained on the
offline dataset are still scored on real voices:

* the **official v0.02 test set** (4,890 clips): ``KWS_TEST_DIR``, the real dataset's own copy,
  ``../shared/speech_commands``, else a download of only the test archive (112 MB, SHA-256 checked).
  It is for scoring only: nothing is calibrated, fitted or chosen on it.
* the six **background-noise recordings** (``_background_noise_``).
* **calibration clips** of speakers outside the test set: the real validation split when the real
  dataset is present, else the small real pool in ``../shared/speech_commands/real_calibration_pool``;
  calibration adds silence cuts of the training noise recordings, as the test set has a silence class.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from kws_utils import config, data, features, holdout, training
from kws_utils.errors import InputError

POOL_DIR = "real_calibration_pool"
TEST_DIR = "speech_commands_test_set_v0.02"
TEST_NAME = "official Speech Commands v0.02 test set"
_SPEAKER = re.compile(r"^(?:[a-z]+_)?([0-9a-f]{8})_nohash_")


def shared_dir() -> Path:
    """The folder of real audio beside the repository (KWS_REAL_AUDIO_DIR overrides)."""
    return Path(os.environ.get("KWS_REAL_AUDIO_DIR") or config.REPO_ROOT.parent / "shared" / "speech_commands")


def _valid_test_dir(folder: Path, require_marker: bool) -> bool:
    """True if ``folder`` is a complete official-layout test set."""
    try:
        data.validate_test_dir(folder, require_marker=require_marker)
    except data.DatasetError:
        return False
    return True


def test_dir(download: bool = True) -> Path | None:
    """The official test set folder, found or downloaded; None (with the reason printed) if absent."""
    if os.environ.get("KWS_TEST_DIR"):
        folder = Path(os.environ["KWS_TEST_DIR"])
        data.validate_test_dir(folder, require_marker=False)   # the user's copy: say what is wrong
        return folder
    if _valid_test_dir(config.real_test_dir(), require_marker=True):
        return config.real_test_dir()
    if _valid_test_dir(shared_dir() / TEST_DIR, require_marker=False):
        return shared_dir() / TEST_DIR
    if not download:
        print(f"SKIPPED: the {TEST_NAME} is not on this machine (KWS_TEST_DIR, "
              f"{config.real_test_dir()}, {shared_dir() / TEST_DIR}).")
        return None
    try:
        data.prepare_real_test()
    except data.DownloadError as err:
        print(f"SKIPPED: the {TEST_NAME} is not on this machine and could not be downloaded: {err}")
        return None
    return config.real_test_dir()


def available() -> bool:
    """True if the official test set is on this machine (no download tried)."""
    return bool(os.environ.get("KWS_TEST_DIR")) or any(
        _valid_test_dir(d, m) for d, m in ((config.real_test_dir(), True), (shared_dir() / TEST_DIR, False)))


def _features_of(clips: list[data.Clip], name: str) -> torch.Tensor:
    """MFCC of real clips, cached under the feature cache and keyed by the files and MFCC settings."""
    settings = json.dumps([training.FEATURE_VERSION, config.SAMPLE_RATE, config.FRAME_LENGTH,
                           config.FRAME_STEP, config.N_MELS, config.N_MFCC])
    key = hashlib.sha256((training.clips_fingerprint({name: clips}) + settings).encode()).hexdigest()[:12]
    path = config.data_root() / "feature_cache" / f"real_{name}_{key}.pt"
    return features.cached(path, lambda: features.compute_features(
        data.load_clips(clips, desc=f"load {name}"), desc=f"MFCC {name}"), (len(clips), *config.INPUT_SHAPE))


def test_set(download: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MFCC inputs and labels of the official test set, or None when it is unavailable."""
    folder = test_dir(download)
    if folder is None:
        return None
    clips = data.test_clips(folder)
    x = _features_of(clips, "official_test")
    holdout.register_test_inputs(x, TEST_NAME)
    return x, torch.tensor([c.label for c in clips])


def noise_dir() -> Path | None:
    """The six real background-noise recordings: the real dataset's, else the shared copy."""
    for folder in (config.real_data_dir() / config.BACKGROUND_NOISE_DIR,
                   shared_dir() / config.BACKGROUND_NOISE_DIR):
        if len(list(folder.glob("*.wav"))) >= 6:
            return folder
    return None


def speaker(path: str | Path) -> str | None:
    """The Speech Commands speaker id (8 hex digits) of a clip's file name, or None."""
    match = _SPEAKER.match(Path(path).name)
    return match.group(1) if match else None


def pool_clips() -> list[data.Clip]:
    """Real non-test clips for calibration: the real validation split if present, else the pool."""
    if data.real_ready():
        return [c for c in data.splits(data.DatasetInfo("real", config.real_data_dir(),
                                                        config.real_test_dir(), ""))["validation"]
                if c.offset is None]
    folder = shared_dir() / POOL_DIR
    if not folder.is_dir():
        return []
    return [data.Clip(str(path), data.word_label(path.parent.name))
            for path in sorted(folder.glob("*/*.wav")) if path.parent.name in config.ALL_WORDS]


def check_not_test(clips: list[data.Clip]) -> None:
    """Raise if any clip is a test clip or spoken by a speaker of the official test set."""
    folder = test_dir(download=False) if available() else None
    if folder is None:
        return
    test_paths = {Path(c.path).resolve() for c in data.test_clips(folder)}
    test_speakers = {speaker(p) for p in test_paths} - {None}
    bad = [c.path for c in clips if Path(c.path).resolve() in test_paths or speaker(c.path) in test_speakers]
    if bad:
        raise InputError(f"calibration clips include {len(bad)} test clips or test speakers (e.g. {bad[0]}): "
                         "calibrate on the validation split or the real calibration pool, never the test set.")


def pool_set() -> tuple[torch.Tensor, torch.Tensor] | None:
    """MFCC inputs and labels of every real non-test clip (pool_clips), or None if there are none."""
    clips = pool_clips()
    if not clips:
        print(f"SKIPPED: no real calibration clips ({shared_dir() / POOL_DIR} is absent).")
        return None
    check_not_test(clips)
    return _features_of(clips, "calibration_pool"), torch.tensor([c.label for c in clips])


def calibration_subsets(n_subsets: int, size: int, seed: int = config.SEED,
                        copies: int = 0, silence: bool = True) -> list[torch.Tensor]:
    """``n_subsets`` seeded draws of ``size`` real non-test clips (MFCC) + ``copies`` views + silence."""
    pool = pool_set()
    if pool is None:
        return []
    if not 0 < size <= len(pool[0]):
        raise InputError(f"size={size}: the real calibration pool holds {len(pool[0])} clips; "
                         f"choose 1..{len(pool[0])}.")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise InputError(f"copies={copies!r}: give the number of augmented copies per clip, a whole "
                         f"number >= 0 (config.CALIB_COPIES = {config.CALIB_COPIES}).")
    if not isinstance(silence, bool):
        raise InputError(f"silence={silence!r}: give True (add config.CALIB_SILENCE_SHARE of silence "
                         "cuts) or False (speech clips only).")
    picks = calibration_picks(n_subsets, size, len(pool[0]), seed)
    return [calibration_set(pick, copies, seed + i, silence) for i, pick in enumerate(picks)]


def calibration_set(picks: np.ndarray, copies: int, seed: int, silence: bool = True) -> torch.Tensor:
    """Pool clips ``picks`` (MFCC) + ``copies`` augmented views of each (time shift, real noise) + silence."""
    pool, clips = pool_set(), pool_clips()
    views = []
    if copies:   # made as training's views are
        waves = data.load_clips([clips[j] for j in picks], desc="load calibration clips")
        gen, noise = torch.Generator().manual_seed(seed), calibration_noise()
        views = [features.compute_features(waves, augment=(noise, gen), desc="MFCC augmented copies")
                 for _ in range(copies)]
    speech = torch.cat([pool[0][torch.as_tensor(picks)], *views])
    if silence:
        speech = torch.cat([speech, calibration_silence(silence_count(len(speech)), seed)])
    return speech


def calibration_picks(n_subsets: int, size: int, pool_size: int, seed: int = config.SEED) -> list[np.ndarray]:
    """The pool indices (sorted) of each seeded calibration subset of ``calibration_subsets``."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool_size, size, replace=False)) for _ in range(n_subsets)]


def silence_count(n_speech: int) -> int:
    """How many silence cuts join ``n_speech`` calibration inputs (config.CALIB_SILENCE_SHARE of the total)."""
    share = config.CALIB_SILENCE_SHARE
    return round(n_speech * share / (1 - share))


def describe_calibration(size: int, copies: int, silence: bool = True) -> str:
    """How result tables name a calibration subset of ``calibration_subsets``."""
    text = f"{size} real non-test clips"
    if copies:
        text += f" + {copies} augmented copies of each (time shift, real noise)"
    if silence:
        text += f" + {silence_count(size * (1 + copies))} silence cuts of the training noise recordings"
    return text


def calibration_silence(n: int, seed: int, cuts: list[data.Clip] | None = None) -> torch.Tensor:
    """MFCC of ``n`` seeded 1 s silence cuts (default: the training noise recordings' cuts)."""
    if cuts is None:
        folder = noise_dir()
        if folder is None:
            raise FileNotFoundError("silence calibration clips need the real background-noise recordings "
                                    f"({shared_dir() / config.BACKGROUND_NOISE_DIR}); pass silence=False "
                                    "without them.")
        cuts = data.silence_clips(folder.parent)["train"]     # the cuts training calls silence
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n={n!r}: give the number of silence cuts, a whole number >= 0.")
    if n and not cuts:
        raise InputError("cuts is empty: give silence cuts to draw from (data.silence_clips) or None.")
    pick = np.sort(np.random.default_rng(seed).choice(len(cuts), n, replace=n > len(cuts)))
    waves = data.load_clips([cuts[j] for j in pick], desc="load silence cuts")
    return features.compute_features(waves, desc="MFCC silence cuts")


def calibration_noise() -> list[np.ndarray]:
    """The real noise recordings (float, [-1, 1]) for augmented calibration copies, minus validation's."""
    folder = noise_dir()
    if folder is None:
        raise FileNotFoundError("augmented calibration copies need the real background-noise recordings "
                                f"({shared_dir() / config.BACKGROUND_NOISE_DIR}); pass copies=0 without them.")
    return data.noise_bank(data.DatasetInfo("real", folder.parent, folder.parent, ""))


def describe_test() -> str:
    """How result tables name the official test set."""
    return f"{TEST_NAME} (real speech, scoring only)"
