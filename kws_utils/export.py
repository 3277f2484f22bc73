"""ONNX export: the float DS-CNN, the fake-quantized (QDQ) model and the TI NPU integer model.

The integer graph carries integers in float tensors: Conv/Gemm/ReduceSum run in float32, exact
because every accumulator stays below 2**24 (``kws_utils.quant`` checks the bound), and the
requantization ``clamp(floor((acc + offset) * mult * 2**-shift))`` runs in float64, exact
because ``(acc + offset) * mult`` stays far below 2**53. So onnxruntime reproduces
``IntegerModel`` bit for bit.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kws_utils import config, files
from kws_utils.errors import FileFormatError, InputError, InputTypeError, MissingFileError
from kws_utils.model import check_input

_ONNX_INT = {torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
             torch.int16: TensorProto.INT16}


def _default_example() -> torch.Tensor:
    """One all-zero DS-CNN input (1, 1, 49, 10)."""
    return torch.zeros(1, *config.INPUT_SHAPE)


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                opset_version: int = 17) -> Path:
    """Export the float DS-CNN to ONNX (input 'input', output 'logits', dynamic batch), checked."""
    example = _default_example() if example is None else example
    check_input(example)
    path = Path(path)
    was_training = model.training
    model.eval()
    # Written and checked under a temporary name: a failure keeps any previous file intact.
    with files.atomic_path(path) as tmp:
        try:
            # TorchScript exporter: a clean Conv/Relu/Gemm graph for this small CNN, dynamic batch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=opset_version,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        finally:
            model.train(was_training)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    return path


def _session(path: str | Path) -> ort.InferenceSession:
    """A CPU onnxruntime session, with a clear error for a missing file."""
    load_onnx(path)     # a clear error for a missing or non-ONNX file, before onnxruntime's
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, with a clear error for a missing, truncated or non-ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found: export the model first.")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise FileFormatError(f"{path} is not a readable ONNX file ({type(err).__name__}): it is "
                              "truncated or of another format. Export the model again.") from None
    if not proto.graph.node:
        raise FileFormatError(f"{path} holds no ONNX graph (empty or another format). Export the "
                              "model again.")
    return proto


def onnx_predict(path: str | Path, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run an ONNX model over a whole input set (N, 1, 49, 10) in batches; stacked outputs."""
    try:
        x_t = torch.as_tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputTypeError(f"x must be a numeric array (N, 1, 49, 10), got {type(x).__name__} "
                             f"({err}).") from None
    check_input(x_t)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: give a whole number of inputs >= 1.")
    session = _session(path)
    name = session.get_inputs()[0].name
    batches = [session.run(None, {name: x_t[i:i + batch_size].numpy()})[0]
               for i in range(0, len(x_t), batch_size)]
    return np.concatenate(batches)


def _shape_text(value: onnx.ValueInfoProto) -> str:
    """'NxCxHxW'-style text of a value's shape ('?' where unknown)."""
    dims = value.type.tensor_type.shape.dim
    return "x".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                    for d in dims) or "scalar"


