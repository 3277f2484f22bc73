"""MFCC throughput: the batched torch implementation against a per-clip loop of the same code."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

# Importable from the repo root (kws_utils) and from this folder (timing), as script or module.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch

from timing import best_seconds  # noqa: E402

from kws_utils import config, features

N_CLIPS = 2000
N_LOOP = 200       # the per-clip loop is slow; fewer clips give the same clips/s
REPEATS = 3        # best of 3: the figure least disturbed by other work on the machine


def clips_per_second(fn: Callable[[], object], n_clips: int) -> float:
    """Best clips/s over REPEATS calls of ``fn``, which processes ``n_clips`` clips per call."""
    return round(n_clips / best_seconds(fn, REPEATS), 1)


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], waves: torch.Tensor,
               size: int) -> Callable[[], list]:
    """A call that applies ``fn`` to ``waves`` in batches of ``size`` clips."""
    return lambda: [fn(waves[i:i + size]) for i in range(0, len(waves), size)]


def run() -> dict:
    """Measure batched vs per-clip MFCC throughput (clips/s) on random int16 clips."""
    gen = torch.Generator().manual_seed(0)
    waves = torch.randint(-20000, 20000, (N_CLIPS, config.CLIP_SAMPLES), generator=gen,
                          dtype=torch.int16)
    noise_bank = [torch.randn(60 * config.SAMPLE_RATE, generator=gen) * 0.3 for _ in range(6)]
    features.mfcc(waves[:8])   # build the cached mel, DCT and window outside the timings
    size = features.BATCH_SIZE
    f32 = lambda w: features.mfcc(w, torch.float32)
    augmented = lambda w: features.augmented_mfcc(w, noise_bank, gen)
    return {
        "torch_threads": torch.get_num_threads(),
        "batch_size": size,
        "batched_clips_per_s": clips_per_second(in_batches(features.mfcc, waves, size), N_CLIPS),
        "loop_clips_per_s": clips_per_second(in_batches(features.mfcc, waves[:N_LOOP], 1), N_LOOP),
        "one_batch_of_2000_clips_per_s": clips_per_second(lambda: features.mfcc(waves), N_CLIPS),
        "batched_float32_clips_per_s": clips_per_second(in_batches(f32, waves, size), N_CLIPS),
        "batched_augmented_clips_per_s": clips_per_second(in_batches(augmented, waves, size),
                                                          N_CLIPS),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
