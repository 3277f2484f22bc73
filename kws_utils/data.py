"""Data: reading audio, the MLPerf kws01 benchmark files, and the Speech Commands v2 dataset."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from kws_utils import config

KWS01_SCALE = 0.5847029   # input scale of the MLPerf reference TFLite model
KWS01_ZERO_POINT = 83


class AudioError(ValueError):
    """A wav file that cannot be used as a clip (corrupt, truncated, empty)."""


def load_audio(path: str | Path, sample_rate: int = config.SAMPLE_RATE) -> np.ndarray:
    """Read a wav file as mono int16 at ``sample_rate`` (resampled, mixed down), any length."""
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: not a readable wav file ({err}). Delete it or re-extract the "
                         "dataset archive.") from err
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples. Delete it or re-extract the dataset.")
    # Mix stereo down in int32 so that two loud channels cannot overflow int16.
    mono = data.astype(np.int32).mean(axis=1)
    if rate != sample_rate:
        gcd = np.gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // gcd, rate // gcd)
    return np.clip(np.round(mono), -32768, 32767).astype(np.int16)


def fix_length(wave: np.ndarray, length: int = config.CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad a shorter clip at the end or crop a longer one to ``length`` samples."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
    return np.pad(wave, pad)


def load_kws01(folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the EEMBC/MLPerf kws01 files: float MFCC (N, 1, 49, 10), labels (N,), file names."""
    folder = Path(folder) if folder is not None else config.mlperf_dir() / "kws01"
    labels_csv = folder / "y_labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv} not found: point to the kws01 folder of the MLPerf "
                                "artifacts (KWS_MLPERF_DIR), which holds y_labels.csv and the .bin files.")
    names, labels, feats = [], [], []
    with labels_csv.open() as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            name, n_classes, label = row[0], int(row[1]), int(row[2])
            if n_classes != len(config.LABELS) or not 0 <= label < n_classes:
                raise ValueError(f"{labels_csv}: row {row} is not a 12-class kws01 label.")
            raw = (folder / name).read_bytes()
            if len(raw) != config.N_FRAMES * config.N_MFCC:
                raise ValueError(f"{folder / name}: {len(raw)} bytes, expected "
                                 f"{config.N_FRAMES * config.N_MFCC} (49 x 10 int8 MFCC).")
            feats.append(np.frombuffer(raw, dtype=np.int8))
            labels.append(label)
            names.append(name)
    q = torch.from_numpy(np.stack(feats).astype(np.float32))
    x = ((q - KWS01_ZERO_POINT) * KWS01_SCALE).reshape(-1, *config.INPUT_SHAPE)
    return x, torch.tensor(labels, dtype=torch.long), names
