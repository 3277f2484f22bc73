"""ONNX export of the float DS-CNN, running ONNX files, and reading their graphs.

The quantized models' writers (TI NPU integer form, QDQ form) live in ``kws_utils.quant.onnx_form``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kws_utils import config, files
from kws_utils.errors import FileFormatError, InputError, InputTypeError, MissingFileError
from kws_utils.model import check_input

OUTPUT_SCALE_KEY = "output_scale"  # ONNX metadata: int8 output codes x this = float logits


def _default_example() -> torch.Tensor:
    """One all-zero DS-CNN input (1, 1, 49, 10)."""
    return torch.zeros(1, *config.INPUT_SHAPE)


MIN_OPSET, MAX_OPSET = 13, 20   # opsets the TorchScript exporter writes and onnxruntime reads


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                opset_version: int = 17) -> Path:
    """Export the float DS-CNN to ONNX (input 'input', output 'logits', dynamic batch), checked."""
    example = _default_example() if example is None else example
    check_input(example)
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) \
            or not MIN_OPSET <= opset_version <= MAX_OPSET:
        raise InputError(f"opset_version={opset_version!r}: give a whole number from {MIN_OPSET} "
                         f"to {MAX_OPSET} (onnxruntime and the exporter both support those; "
                         "the course uses 17).")
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
    if session.get_inputs()[0].shape[0] == 1:
        batch_size = 1   # a file exported with a fixed batch of one (TI's export by default)
    if len(x_t) == 0:    # one row gives the output width; no rows of it are returned
        return session.run(None, {name: np.zeros((1, *config.INPUT_SHAPE), np.float32)})[0][:0]
    batches = [session.run(None, {name: x_t[i:i + batch_size].numpy()})[0]
               for i in range(0, len(x_t), batch_size)]
    return np.concatenate(batches)



def onnx_accuracy(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of inputs whose top ONNX output is the label, over the whole set ``x``."""
    return float((onnx_predict(path, x).argmax(1) == np.asarray(y)).mean())

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
