"""Read a TINPU integer ONNX file (TI's TINPU_INT_MODEL or the course's) back into an IntegerModel.

The form is a chain: the input stage Add/Mul/Floor/Clip, then per layer Conv, Gemm or
ReduceSum+Round, each followed by Add/Mul/Floor/Clip, and optionally a final Mul by the output
scale. TI's form adds the bias and the rounding term as one constant, so the reader puts that
constant in ``bias`` and sets ``offset`` to 0: the integer arithmetic is the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from kws_utils.export import OUTPUT_SCALE_KEY
from kws_utils.quant.integer import InputStage, IntegerModel, IntLayer
from kws_utils.quant.qconfig import MAX_SHIFT, WEIGHT_BITS

_OPS = {"Conv": "conv", "Gemm": "linear", "ReduceSum": "avgpool"}


def split_multiplier(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mult, shift) with mult * 2**-shift == multiplier exactly, shift as small as possible."""
    m = np.asarray(multiplier, dtype=np.float64).ravel()
    shift = np.zeros(m.shape, dtype=np.int64)
    while True:
        inexact = m * 2.0 ** shift != np.round(m * 2.0 ** shift)
        if not inexact.any():
            break
        if shift.max() >= MAX_SHIFT:
            raise ValueError("a requantization multiplier is not an integer times 2**-shift (shift <= 31).")
        shift += inexact
    return np.round(m * 2.0 ** shift).astype(np.int32), shift.astype(np.int32)


def _weight_bits(weight: np.ndarray) -> int:
    """The smallest NPU width (2, 4, 8) whose symmetric range holds the weights."""
    peak = int(np.abs(weight).max(initial=0))
    return next(b for b in sorted(WEIGHT_BITS) if peak <= 2 ** (b - 1) - 1)


def _check_weight(weight: np.ndarray, where: str) -> np.ndarray:
    """Integer weights within int8 as int8, or a clear error."""
    if not np.array_equal(weight, np.round(weight)) or np.abs(weight).max(initial=0) > 127:
        raise ValueError(f"{where}: weights must be integers in [-127, 127]; this is not an NPU integer model.")
    return weight.astype(np.int8)


def _attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def read_integer_onnx(path: str | Path) -> IntegerModel:
    """The IntegerModel of a TINPU integer ONNX file (TI's or the course's), or a clear error."""
    try:
        proto = onnx.load(str(path))
    except Exception as err:   # protobuf raises DecodeError for a file that is not ONNX
        raise ValueError(f"{path} is not an ONNX file ({type(err).__name__}).") from None
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = list(proto.graph.node)
    const = lambda node: next(init[i] for i in node.input if i in init)  # noqa: E731
    ops = [n.op_type for n in nodes[:4]]
    if ops != ["Add", "Mul", "Floor", "Clip"]:
        raise ValueError(f"{path} does not start with TI's input stage Add/Mul/Floor/Clip ({ops}): "
                         "not a TINPU integer model (a float model has no integers to read).")

    def requant(i: int) -> tuple[float | np.ndarray, np.ndarray, int, int]:
        """(added constant, multiplier, qmin, qmax) of the Add/Mul/Floor/Clip block at nodes[i]."""
        if [n.op_type for n in nodes[i:i + 4]] != ["Add", "Mul", "Floor", "Clip"]:
            raise ValueError(f"{path}: node {i} does not start an Add/Mul/Floor/Clip requantization.")
        clip = nodes[i + 3]
        return const(nodes[i]), const(nodes[i + 1]), int(init[clip.input[1]]), int(init[clip.input[2]])

    offset, multiplier, qmin, qmax = requant(0)
    mult, shift = split_multiplier(multiplier)
    stage = InputStage(float(np.float32(np.ravel(offset)[0])), int(mult[0]), int(shift[0]), qmin, qmax)
    layers, i = [], 4
    while i < len(nodes) and nodes[i].op_type in _OPS:
        node, op = nodes[i], _OPS[nodes[i].op_type]
        i += 2 if op == "avgpool" else 1     # ReduceSum is followed by Round
        added, multiplier, qmin, qmax = requant(i)
        i += 4
        mult, shift = split_multiplier(multiplier)
        added = np.round(np.asarray(added, np.float64).ravel()).astype(np.int64)
        weight = None if op == "avgpool" else _check_weight(init[node.input[1]], f"{path} {node.name}")
        a = _attrs(node)
        pads = a.get("pads", [0, 0, 0, 0])
        layers.append(IntLayer(
            name=node.name.rsplit("/", 1)[0] or f"layer{len(layers)}", op=op, weight=weight,
            bias=None if weight is None else added.astype(np.int32),
            stride=tuple(a.get("strides", (1, 1))), padding=(int(pads[0]), int(pads[1])),
            groups=int(a.get("group", 1)),
            offset=(added if weight is None else np.zeros_like(added)).astype(np.int32),
            mult=np.broadcast_to(mult, added.shape).astype(np.int32),
            shift=np.broadcast_to(shift, added.shape).astype(np.int32), qmin=qmin, qmax=qmax,
            weight_bits=None if weight is None else _weight_bits(weight), input_scale=float("nan"),
            weight_scale=None, output_scale=float("nan")))
    rest = [n.op_type for n in nodes[i:]]
    if not layers or rest not in ([], ["Mul"]):
        raise ValueError(f"{path}: unexpected nodes after the layers ({rest}); not a TINPU integer model.")
    meta = {p.key: p.value for p in proto.metadata_props}
    output = "float" if rest == ["Mul"] else "int8"
    layers[-1].output_scale = float(const(nodes[i])) if rest else float(meta.get(OUTPUT_SCALE_KEY, "nan"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    return IntegerModel((float(1.0 / stage.multiplier()), stage.qmin, stage.qmax), layers,
                        tuple(d.dim_value for d in dims), output, input_stage=stage)
