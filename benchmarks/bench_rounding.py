"""Learned rounding (quant.learn_rounding): time and integer-ONNX accuracy per weight bit width.

The issue-13 protocol: the MLPerf reference DS-CNN, calibrated and reconstructed on kws01 files
0-199, scored through the exported integer ONNX under onnxruntime on files 200-999. Wall time of
learn_rounding with ``KWS_BENCH_THREADS`` torch threads (default 2), and its CPU time (on a busy
machine the CPU time of a single-thread run is the steadier figure).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from kws_utils import config, data, files, model, quant

CALIB = 200      # kws01 files 0..199: calibration and reconstruction
ITERS = 1000     # learn_rounding steps per layer


def _onnx_accuracy(wrapper: quant.TINPUTinyMLPTQFxModule, x: torch.Tensor, y: torch.Tensor,
                   folder: Path, name: str) -> tuple[float, bool]:
    """Convert, export, and score the integer ONNX; also whether it equals the IntegerModel."""
    int_model = wrapper.convert()
    path = wrapper.export(x[:1], folder / f"{name}.onnx", input_names=["input"])
    return quant.onnx_check(int_model, path, x, y)


def one_width(bits: int, x: torch.Tensor, y: torch.Tensor, folder: Path, iters: int) -> dict:
    """Round-to-nearest PTQ and learned rounding at ``bits``: accuracies and time."""
    out = {}
    for learn in (False, True):
        wrapper = quant.TINPUTinyMLPTQFxModule(model.reference_model(), total_epochs=1,
                                               qconfig_type=quant.qconfig_for(bits))
        quant.calibrate(wrapper, x[:CALIB])
        if learn:
            wall, cpu = time.perf_counter(), time.process_time()
            quant.learn_rounding(wrapper, x[:CALIB], iters=iters, progress=False)
            out["learn_seconds"] = round(time.perf_counter() - wall, 1)
            out["learn_cpu_seconds"] = round(time.process_time() - cpu, 1)
        acc, identical = _onnx_accuracy(wrapper, x[CALIB:], y[CALIB:], folder,
                                        f"int{bits}_{'learned' if learn else 'nearest'}")
        out["learned_acc" if learn else "nearest_acc"] = round(acc, 4)
        out["onnx_identical"] = out.get("onnx_identical", True) and identical
    return out


def run() -> dict:
    """Float, round-to-nearest PTQ and learned-rounding accuracy (kws01[200:]) per bit width."""
    if not (config.mlperf_dir() / "kws01").is_dir():
        return {"skipped": f"MLPerf artifacts absent ({config.mlperf_dir()})"}
    threads = int(os.environ.get("KWS_BENCH_THREADS", "2"))
    iters = int(os.environ.get("KWS_BENCH_ROUNDING_ITERS", str(ITERS)))
    torch.set_num_threads(threads)
    x, y, _ = data.load_kws01()
    with torch.no_grad():
        float_acc = (model.reference_model()(x[CALIB:]).argmax(1) == y[CALIB:]).float().mean()
    out = {"threads": threads, "iters": iters, "calib_files": CALIB,
           "scored_files": len(x) - CALIB, "float_acc": round(float(float_acc), 4)}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4, 2):
            out[f"int{bits}"] = one_width(bits, x, y, Path(tmp), iters)
            print(f"int{bits}: {out[f'int{bits}']}", flush=True)
    return out


def main() -> None:
    """Run and write output/benchmarks/rounding.json."""
    results = run()
    print(json.dumps(results, indent=2))
    target = config.output_dir() / "benchmarks" / "rounding.json"
    with files.atomic_path(target) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    print(f"written to {target}")


if __name__ == "__main__":
    main()
