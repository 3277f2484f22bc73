"""ONNX writers for an IntegerModel: TI's TINPU integer form and the QDQ (fake-quant) form.

The integer graph carries integers in float32 tensors, exactly like the TINPU_INT_MODEL that TI's
``tinyml_torchmodelopt`` exports (same operators in the same order), so TI's downstream tools
accept either file. Conv/Gemm/ReduceSum are exact because every accumulator stays below 2**24
(``IntegerModel`` checks the bound); the requantization multiplies by ``mult * 2**-shift``, a
float32 constant, in the same float32 steps as ``IntegerModel``, so onnxruntime reproduces it
bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kws_utils.export import OUTPUT_SCALE_KEY
from kws_utils.files import atomic_path

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


def _requantize(g: _GraphBuilder, x: str, n: str, offset: np.ndarray, multiplier: np.ndarray,
                qmin: int, qmax: int, shape: list[int]) -> str:
    """TI's requantization: Add(offset) -> Mul(mult * 2**-shift) -> Floor -> Clip, in float32."""
    x = g.node("Add", [x, g.const(f"{n}.offset", np.reshape(offset, shape), np.float32)], f"{n}/add_offset")
    x = g.node("Mul", [x, g.const(f"{n}.scale", np.reshape(multiplier, shape), np.float32)], f"{n}/mul_scale")
    x = g.node("Floor", [x], f"{n}/floor")
    return g.node("Clip", [x, g.const(f"{n}.qmin", qmin, np.float32),
                           g.const(f"{n}.qmax", qmax, np.float32)], f"{n}/clip")


def _layer(g: _GraphBuilder, x: str, layer: Any) -> str:
    """Nodes of one IntLayer: the integer op without bias, then the requantization."""
    n = layer.name
    if layer.op == "avgpool":
        x = g.node("ReduceSum", [x, g.const(f"{n}.axes", [2, 3], np.int64)], f"{n}/sum", keepdims=0)
        shape = [1, -1]
        x = g.node("Round", [x], f"{n}/round")
    else:
        w = g.const(f"{n}.weight", layer.weight, np.float32)
        if layer.op == "linear":
            shape = [1, -1]
            x = g.node("Gemm", [x, w], f"{n}/gemm", transB=1)
        else:
            shape = [1, -1, 1, 1]
            ph, pw = layer.padding
            x = g.node("Conv", [x, w], f"{n}/conv", strides=list(layer.stride), pads=[ph, pw, ph, pw],
                       group=layer.groups, kernel_shape=list(layer.weight.shape[2:]),
                       dilations=[1, 1])
    return _requantize(g, x, n, layer.total_offset(), layer.multiplier(), layer.qmin,
                       layer.qmax, shape)


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
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
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
    """Write an ``IntegerModel`` in TI's TINPU integer ONNX form, checked with onnx.checker.

    The node sequence is TI's: Add/Mul/Floor/Clip for the input, then per layer Conv or Gemm
    (no bias) or ReduceSum/Round, each followed by Add/Mul/Floor/Clip. The output holds the
    integer codes as float32, as TI's does; with output 'float' a final Mul scales them.
    """
    in_name, out_name = (input_names or ["input"])[0], (output_names or ["output"])[0]
    g = _GraphBuilder()
    stage = int_model.input_stage
    x = _requantize(g, in_name, "input", np.float32(stage.offset), stage.multiplier(), stage.qmin,
                    stage.qmax, [1, 1, 1, 1])
    for layer in int_model.layers:
        x = _layer(g, x, layer)
    if int_model.output == "float":
        g.node("Mul", [x, g.const("output.scale", int_model.output_scale, np.float32)], out_name)
    else:
        g.nodes[-1].output[0] = out_name   # the last Clip is the output, as in TI's graph
    return _save(g, "tinpu_integer_model", in_name, int_model.input_shape, out_name,
                 TensorProto.FLOAT, _n_out(int_model), filename, opset_version,
                 1.0 if int_model.output == "float" else int_model.output_scale)
