"""Read a TI NPU integer ONNX file back into integers: weights, offsets, multipliers, shifts, clamps.

The TINPU integer form (what TI's ``tinyml_torchmodelopt`` exports, and the course with it) is a
chain of standard operators carrying integers in float tensors::

    input stage   q = Clip(Floor((x + offset) * mult))            float x -> integer codes
    each layer    acc = Conv | Gemm (integer weights, optional bias) or ReduceSum [+ Round]
                  y = Clip(Floor((acc + offset) * m))              m = mult * 2**-shift

This module walks that chain and returns an ``NpuModel``: per layer the integer weights and
the requantization constants, with ``m`` split into an integer ``mult`` and a right ``shift``,
so that firmware (and ``deploy.numpy_reference``) can compute ``(acc + offset) * mult >> shift``.
Anything that does not fit (a non-integer weight, a weight outside the layer's bit width, a
missing constant) is refused with the file and tensor named. It reads files, never a model
object, so it works the same on TI's converted model and on the course's own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHT_BITS = (8, 4, 2)
MAX_SHIFT = 40              # beyond this, a multiplier is not a fixed-point hardware constant
WEIGHT_BITS_KEY = "weight_bits"   # optional metadata: JSON {layer name: bits}
_OPS = {"Conv": "conv", "Gemm": "linear", "MatMul": "linear", "ReduceSum": "avgpool"}
_PASS = {"Cast", "Identity", "Flatten", "Round"}   # no effect on integer values in float tensors


@dataclass
class InputStage:
    """Float input -> integer codes, step by step as the graph computes it (float32)."""

    steps: list[tuple[str, np.ndarray]]   # ("Add"|"Mul"|"Div", constant) or ("Floor"|"Round", None)
    qmin: int
    qmax: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """The input codes (int64) exactly as onnxruntime computes them in float32."""
        q = np.asarray(x, np.float32)
        for op, c in self.steps:
            if op == "Add":
                q = q + c
            elif op == "Mul":
                q = q * c
            elif op == "Div":
                q = q / c
            elif op == "Floor":
                q = np.floor(q)
            else:   # Round: half to even, as ONNX Round
                q = np.round(q)
        return np.clip(q, self.qmin, self.qmax).astype(np.int64)

    def scalar(self, op: str) -> float | None:
        """The single constant of step ``op`` (None when the stage has no such step)."""
        found = [float(c.ravel()[0]) for o, c in self.steps if o == op]
        return found[0] if found else None


@dataclass
class NpuLayer:
    """One NPU layer: integer op (+ optional bias), then clamp((acc + offset) * mult >> shift)."""

    name: str
    op: str                              # "conv", "linear" or "avgpool"
    weight: np.ndarray | None            # int8 values (conv: OIHW, linear: out x in)
    bias: np.ndarray | None              # int32, None when folded into offset (TI's form)
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    offset: np.ndarray                   # int64, per output channel (or one value)
    mult: np.ndarray                     # int64, per output channel (or one value)
    shift: np.ndarray                    # int64 right shifts
    qmin: int
    qmax: int
    weight_bits: int | None
    float32_product: bool = False        # the file multiplies in float32 (TI), else float64

    @property
    def channels(self) -> int:
        """Number of output channels (1 when the constants are shared)."""
        return len(self.weight) if self.weight is not None else len(self.offset)


@dataclass
class NpuModel:
    """An integer model as read from an ONNX file (or a C header)."""

    input_stage: InputStage
    layers: list[NpuLayer]
    input_shape: tuple[int, ...]
    output_scale: float = float("nan")   # logit = code * output_scale (nan: the file gives codes)
    output_dtype: str = "float32"        # dtype of the file's output tensor
    source: str = ""
    notes: dict = field(default_factory=dict)


def _fail(path: str, what: str) -> ValueError:
    """A ValueError that names the file."""
    return ValueError(f"{path}: {what}")


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs as NumPy arrays."""
    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute:
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _chain(proto: onnx.ModelProto, consts: dict, path: str) -> list[onnx.NodeProto]:
    """The graph's nodes from input to output, checked to form one chain."""
    current = proto.graph.input[0].name
    order = []
    nodes = [n for n in proto.graph.node if n.op_type != "Constant"]
    for node in nodes:
        data = [i for i in node.input if i and i not in consts]
        missing = [i for i in data if i != current]
        if current in data and missing:
            raise _fail(path, f"{node.op_type} node {node.name}: required tensor {missing[0]!r} is "
                              "missing (neither an initializer nor a constant).")
        if data != [current]:
            raise _fail(path, f"node {node.name or node.op_type} does not continue the single "
                              f"chain from the input (reads {list(node.input)}): a branching graph "
                              "is not a TINPU integer model of this course.")
        order.append(node)
        current = node.output[0]
    return order


