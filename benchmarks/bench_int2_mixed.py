"""int2 mixed precision of the reference weights: which layers to keep 8-bit, chosen without the test set.

Issue 18 asks for int2 learned-rounding PTQ of the MLPerf reference weights that holds 75 % on every
calibration subset. ``bench_ptq_real.py`` keeps the first and last layer 8-bit (``model.EDGE_LAYERS``);
the four depthwise layers hold another 2,304 weights (about 10 % of the DS-CNN's), are applied to every
time-frequency position, and are the other candidates for 8 bits. Each variant is calibrated and
rounded (``quant.ptq_learned``, default steps) on the same ``SUBSETS`` seeded 200-clip draws of the real
calibration pool as ``bench_ptq_real.py``, exported to the TI integer ONNX, and scored under
onnxruntime twice: on the pool clips that subset did not draw (labels used only to score; this is
the figure to choose by) and on the official test set (4,890 clips, scoring only, reported).
Times are wall seconds of calibration + learned rounding with ``KWS_BENCH_THREADS`` torch threads.
Each layer choice also runs with TI's example activation settings (per-tensor affine, scales not powers of
two: ``quant.ptq_learned(..., affine_activations=True)``), chosen or not by the same held-out figure.
Writes output/bench_int2_mixed.json (atomically); ``--missing`` runs only the variants that file lacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from kws_utils import config, export, files, model, quant, real_audio
from timing import check_resumable  # noqa: E402  (benchmarks/, the script's folder)

SUBSETS, SIZE, BITS = 5, 200, 2     # bench_ptq_real.py's protocol
# name: (8-bit layers, TI's example activation settings: per-tensor affine, scales not powers of 2)
VARIANTS = {"conv1 + fc6 8-bit": (model.EDGE_LAYERS, False),
            "conv1 + fc6 + depthwise 8-bit": (model.EDGE_LAYERS + model.DEPTHWISE_LAYERS, False),
            "conv1 + fc6 8-bit, affine activations": (model.EDGE_LAYERS, True),
            "conv1 + fc6 + depthwise 8-bit, affine activations": (model.EDGE_LAYERS + model.DEPTHWISE_LAYERS, True)}


def run(done: dict | None = None) -> dict:
    """Per variant: held-out-pool and official-test accuracy per calibration subset, mean and minimum.

    ``done``: an earlier results file's contents; its variants are kept, not run again.
    """
    test, pool = real_audio.test_set(download=False), real_audio.pool_set()
    if test is None or pool is None or real_audio.noise_dir() is None:
        return {"skipped": "official test set, real calibration pool or real noise recordings absent"}
    torch.set_num_threads(int(os.environ.get("KWS_BENCH_THREADS", "1")))
    picks = real_audio.calibration_picks(SUBSETS, SIZE, len(pool[0]))
    subsets = real_audio.calibration_subsets(SUBSETS, SIZE, copies=config.CALIB_COPIES)
    out = {"trained_on": "MLPerf reference DS-CNN (Speech Commands v0.02 train split)",
           "calibrated_on": f"{SUBSETS} seeded subsets of the real calibration pool, each "
                            f"{real_audio.describe_calibration(SIZE, config.CALIB_COPIES)}",
           "chosen_on": f"the pool clips each subset did not draw ({len(pool[0]) - SIZE} real non-test clips)",
           "scored_on": f"{real_audio.describe_test()}, {len(test[1])} clips, integer ONNX (onnxruntime)",
           "threads": torch.get_num_threads(), "results": {}}
    if done is not None:
        check_resumable(done, out, ("calibrated_on", "chosen_on", "scored_on", "threads"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (keep, affine) in VARIANTS.items():
            if done is not None and name in done.get("results", {}):
                out["results"][name] = {"affine_activations": affine, **done["results"][name]}
                continue
            rows = []
            for i, (pick, calib) in enumerate(zip(picks, subsets)):
                start = time.perf_counter()
                wrapper = quant.ptq_learned(model.reference_model(), BITS, calib, progress=False, keep_8bit=keep,
                                            affine_activations=affine)
                seconds = time.perf_counter() - start
                path = quant.export_integer(wrapper, Path(tmp) / f"{len(keep)}_{affine}_{i}.onnx")
                held = np.setdiff1d(np.arange(len(pool[0])), pick)
                rows.append({"heldout_pool": round(export.onnx_accuracy(path, pool[0][held], pool[1][held]), 4),
                             "official_test": round(export.onnx_accuracy(path, *test), 4), "seconds": round(seconds, 1)})
                print(name, i, rows[-1], flush=True)
            out["results"][name] = {
                "weights_8bit": list(keep), "affine_activations": affine, "packed_weight_bytes": quant.packed_weight_bytes(path),
                "runs": rows, **{f"{k}_{stat}": round(float(fn([r[k] for r in rows])), 4)
                                 for k in ("heldout_pool", "official_test")
                                 for stat, fn in (("mean", np.mean), ("min", np.min))}}
    return out


def main(missing: bool = False) -> None:
    """Run, print the summary and write output/bench_int2_mixed.json."""
    target = config.output_dir() / "bench_int2_mixed.json"
    out = run(json.loads(target.read_text()) if missing and target.is_file() else None)
    for name, r in out.get("results", {}).items():
        print(f"{name}: held-out pool {r['heldout_pool_mean']:.2%} mean / {r['heldout_pool_min']:.2%} min; "
              f"official test {r['official_test_mean']:.2%} / {r['official_test_min']:.2%}; "
              f"{r['packed_weight_bytes']:,} weight bytes")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"written to {files.write_text(target, json.dumps(out, indent=2))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing", action="store_true",
                        help="keep the variants already in output/bench_int2_mixed.json; run only the others")
    main(parser.parse_args().missing)