def graph_summary(path: str | Path) -> str:
    """A text table of the ONNX graph's nodes: op, name, output shapes, initializer shapes."""
    proto = onnx.shape_inference.infer_shapes(load_onnx(path))
    graph = proto.graph
    shapes = {v.name: _shape_text(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    inits = {i.name: "x".join(map(str, i.dims)) or "scalar" for i in graph.initializer}
    rows = [("#", "op", "name", "output shape", "initializers")]
    for i, node in enumerate(graph.node):
        params = ", ".join(inits[n] for n in node.input if n in inits)
        outs = ", ".join(shapes.get(o, "?") for o in node.output)
        rows.append((str(i), node.op_type, node.name or "-", outs, params))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    ins = ", ".join(f"{v.name} {_shape_text(v)}" for v in graph.input if v.name not in inits)
    outs = ", ".join(f"{v.name} {_shape_text(v)}" for v in graph.output)
    return "\n".join([f"inputs: {ins}", f"outputs: {outs}", *lines])


# ----------------------------------------------------------------------------------------------
# Integer model -> ONNX with onnx.helper
# ----------------------------------------------------------------------------------------------
class _GraphBuilder:
    """Collects nodes and initializers; every node gets a readable, unique name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: Any, dtype: type) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add a node whose single output is named like the node; return that name."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def _requantize(g: _GraphBuilder, acc: str, layer: Any, shape: list[int]) -> str:
    """float32 accumulator -> float64 requantization -> float32 integer activations."""
    n = layer.name
    x = g.node("Cast", [acc], f"{n}/to_f64", to=TensorProto.DOUBLE)
    x = g.node("Add", [x, g.const(f"{n}.offset", layer.offset.reshape(shape), np.float64)], f"{n}/add_offset")
    x = g.node("Mul", [x, g.const(f"{n}.mult", layer.mult.reshape(shape), np.float64)], f"{n}/mul_mult")
    x = g.node("Mul", [x, g.const(f"{n}.shift_scale", 2.0 ** -layer.shift.reshape(shape).astype(np.float64),
                                  np.float64)], f"{n}/shift")
    x = g.node("Floor", [x], f"{n}/floor")
    x = g.node("Clip", [x, g.const(f"{n}.qmin", layer.qmin, np.float64),
                        g.const(f"{n}.qmax", layer.qmax, np.float64)], f"{n}/clip")
    return g.node("Cast", [x], f"{n}/to_f32", to=TensorProto.FLOAT)


def _layer(g: _GraphBuilder, x: str, layer: Any) -> str:
    """Nodes of one IntLayer: the integer op, then the requantization."""
    n = layer.name
    if layer.op == "avgpool":
        acc = g.node("ReduceSum", [x, g.const(f"{n}.axes", [2, 3], np.int64)], f"{n}/sum", keepdims=0)
        return _requantize(g, acc, layer, [1, -1])
    w = g.const(f"{n}.weight", layer.weight, np.float32)
    b = g.const(f"{n}.bias", layer.bias, np.float32)
    if layer.op == "linear":
        return _requantize(g, g.node("Gemm", [x, w, b], f"{n}/gemm", transB=1), layer, [1, -1])
    ph, pw = layer.padding
    acc = g.node("Conv", [x, w, b], f"{n}/conv", strides=list(layer.stride), pads=[ph, pw, ph, pw],
                 group=layer.groups, kernel_shape=list(layer.weight.shape[2:]))
    return _requantize(g, acc, layer, [1, -1, 1, 1])


def _qdq(g: _GraphBuilder, x: str, name: str, scale: float, qmin: int, qmax: int) -> str:
    """QuantizeLinear + DequantizeLinear to int8 (signed) or uint8 (ReLU outputs, qmin 0)."""
    if (qmin, qmax) not in ((0, 255), (-128, 127)):
        raise ValueError(f"{name}: range [{qmin}, {qmax}] is neither uint8 nor int8.")
    zp = g.const(f"{name}.zero_point", 0, np.uint8 if qmin == 0 else np.int8)
    s = g.const(f"{name}.scale", scale, np.float32)
    return g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, zp], f"{name}/q"), s, zp], f"{name}/dq")


def _dq_param(g: _GraphBuilder, name: str, values: np.ndarray, scale: np.ndarray) -> str:
    """DequantizeLinear of an integer parameter with per-output-channel scales (axis 0)."""
    q = g.const(name, values, values.dtype)
    s = g.const(f"{name}_scale", scale, np.float32)
    zp = g.const(f"{name}_zero_point", np.zeros(len(scale)), values.dtype)
    return g.node("DequantizeLinear", [q, s, zp], f"{name}/dq", axis=0)


def _qdq_layer(g: _GraphBuilder, x: str, layer: Any) -> str:
    """Float op on dequantized integer weights, then quantize-dequantize of its output."""
    n = layer.name
    if layer.op == "avgpool":
        y = g.node("Flatten", [g.node("GlobalAveragePool", [x], f"{n}/pool")], f"{n}/flatten")
        return _qdq(g, y, f"{n}.out", layer.output_scale, layer.qmin, layer.qmax)
    w = _dq_param(g, f"{n}.weight", layer.weight, layer.weight_scale)
    b = _dq_param(g, f"{n}.bias", layer.bias, layer.input_scale * layer.weight_scale)
    if layer.op == "linear":
        y = g.node("Gemm", [x, w, b], f"{n}/gemm", transB=1)
    else:
        ph, pw = layer.padding
        y = g.node("Conv", [x, w, b], f"{n}/conv", strides=list(layer.stride), pads=[ph, pw, ph, pw],
                   group=layer.groups, kernel_shape=list(layer.weight.shape[2:]))
    return _qdq(g, y, f"{n}.out", layer.output_scale, layer.qmin, layer.qmax)


OUTPUT_SCALE_KEY = "output_scale"  # metadata: int8 output codes x this = float logits


def _save(g: _GraphBuilder, name: str, in_name: str, input_shape: tuple, out_name: str,
          out_type: int, n_out: int | None, filename: str | Path, opset_version: int,
          output_scale: float) -> Path:
    """Assemble, check and write the model, recording the output scale as metadata."""
    graph = helper.make_graph(
        g.nodes, name, [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(out_name, out_type, ["N", n_out])], g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version)],
                              producer_name="kws_utils.quant")
    # An int8-output model is only usable for posteriors with its scale; keep it in the file.
    helper.set_model_props(proto, {OUTPUT_SCALE_KEY: repr(float(output_scale))})
    onnx.checker.check_model(proto, full_check=True)
    path = Path(filename)
    files.write_bytes(path, proto.SerializeToString())
    return path


def _n_out(int_model: Any) -> int | None:
    """Number of output features (None after a final pool)."""
    last = int_model.layers[-1]
    return len(last.weight) if last.weight is not None else None


def export_qdq_onnx(int_model: Any, filename: str | Path, input_names: list[str] | None = None,
                    output_names: list[str] | None = None, opset_version: int = 17) -> Path:
    """Write the fake-quantized model (BN folded) as float ops between QuantizeLinear/DequantizeLinear."""
    in_name, out_name = (input_names or ["input"])[0], (output_names or ["output"])[0]
    g = _GraphBuilder()
    x = _qdq(g, in_name, "input", int_model.input_scale, int_model.input_qmin, int_model.input_qmax)
    for layer in int_model.layers:
        x = _qdq_layer(g, x, layer)
    g.node("Identity", [x], out_name)
    return _save(g, "tinpu_qdq_model", in_name, int_model.input_shape, out_name, TensorProto.FLOAT,
                 _n_out(int_model), filename, opset_version, 1.0)


def export_integer_onnx(int_model: Any, filename: str | Path, input_names: list[str] | None = None,
                        output_names: list[str] | None = None, opset_version: int = 17) -> Path:
    """Write an ``IntegerModel`` as ONNX (standard ops only), checked with onnx.checker."""
    from kws_utils.quant import output_int_dtype
    in_name, out_name = (input_names or ["input"])[0], (output_names or ["output"])[0]
    g = _GraphBuilder()
    x = g.node("Div", [in_name, g.const("input.scale", int_model.input_scale, np.float32)], "input_quant/div")
    x = g.node("Round", [x], "input_quant/round")
    x = g.node("Clip", [x, g.const("input.qmin", int_model.input_qmin, np.float32),
                        g.const("input.qmax", int_model.input_qmax, np.float32)], "input_quant/clip")
    for layer in int_model.layers:
        x = _layer(g, x, layer)
    if int_model.output == "float":
        g.node("Mul", [x, g.const("output.scale", int_model.output_scale, np.float32)], out_name)
        out_type = TensorProto.FLOAT
    else:
        out_type = _ONNX_INT[output_int_dtype(int_model.layers[-1])]
        g.node("Cast", [x], out_name, to=out_type)
    return _save(g, "tinpu_integer_model", in_name, int_model.input_shape, out_name, out_type,
                 _n_out(int_model), filename, opset_version,
                 1.0 if int_model.output == "float" else int_model.output_scale)