def _const_input(node: onnx.NodeProto, consts: dict, path: str) -> np.ndarray:
    """The one constant operand of a binary node, as float64."""
    found = [consts[i] for i in node.input if i in consts]
    if len(found) != 1:
        raise _fail(path, f"{node.op_type} node {node.name} needs one constant operand "
                          f"(an initializer); found {len(found)} among {list(node.input)}.")
    return np.asarray(found[0], np.float64)


def _clip_range(node: onnx.NodeProto, consts: dict, path: str) -> tuple[int, int]:
    """(min, max) of a Clip node, from its inputs (opset >= 11) or attributes."""
    a = _attrs(node)
    names = list(node.input[1:]) + ["", ""]
    lo = consts[names[0]] if names[0] in consts else a.get("min")
    hi = consts[names[1]] if names[1] in consts else a.get("max")
    if lo is None or hi is None:
        missing = [n or "(empty)" for n, v in zip(names[:2], (lo, hi)) if v is None]
        raise _fail(path, f"Clip node {node.name} has no constant bound(s) {missing}: the clamp "
                          "range of an integer layer must be in the file.")
    lo, hi = float(np.asarray(lo).ravel()[0]), float(np.asarray(hi).ravel()[0])
    if lo != round(lo) or hi != round(hi):
        raise _fail(path, f"Clip node {node.name} clamps to [{lo}, {hi}], not integers.")
    return int(lo), int(hi)


