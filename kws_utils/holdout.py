"""The test-set guard: inputs loaded as test data can never be used to calibrate, round or fit.

Every loader of scoring-only inputs (the official test set, a dataset's test split, MLPerf's kws01)
registers them here; calibration, learned rounding and bias fitting call ``refuse_test_inputs``
first. A fingerprint per input row makes the check exact and cheap (a few ms for thousands).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from kws_utils.errors import InputError

_TEST_ROWS: dict[bytes, str] = {}   # fingerprint of one input -> the test set it belongs to


def _fingerprints(x: torch.Tensor | np.ndarray) -> list[bytes]:
    """One short hash per input row (float32, C order), independent of device and batch."""
    rows = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().float().numpy())
    rows = rows.reshape(len(rows), -1) if rows.ndim > 1 else rows.reshape(1, -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=12).digest() for row in rows]


def register_test_inputs(x: torch.Tensor | np.ndarray, name: str) -> None:
    """Remember ``x`` (a batch of model inputs) as scoring-only data called ``name``."""
    for key in _fingerprints(x):
        _TEST_ROWS.setdefault(key, name)


def refuse_test_inputs(x: torch.Tensor | np.ndarray, purpose: str) -> None:
    """Raise InputError if any row of ``x`` is a registered test input."""
    if not _TEST_ROWS or len(x) == 0:
        return
    hits = [_TEST_ROWS[k] for k in _fingerprints(x) if k in _TEST_ROWS]
    if hits:
        raise InputError(f"{purpose}: {len(hits)} of the {len(x)} inputs are test inputs ({hits[0]}). "
                         "Test data is for scoring only: calibrate on the validation split or the real "
                         "calibration pool (real_audio.calibration_subsets).")
