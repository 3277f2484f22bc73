"""Why calibration holds silence cuts: int2 learned rounding with and without them, on held-out data only.

The calibration pool holds speech only, so the reference model's silence class is never shown to
learned rounding. This script measures what adding silence cuts (``config.CALIB_SILENCE_SHARE`` of
the calibration set) does, without touching the official test set: the MLPerf reference weights,
int2 with the first and last layer 8-bit (``model.EDGE_LAYERS``), learned rounding with its defaults,
on ``SUBSETS`` seeded subsets of ``SIZE`` pool clips + ``config.CALIB_COPIES`` augmented copies.
Held out: every pool clip outside the subset (words), and silence cuts of ``running_tap`` (validation's
recording) and of the last 30 % of each training recording. The calibration silence of this script
comes from the first 70 % only, so no held-out noise is calibrated on. Accuracy is that of the
converted integer model in PyTorch (bit-exact with its ONNX file, as the course's tests check);
bench_ptq_real.py scores the chosen setting on the official test set.

    KWS_BENCH_THREADS=2 python benchmarks/bench_calib_silence.py      # about 6 minutes on 2 cores

Writes output/benchmarks/calib_silence.json (atomically).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from kws_utils import config, data, features, files, model, quant, real_audio

SUBSETS = int(os.environ.get("KWS_BENCH_SUBSETS", "5"))
SIZE = int(os.environ.get("KWS_BENCH_CALIB_SIZE", "200"))
CALIBRATION_PART = 0.7    # the first 70 % of each training recording may be calibrated on
HELD_OUT_PER_RECORDING = 20


def noise_cuts(held_out: bool) -> list[data.Clip]:
    """1 s silence cuts of the recordings: the calibration part, or the held-out part + running_tap."""
    cuts = data.silence_clips(real_audio.noise_dir().parent)
    ends = {path: data.load_audio(path).size for path in {c.path for c in cuts["train"]}}
    if held_out:
        return cuts["validation"] + [c for c in cuts["train"] if c.offset >= CALIBRATION_PART * ends[c.path]]
    return [c for c in cuts["train"] if c.offset + config.CLIP_SAMPLES <= CALIBRATION_PART * ends[c.path]]


def held_out_silence() -> torch.Tensor:
    """MFCC of HELD_OUT_PER_RECORDING seeded held-out cuts of each of the six recordings."""
    cuts, rng = noise_cuts(held_out=True), np.random.default_rng(config.SEED)
    pick = []
    for path in sorted({c.path for c in cuts}):
        mine = [c for c in cuts if c.path == path]
        pick += [mine[j] for j in np.sort(rng.choice(len(mine), HELD_OUT_PER_RECORDING, replace=False))]
    return features.compute_features(data.load_clips(pick, desc="held-out silence"), desc="MFCC")


def int2_edges8(calib: torch.Tensor) -> torch.nn.Module:
    """The converted reference weights after calibration + learned rounding (int2, EDGE_LAYERS 8-bit)."""
    steps = config.PROFILES["default"].rounding_iters    # the steps bench_ptq_real runs, whatever the profile
    return quant.ptq_learned(model.reference_model(), 2, calib, iters=steps, progress=False,
                             keep_8bit=model.EDGE_LAYERS)


def run() -> dict:
    """Held-out word and silence accuracy per subset, with and without silence cuts in calibration."""
    pool = real_audio.pool_set()
    if pool is None or real_audio.noise_dir() is None or not config.mlperf_dir().is_dir():
        return {"skipped": "real calibration pool, noise recordings or MLPerf reference weights absent"}
    torch.set_num_threads(int(os.environ.get("KWS_BENCH_THREADS", "1")))
    px, py = pool
    picks = real_audio.calibration_picks(SUBSETS, SIZE, len(px))    # the clips each subset holds
    speech = real_audio.calibration_subsets(SUBSETS, SIZE, copies=config.CALIB_COPIES, silence=False)
    sil_x = held_out_silence()
    cal_cuts = noise_cuts(held_out=False)
    out = {"trained_on": "MLPerf reference DS-CNN (Speech Commands v0.02 train split)",
           "calibrated_on": f"{SUBSETS} seeded subsets of the real calibration pool, each "
                            f"{real_audio.describe_calibration(SIZE, config.CALIB_COPIES, silence=False)}, "
                            "with or without silence cuts of the first 70 % of the training recordings",
           "scored_on": f"held out: the other pool clips (words) and {len(sil_x)} silence cuts of running_tap "
                        "and of the last 30 % of the training recordings; converted integer model",
           "silence_share": config.CALIB_SILENCE_SHARE, "runs": []}
    for i, (pick, calib) in enumerate(zip(picks, speech)):
        rest = torch.from_numpy(np.setdiff1d(np.arange(len(px)), pick))
        n_sil = real_audio.silence_count(len(calib))
        silence = real_audio.calibration_silence(n_sil, config.SEED + i, cuts=cal_cuts)
        for with_silence in (False, True):
            net = int2_edges8(torch.cat([calib, silence]) if with_silence else calib)
            row = {"subset": i, "silence_cuts": n_sil if with_silence else 0,
                   "words": round(quant.accuracy(net, px[rest], py[rest]), 4),
                   "silence": round(quant.accuracy(net, sil_x, torch.full((len(sil_x),), config.SILENCE_INDEX)), 4)}
            # the test set's balance: 11 speech classes and silence, one twelfth each
            row["balanced"] = round((11 * row["words"] + row["silence"]) / 12, 4)
            out["runs"].append(row)
            print(row, flush=True)
    for flag in (False, True):
        rows = [r for r in out["runs"] if bool(r["silence_cuts"]) == flag]
        out["with_silence" if flag else "without_silence"] = {
            k: {"mean": round(float(np.mean([r[k] for r in rows])), 4), "min": round(min(r[k] for r in rows), 4)}
            for k in ("words", "silence", "balanced")}
    return out


def main() -> None:
    """Run, print the summary and write output/benchmarks/calib_silence.json."""
    out = run()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    path = files.write_text(config.output_dir() / "benchmarks" / "calib_silence.json", json.dumps(out, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