def split_multiplier(m: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(integer mult, right shift) with m == mult * 2**-shift exactly, the smallest shift."""
    m = np.asarray(m, np.float64).ravel()
    shift = np.zeros(m.shape, np.int64)
    mult = m.copy()
    for _ in range(MAX_SHIFT):
        frac = mult != np.round(mult)
        if not frac.any():
            break
        mult[frac] *= 2
        shift[frac] += 1
    if (mult != np.round(mult)).any():
        raise ValueError(f"{where}: multiplier {m[mult != np.round(mult)][0]!r} is not an integer "
                         f"times 2**-shift for any shift up to {MAX_SHIFT}.")
    return mult.astype(np.int64), shift


def _requant(seg: list[onnx.NodeProto], consts: dict, path: str, name: str) -> dict:
    """offset, mult, shift and clamps of a segment Add? Mul* Floor Clip (Casts ignored)."""
    offset, m, saw_floor, rng, float32 = np.zeros(1), np.ones(1), False, None, True
    for node in seg:
        op = node.op_type
        if op == "Add" and not saw_floor:
            if not np.all(m == 1):
                raise _fail(path, f"{name}: Add {node.name} after a Mul is not the TINPU "
                                  "(acc + offset) * mult form.")
            offset = offset + _const_input(node, consts, path).ravel()
        elif op == "Mul" and not saw_floor:
            m = m * _const_input(node, consts, path).ravel()
        elif op == "Floor":
            saw_floor = True
        elif op == "Clip" and saw_floor:
            rng = _clip_range(node, consts, path)
            break   # what follows the clamp is the output stage, read by load_integer_onnx
        elif op == "Cast":
            # The course's first form carried the product in float64 (exact); TI's in float32.
            float32 = float32 and _attrs(node).get("to") != onnx.TensorProto.DOUBLE
        elif op not in _PASS:
            raise _fail(path, f"{name}: unexpected {op} node {node.name} in the requantization "
                              "(expected Add, Mul, Floor, Clip).")
    if not saw_floor or rng is None:
        raise _fail(path, f"{name}: requantization lacks its Floor and Clip nodes.")
    if np.any(offset != np.round(offset)):
        raise _fail(path, f"{name}: offset {offset[offset != np.round(offset)][0]!r} is not an "
                          "integer; the NPU adds an integer offset.")
    mult, shift = split_multiplier(m, f"{path}: {name}")
    return dict(offset=offset.astype(np.int64), mult=mult, shift=shift, qmin=rng[0], qmax=rng[1],
                float32_product=float32)


def _declared_bits(proto: onnx.ModelProto) -> dict[str, int]:
    """Per-layer weight bits recorded in the file's metadata (empty when absent)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    return {k: int(v) for k, v in json.loads(meta.get(WEIGHT_BITS_KEY, "{}")).items()}


def _integer_weight(values: np.ndarray, tensor: str, path: str, bits: int | None) -> tuple[np.ndarray, int]:
    """Integer weights (int8) and their bit width, refusing fractions and out-of-range values."""
    v = np.asarray(values, np.float64)
    if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
        bad = v[~np.isfinite(v) | (v != np.round(v))].ravel()[0]
        raise _fail(path, f"weight tensor '{tensor}' holds the non-integer value {bad!r}: this is "
                          "a float (or fake-quantized) model, not an integer export.")
    peak = int(np.abs(v).max()) if v.size else 0
    if bits is None:
        fitting = [b for b in sorted(WEIGHT_BITS) if peak <= 2 ** (b - 1) - 1]
        if not fitting:
            raise _fail(path, f"weight tensor '{tensor}' reaches {peak}, beyond int8 [-127, 127].")
        bits = fitting[0]
    elif peak > 2 ** (bits - 1) - 1:
        raise _fail(path, f"weight tensor '{tensor}' reaches {peak}, outside its declared "
                          f"{bits}-bit range [{-(2 ** (bits - 1) - 1)}, {2 ** (bits - 1) - 1}].")
    return v.astype(np.int8), bits


def _layer_name(node: onnx.NodeProto, weight_name: str | None, index: int) -> str:
    """A readable layer name: the weight's module path (TI: 'conv1.0.weight' -> 'conv1')."""
    if weight_name:
        return weight_name.rsplit(".weight", 1)[0].removesuffix(".0")
    return (node.name.rsplit("/", 1)[0] if "/" in node.name else f"pool{index}")


def _compute_layer(node: onnx.NodeProto, seg: list, consts: dict, path: str, index: int,
                   bits: dict[str, int] | int | None) -> NpuLayer:
    """One NpuLayer from its compute node and the requantization nodes after it."""
    op, a = _OPS[node.op_type], _attrs(node)
    weight = bias = None
    w_bits = None
    stride, padding, groups = (1, 1), (0, 0), 1
    if op != "avgpool":
        w_name = node.input[1]
        if w_name not in consts:
            raise _fail(path, f"{node.op_type} node {node.name}: weight '{w_name}' is not an "
                              "initializer (missing required tensor).")
        name = _layer_name(node, w_name, index)
        declared = bits.get(name) if isinstance(bits, dict) else bits
        w = consts[w_name]
        if node.op_type == "MatMul" or (op == "linear" and not a.get("transB", 0)):
            w = np.asarray(w).T
        weight, w_bits = _integer_weight(w, w_name, path, declared)
        if len(node.input) > 2 and node.input[2]:
            b = consts.get(node.input[2])
            if b is None:
                raise _fail(path, f"{node.name}: bias '{node.input[2]}' is not an initializer.")
            if np.any(b != np.round(b)):
                raise _fail(path, f"bias tensor '{node.input[2]}' holds non-integer values.")
            bias = np.asarray(b).astype(np.int64)
        if op == "conv":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[:2] != pads[2:]:
                raise _fail(path, f"{node.name}: asymmetric padding {pads} is not supported.")
            stride, padding, groups = tuple(a.get("strides", (1, 1))), (pads[0], pads[1]), int(a.get("group", 1))
    else:
        name = _layer_name(node, None, index)
    return NpuLayer(name=name, op=op, weight=weight, bias=bias, stride=stride, padding=padding,
                    groups=groups, weight_bits=w_bits, **_requant(seg, consts, path, name))


def _input_stage(seg: list[onnx.NodeProto], consts: dict, path: str) -> InputStage:
    """The nodes before the first layer: quantization of the float input."""
    steps, rng = [], None
    for node in seg:
        if node.op_type in ("Add", "Mul", "Div"):
            steps.append((node.op_type, _const_input(node, consts, path).astype(np.float32).ravel()))
        elif node.op_type in ("Floor", "Round"):
            steps.append((node.op_type, None))
        elif node.op_type == "Clip":
            rng = _clip_range(node, consts, path)
        elif node.op_type not in _PASS:
            raise _fail(path, f"input stage: unexpected {node.op_type} node {node.name}.")
    if rng is None or not any(op in ("Floor", "Round") for op, _ in steps):
        raise _fail(path, "is not an integer model (not a TINPU integer model): no input "
                          "quantization (Floor/Round and Clip before the first layer); a float "
                          "model has no integers to read.")
    return InputStage(steps, *rng)


def load_integer_onnx(path: str | Path, weight_bits: int | dict[str, int] | None = None) -> NpuModel:
    """The integer model in a TINPU integer ONNX file (TI's export or the course's).

    ``weight_bits`` (one width, or per layer) is checked against the weights; without it, the
    file's ``weight_bits`` metadata is used, else each layer's width is inferred from its values.
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: export the integer model first.")
    from kws_utils.export import load_onnx   # here: this module stays free of torch imports
    proto = load_onnx(path)                  # a clear error for a truncated or non-ONNX file
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        raise _fail(path, "is a QDQ (fake-quant: QuantizeLinear/DequantizeLinear) ONNX file, not "
                          "the TINPU integer form this reader needs. Export it again with the "
                          "default model_qconfig_format (TINPU_INT_MODEL).")
    consts = _constants(proto)
    nodes = _chain(proto, consts, path)
    starts = [i for i, n in enumerate(nodes) if n.op_type in _OPS]
    if not starts:
        raise _fail(path, "is not an integer model (not a TINPU integer model): no Conv, Gemm or ReduceSum layer.")
    bits = weight_bits if weight_bits is not None else (_declared_bits(proto) or None)
    stage = _input_stage(nodes[:starts[0]], consts, path)
    ends = starts[1:] + [len(nodes)]
    layers = [_compute_layer(nodes[s], nodes[s + 1:e], consts, path, i, bits)
              for i, (s, e) in enumerate(zip(starts, ends))]
    # After the last Clip: the course's first form cast to int8 or scaled back to logits.
    tail = nodes[starts[-1]:]
    last_clip = max(i for i, n in enumerate(tail) if n.op_type == "Clip")
    scale = float("nan")
    for node in tail[last_clip + 1:]:
        if node.op_type == "Mul":
            scale = float(_const_input(node, consts, path).ravel()[0])
    out_type = proto.graph.output[0].type.tensor_type.elem_type
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    return NpuModel(stage, layers, tuple(d.dim_value for d in dims), scale,
                    onnx.helper.tensor_dtype_to_np_dtype(out_type).name, path)


def packed_weight_bytes(source: str | Path | NpuModel) -> int:
    """Bytes of all conv/linear weights packed at each layer's bit width (biases not counted)."""
    m = source if isinstance(source, NpuModel) else load_integer_onnx(source)
    return sum(-(-l.weight.size * l.weight_bits // 8) for l in m.layers if l.weight is not None)
