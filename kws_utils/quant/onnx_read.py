"""Read a TINPU integer ONNX file (TI's TINPU_INT_MODEL or the course's) back into an IntegerModel.

The file is parsed once, by ``kws_utils.tinpu_onnx`` (the reader that deploy, the C header and the
NumPy reference use); this module only turns what it read into the course's PyTorch
``IntegerModel``. TI's form adds the bias and the rounding term as one constant: that constant
becomes ``bias`` and ``offset`` is 0, which is the same integer arithmetic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kws_utils import tinpu_onnx
from kws_utils.export import OUTPUT_SCALE_KEY, load_onnx
from kws_utils.quant.integer import InputStage, IntegerModel, IntLayer


def _input_stage(npu: tinpu_onnx.NpuModel, path: str) -> InputStage:
    """TI's input stage clamp(floor((x + offset) * m)) as the course's InputStage."""
    stage = npu.input_stage
    if [op for op, _ in stage.steps] not in (["Add", "Mul", "Floor"], ["Mul", "Floor"]):
        raise ValueError(f"{path}: the input stage is {[op for op, _ in stage.steps]}, not TI's "
                         "Add/Mul/Floor: not a TINPU integer model of TI's form.")
    mult, shift = tinpu_onnx.split_multiplier(np.array([stage.scalar("Mul")]), path)
    offset = float(np.float32(stage.scalar("Add") or 0.0))
    return InputStage(offset, int(mult[0]), int(shift[0]), stage.qmin, stage.qmax)


def _layer(layer: tinpu_onnx.NpuLayer) -> IntLayer:
    """One layer read from the file as an IntLayer (scales are not in the file: NaN)."""
    weighted = layer.weight is not None
    folded = weighted and layer.bias is None        # TI's form: bias and rounding in one constant
    shape = np.shape(layer.offset)
    return IntLayer(
        name=layer.name, op=layer.op, weight=layer.weight.astype(np.int8) if weighted else None,
        bias=(layer.offset if folded else layer.bias).astype(np.int32) if weighted else None,
        stride=tuple(layer.stride), padding=tuple(layer.padding), groups=layer.groups,
        offset=(np.zeros(shape) if folded else layer.offset).astype(np.int32),
        mult=np.broadcast_to(layer.mult, shape).astype(np.int32),
        shift=np.broadcast_to(layer.shift, shape).astype(np.int32), qmin=layer.qmin,
        qmax=layer.qmax, weight_bits=layer.weight_bits, input_scale=float("nan"),
        weight_scale=None, output_scale=float("nan"))


def read_integer_onnx(path: str | Path) -> IntegerModel:
    """The IntegerModel of a TINPU integer ONNX file (TI's or the course's), or a clear error."""
    npu = tinpu_onnx.load_integer_onnx(path)
    layers = [_layer(layer) for layer in npu.layers]
    output = "int8" if np.isnan(npu.output_scale) else "float"   # a final Mul gives logits
    if output == "int8":
        meta = {p.key: p.value for p in load_onnx(path).metadata_props}
        layers[-1].output_scale = float(meta.get(OUTPUT_SCALE_KEY, "nan"))
    else:
        layers[-1].output_scale = npu.output_scale
    stage = _input_stage(npu, str(path))
    return IntegerModel((float(1.0 / stage.multiplier()), stage.qmin, stage.qmax), layers,
                        npu.input_shape, output, input_stage=stage)
