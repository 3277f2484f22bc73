"""Deployment latency: onnxruntime time per batch-1 inference of the float and integer models."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from kws_utils import config, deploy, export, model, quant

RUNS = 300        # median over this many single inferences (after a warm-up)
CALIB = 200       # random calibration inputs: latency does not depend on the weights' values


def run() -> dict:
    """Median batch-1 latency (ms) of float32 and int8/int4/int2 ONNX models, single thread."""
    torch.manual_seed(config.SEED)
    net = model.DSCNN().eval()
    x = torch.randn(CALIB, *config.INPUT_SHAPE) * 8
    out = {"runs": RUNS, "threads": 1, "batch": 1, "macs": deploy.macs(net)}
    with tempfile.TemporaryDirectory() as tmp:
        out["float32_ms"] = round(deploy.latency_ms(export.export_onnx(net, Path(tmp) / "f.onnx"), RUNS), 4)
        for bits in quant.WEIGHT_BITS:
            path = quant.export_integer(quant.ptq(net, bits, x), Path(tmp) / f"i{bits}.onnx")
            out[f"int{bits}_ms"] = round(deploy.latency_ms(path, RUNS), 4)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
