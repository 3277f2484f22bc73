"""Streaming real-time factor: audio seconds processed per wall second, incremental vs recompute."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

# Importable from the repo root (kws_utils) and from this folder (timing), as script or module.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import numpy as np
import torch

from timing import best_seconds  # noqa: E402

from kws_utils import config, deploy, model, quant, streaming

SECONDS = 20          # length of the random test recording
HOPS_MS = (20, 100)   # the finest hop (every frame) and the course default
REPEATS = 2           # best of 2 (each call streams the whole recording)


def _recording() -> np.ndarray:
    """Random int16 audio whose loudness varies over time."""
    rng = np.random.default_rng(config.SEED)
    n = SECONDS * config.SAMPLE_RATE
    return (rng.standard_normal(n) * 3000 * (0.2 + np.abs(np.sin(np.arange(n) / 5000)))).astype(np.int16)


def real_time_factor(fn: Callable[[], object], seconds: float) -> float:
    """Audio seconds per wall second of the best of REPEATS calls."""
    return round(seconds / best_seconds(fn, REPEATS), 1)


def run() -> dict:
    """Real-time factor of features alone and of features + int8 inference, both feature modes."""
    torch.manual_seed(config.SEED)
    # One stream, small tensors: a second thread only adds hand-over cost (and noise on a busy machine).
    torch.set_num_threads(1)
    audio = _recording()
    calib = torch.stack(list(streaming.stream_features(audio[:5 * config.SAMPLE_RATE], 100)))[:, None]
    out: dict = {"audio_seconds": SECONDS, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = quant.export_integer(quant.ptq(model.DSCNN().eval(), 8, calib), Path(tmp) / "m.onnx")
        for hop in HOPS_MS:
            for mode, incremental in (("incremental", True), ("recompute", False)):
                feats = lambda: list(streaming.stream_features(audio, hop, incremental))
                full = lambda: streaming.run_stream(onnx, audio, hop_ms=hop, incremental=incremental,
                                                    progress=False)
                out[f"hop{hop}_{mode}_features_rtf"] = real_time_factor(feats, SECONDS)
                out[f"hop{hop}_{mode}_with_int8_onnx_rtf"] = real_time_factor(full, SECONDS)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
