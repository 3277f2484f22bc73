"""The one place for every course setting: paths, profile, dataset choice, seeds, labels.

Each setting can be overridden with an environment variable, so the same notebooks run the full
course (default profile) and the quick CI check (``KWS_PROFILE=ci``) unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# MLPerf Tiny KWS label order (the reference model's output index is the position here).
LABELS: tuple[str, ...] = (
    "down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "silence", "unknown",
)
KEYWORDS: tuple[str, ...] = LABELS[:10]
SILENCE_INDEX = LABELS.index("silence")
UNKNOWN_INDEX = LABELS.index("unknown")
# All 35 words of Speech Commands v2; the 25 that are not keywords form the "unknown" class.
ALL_WORDS: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four",
    "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right",
    "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)
BACKGROUND_NOISE_DIR = "_background_noise_"
# Speech Commands splits speakers by hashing their id: 10 % validation, 10 % testing.
VALIDATION_PERCENT = 10
TESTING_PERCENT = 10
# Silence for train/validation: 1 s cuts every 0.5 s from the background recordings, with
# running_tap.wav held out for validation (as TFDS, which the MLPerf Tiny reference uses).
SILENCE_HOP = 8_000
VALIDATION_NOISE_FILE = "running_tap.wav"
TEST_SILENCE_DIR = "_silence_"     # folders of the official balanced test set
TEST_UNKNOWN_DIR = "_unknown_"
COMPLETE_MARKER = ".kws_complete.json"   # written last: a folder without it is incomplete
# Synthetic dataset: utterances per speaker of each keyword / each other word (real set ~2:1).
SYNTH_KEYWORD_REPEATS = 4
SYNTH_AUX_REPEATS = 2

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000          # 1 s clips
FRAME_LENGTH = 480             # 30 ms analysis window
FRAME_STEP = 320               # 20 ms hop -> 49 frames per clip
N_FFT = 512
N_MELS = 40
N_MFCC = 10
N_FRAMES = 1 + (CLIP_SAMPLES - FRAME_LENGTH) // FRAME_STEP
INPUT_SHAPE = (1, N_FRAMES, N_MFCC)   # (channels, frames, coefficients) of one model input

SEED = int(os.environ.get("KWS_SEED", "0"))


@dataclass(frozen=True)
class Profile:
    """How much work one run of the course does; only the amount changes, never the method."""

    name: str
    synth_speakers: int          # synthetic dataset: number of distinct synthetic speakers
    synth_test_per_class: int    # synthetic official test set: clips per class (real one: 408)
    epochs: int                  # float training epochs (MLPerf: 10)
    batch_size: int
    lr: float                    # SGD initial learning rate (cosine-annealed to 0)
    aug_views: int               # cached augmented copies of the training set, cycled per epoch
    qat_epochs: int              # QAT fine-tuning epochs per variant
    qat_lr: float                # QAT initial learning rate; 0.005 made 2-bit QAT collapse
    calib_clips: int             # PTQ calibration clips from the validation set
    rounding_iters: int = 500    # learned-rounding (quant.learn_rounding) steps per layer


PROFILES = {
    "default": Profile("default", synth_speakers=600, synth_test_per_class=408, epochs=10,
                       batch_size=100, lr=0.05, aug_views=4, qat_epochs=4, qat_lr=0.002,
                       calib_clips=1000),
    "ci": Profile("ci", synth_speakers=60, synth_test_per_class=40, epochs=8,
                  batch_size=100, lr=0.05, aug_views=2, qat_epochs=2, qat_lr=0.002,
                  calib_clips=200, rounding_iters=100),
}


def profile() -> Profile:
    """The active profile, from KWS_PROFILE (``default`` or ``ci``)."""
    name = os.environ.get("KWS_PROFILE", "default")
    if name not in PROFILES:
        raise ValueError(f"KWS_PROFILE={name!r} is not a profile; use one of {sorted(PROFILES)}.")
    return PROFILES[name]


def dataset_choice() -> str:
    """Which dataset to use, from KWS_DATASET: ``real``, ``synthetic`` or ``auto`` (default)."""
    choice = os.environ.get("KWS_DATASET", "auto")
    if choice not in ("real", "synthetic", "auto"):
        raise ValueError(f"KWS_DATASET={choice!r}: use 'real', 'synthetic' or 'auto'.")
    return choice


def data_root() -> Path:
    """Where datasets, downloads and feature caches live (KWS_DATA_ROOT, default ./data)."""
    return Path(os.environ.get("KWS_DATA_ROOT", REPO_ROOT / "data"))


def real_data_dir() -> Path:
    """The extracted Speech Commands v2 folder (KWS_DATA_DIR points to a copy you already have)."""
    return Path(os.environ.get("KWS_DATA_DIR", data_root() / "speech_commands_v0.02"))


def real_test_dir() -> Path:
    """The extracted official test set (KWS_TEST_DIR overrides)."""
    return Path(os.environ.get("KWS_TEST_DIR", data_root() / "speech_commands_test_set_v0.02"))


def synthetic_data_dir() -> Path:
    """The generated offline dataset for the active profile (same layout as the real one)."""
    return data_root() / f"synthetic_speech_commands_{profile().name}"


def synthetic_test_dir() -> Path:
    """The generated offline balanced test set for the active profile."""
    return data_root() / f"synthetic_speech_commands_test_set_{profile().name}"


def output_dir() -> Path:
    """Where a course run writes everything it makes (KWS_OUTPUT, default ./output)."""
    return Path(os.environ.get("KWS_OUTPUT", REPO_ROOT / "output"))


def artifacts_dir() -> Path:
    """Where checkpoints, ONNX files and C headers go, one folder per profile and dataset."""
    path = output_dir() / "artifacts" / profile().name
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlperf_dir() -> Path:
    """The real MLPerf Tiny artifacts (kws01 inputs, reference weights), if present."""
    return Path(os.environ.get("KWS_MLPERF_DIR", REPO_ROOT.parent / "shared" / "mlperf"))


def quant_backend_choice() -> str:
    """Quantization package for the notebooks, from KWS_QUANT_BACKEND: ``course`` (default) or ``ti``."""
    choice = os.environ.get("KWS_QUANT_BACKEND", "course")
    if choice not in ("course", "ti"):
        raise ValueError(f"KWS_QUANT_BACKEND={choice!r}: use 'course' (kws_utils.quant) or 'ti' "
                         "(TI's tinyml_torchmodelopt, if installed).")
    return choice


# Streaming detection (notebook 06): a decision every hop on the last 1 s, posteriors averaged
# over a span, a threshold and a refractory period. The hop must be a multiple of FRAME_STEP.
STREAM_HOP_MS = 100
STREAM_SMOOTH_MS = 300
STREAM_THRESHOLD = 0.6
STREAM_REFRACTORY_MS = 1000
STREAM_SNR_DB = 20.0           # speech-to-background level of the long test recording
# (keyword clips, distractor "unknown" clips) in the long test recording of each profile.
STREAM_CLIPS = {"default": (150, 50), "ci": (16, 6)}
