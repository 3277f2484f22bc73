"""Side-by-side runs of kws_utils.quant and TI's tinyml_torchmodelopt on the same work.

The reference DS-CNN weights, PTQ calibration on 200 real non-test clips (the first seeded subset of
``real_audio.calibration_subsets``) with the wrapper in train() mode (as TI's KWS example calibrates:
Dropout active, one seeded pass), then each backend's exported integer ONNX scored with onnxruntime
on all 1,000 MLPerf kws01 inputs (the MLPerf/EEMBC comparison set, never calibrated on). Both
backends get the same qconfig dict and the same seed.
"""
from __future__ import annotations

import copy
import importlib
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kws_utils import config, data, holdout, model as kws_model, real_audio
from kws_utils.quant.qconfig import qconfig_for, ti_example_qconfig

CALIB_CLIPS = 200   # real non-test calibration clips
QCONFIGS = {"plain": qconfig_for, "ti_example": ti_example_qconfig}


def ti_backend() -> ModuleType:
    """TI's quantization module (ImportError with the install line when absent)."""
    try:
        return importlib.import_module("tinyml_torchmodelopt.quantization")
    except ImportError as err:
        raise ImportError("TI's tinyml_torchmodelopt is not installed (see README: pip install "
                          "../shared/vendor/tinyml_torchmodelopt-1.4.0-py3-none-any.whl).") from err


def course_backend() -> ModuleType:
    """The course's quantization package."""
    return importlib.import_module("kws_utils.quant")


def ptq_onnx(backend: ModuleType, net: nn.Module, qconfig_type: dict, calib_x: torch.Tensor,
             path: Path, seed: int = config.SEED) -> Path:
    """PTQ as TI's example does it (train() mode, one seeded pass), convert, export the integer ONNX."""
    holdout.refuse_test_inputs(calib_x, "agreement.ptq_onnx")
    wrapper = backend.TINPUTinyMLPTQFxModule(copy.deepcopy(net), total_epochs=1,
                                             qconfig_type=copy.deepcopy(qconfig_type),
                                             example_inputs=calib_x[:1])
    torch.manual_seed(seed)   # the same Dropout masks in both backends
    wrapper.train()
    with torch.no_grad():
        wrapper(calib_x)
    wrapper.eval()
    wrapper.convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper.export(calib_x[:1], str(path), input_names=["input"])
    return path


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    """Output vectors of an ONNX file, one input at a time (TI's files have a fixed batch of 1)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(len(x))])


def op_types(path: Path) -> dict[str, int]:
    """How many nodes of each operator type the ONNX graph has."""
    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def compare(course: np.ndarray, ti: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Identical output vectors (%), argmax agreement (%) and both accuracies (%)."""
    return {"identical_pct": 100 * float(np.all(course == ti, axis=1).mean()),
            "argmax_agreement_pct": 100 * float((course.argmax(1) == ti.argmax(1)).mean()),
            "course_acc_pct": 100 * float((course.argmax(1) == y).mean()),
            "ti_acc_pct": 100 * float((ti.argmax(1) == y).mean())}


def calibration_inputs() -> torch.Tensor:
    """The 200 real non-test clips both backends calibrate on."""
    subsets = real_audio.calibration_subsets(1, CALIB_CLIPS)
    if not subsets:
        raise data.DatasetError(f"no real calibration clips in {real_audio.shared_dir()}: the agreement "
                                "runs need the real calibration pool (KWS_REAL_AUDIO_DIR).")
    return subsets[0]


def ptq_agreement(kinds: tuple[str, ...] = ("plain", "ti_example"), bits: tuple[int, ...] = (8, 4, 2),
                  mlperf: Path | None = None) -> list[dict[str, Any]]:
    """One row per qconfig kind and weight width: agreement of the two backends' integer ONNX files."""
    ti = ti_backend()
    x, y, _ = data.load_kws01(None if mlperf is None else mlperf / "kws01")
    calib = calibration_inputs()
    net = kws_model.reference_model(None if mlperf is None else mlperf / "kws_dscnn_pb2pth_checkpoint.pth")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for b in bits:
                qt = QCONFIGS[kind](b)
                paths = [ptq_onnx(backend, net, qt, calib, Path(tmp) / f"{name}_{kind}_{b}.onnx")
                         for name, backend in (("course", course_backend()), ("ti", ti))]
                course_out, ti_out = (onnx_outputs(p, x) for p in paths)
                rows.append({"qconfig": kind, "weight_bits": b,
                             **compare(course_out, ti_out, y.numpy()),
                             "same_onnx_operators": op_types(paths[0]) == op_types(paths[1])})
    return rows


def qat_agreement(bits: int = 8, epochs: int = 2, lr: float = 1e-3, batch_size: int = 50,
                  mlperf: Path | None = None, seed: int = config.SEED) -> dict[str, Any]:
    """A short QAT run from the reference weights on the real calibration pool (same seed, same
    batches) in both backends; their fake-quant outputs on kws01 and final weights compared."""
    ti = ti_backend()
    test_x, test_y, _ = data.load_kws01(None if mlperf is None else mlperf / "kws01")
    pool = real_audio.pool_set()
    if pool is None:
        raise data.DatasetError(f"no real calibration clips in {real_audio.shared_dir()}: the QAT "
                                "agreement run trains on the real calibration pool (KWS_REAL_AUDIO_DIR).")
    x, y = pool
    net = kws_model.reference_model(None if mlperf is None else mlperf / "kws_dscnn_pb2pth_checkpoint.pth")
    outs, weights = [], []
    for backend in (course_backend(), ti):
        wrapper = backend.TINPUTinyMLQATFxModule(copy.deepcopy(net), total_epochs=epochs,
                                                 qconfig_type=qconfig_for(bits), example_inputs=x[:1])
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=lr, momentum=0.9)
        torch.manual_seed(seed)
        for _ in range(epochs):
            wrapper.train()
            order = torch.randperm(len(x))
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                optimizer.zero_grad()
                nn.functional.cross_entropy(wrapper(x[idx]), y[idx]).backward()
                optimizer.step()
        wrapper.eval()
        with torch.no_grad():
            outs.append(wrapper(test_x).numpy())
        weights.append(torch.cat([p.detach().flatten() for p in wrapper.parameters()]))
    result = compare(outs[0], outs[1], test_y.numpy())
    result.update(weight_bits=bits, epochs=epochs,
                  max_output_diff=float(np.abs(outs[0] - outs[1]).max()),
                  max_weight_diff=float((weights[0] - weights[1]).abs().max()))
    return result
