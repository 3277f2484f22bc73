"""The TI NPU integer model: plain per-layer data (IntLayer) and an exact integer forward."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize
from torch.fx.passes.shape_prop import ShapeProp

from kws_utils import config, model as kws_model
from kws_utils.quant import onnx_form
from kws_utils.quant.qconfig import FLOAT32_EXACT, MAX_SHIFT, MULT_BITS, output_int_dtype


@dataclass
class IntLayer:
    """One NPU layer: integer op, then ``clamp(floor((acc + offset) * mult * 2**-shift))``.

    op: 'conv' (weight (Cout, Cin/groups, kh, kw)), 'linear' (weight (out, in)) or 'avgpool'
    (global average pool: acc = sum over H x W, weight/bias None). All per-channel arrays have
    one entry per output channel; acc = integer op + bias, int32 range.
    """

    name: str
    op: str
    weight: np.ndarray | None      # int8 storage, values within the weight bitwidth
    bias: np.ndarray | None        # int32, in accumulator units (input_scale * weight_scale)
    stride: tuple[int, int]
    padding: tuple[int, int]       # (top/bottom, left/right), symmetric as in nn.Conv2d
    groups: int
    offset: np.ndarray             # int32, rounding term added before the multiply
    mult: np.ndarray               # int32, 1 .. 2**MULT_BITS - 1
    shift: np.ndarray              # int32, 0 .. 31 (right shift)
    qmin: int                      # 0 when ReLU is folded into the clamp
    qmax: int
    weight_bits: int | None
    input_scale: float
    weight_scale: np.ndarray | None  # float, per output channel
    output_scale: float


def requant_params(real_mult: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (offset, mult, shift) with mult * 2**-shift ~= real_mult and round-half-up."""
    real_mult = np.asarray(real_mult, dtype=np.float64)
    mantissa, exponent = np.frexp(real_mult)
    exact_power2 = mantissa == 0.5
    shift = np.where(exact_power2, 1 - exponent,
                     np.floor(np.log2((2 ** MULT_BITS - 1) / real_mult))).astype(np.int64)
    if (shift < 0).any() or (shift > MAX_SHIFT).any():
        raise ValueError(f"requantization multiplier out of range ({real_mult.min():.3g} .. "
                         f"{real_mult.max():.3g}): the output scale does not suit the layer; "
                         "calibrate with representative data.")
    mult = np.where(exact_power2, 1, np.round(real_mult * 2.0 ** shift)).astype(np.int64)
    # offset * mult ~= 2**(shift-1): floor() then rounds to nearest instead of down
    offset = np.where(shift > 0, np.floor(2.0 ** (shift - 1) / mult + 0.5), 0).astype(np.int64)
    return offset.astype(np.int32), mult.astype(np.int32), shift.astype(np.int32)


def _act_range(fq: FakeQuantize) -> tuple[float, int, int]:
    """(scale, qmin, qmax) of an activation quantizer, in zero-point-free integers."""
    zp = int(fq.zero_point.item())
    return float(fq.scale.item()), fq.quant_min - zp, fq.quant_max - zp


def _folded_weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias with BatchNorm folded in, exactly as the QAT module fake-quantizes them."""
    bias = mod.bias if mod.bias is not None else torch.zeros(mod.weight.shape[0])
    if not hasattr(mod, "bn"):
        return mod.weight.detach(), bias.detach()
    bn = mod.bn
    # Same float ops as torch.ao's ConvBn forward, so integer weights equal the fake-quant ones.
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = mod.weight * factor.reshape([-1] + [1] * (mod.weight.dim() - 1))
    bias = (bias - bn.running_mean) * factor + bn.bias
    return weight.detach(), bias.detach()


def _weighted_layer(name: str, mod: nn.Module, in_scale: float, out_fq: FakeQuantize,
                    bits: int) -> IntLayer:
    """IntLayer for a fused conv(-bn)(-relu) or linear(-relu) QAT module."""
    weight, bias = _folded_weight_bias(mod)
    fq = mod.weight_fake_quant
    w_scale = fq.scale.detach().double().reshape(-1).expand(weight.shape[0]).clone()
    shape = [-1] + [1] * (weight.dim() - 1)
    inv = (1.0 / fq.scale.detach().float()).reshape(shape if fq.scale.numel() > 1 else [])
    w_int = torch.clamp(torch.round(weight.float() * inv), fq.quant_min, fq.quant_max)
    acc_scale = in_scale * w_scale
    b_int = torch.round(bias.double() / acc_scale)
    out_scale, qmin, qmax = _act_range(out_fq)
    if isinstance(mod, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d, nniqat.LinearReLU)):
        qmin = max(qmin, 0)
    offset, mult, shift = requant_params((acc_scale / out_scale).numpy())
    conv = isinstance(mod, nn.Conv2d)
    return IntLayer(
        name=name, op="conv" if conv else "linear", weight=w_int.numpy().astype(np.int8),
        bias=_int32(b_int.numpy(), name), stride=tuple(mod.stride) if conv else (1, 1),
        padding=_padding(mod) if conv else (0, 0), groups=mod.groups if conv else 1,
        offset=offset, mult=mult, shift=shift, qmin=qmin, qmax=qmax, weight_bits=bits,
        input_scale=in_scale, weight_scale=w_scale.numpy(), output_scale=out_scale)


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Symmetric integer padding of a conv (string padding modes are not supported)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"conv padding {conv.padding!r}/{conv.padding_mode}: use "
                                  "integer zero padding for the NPU export.")
    return tuple(conv.padding)


def _int32(values: np.ndarray, name: str) -> np.ndarray:
    """Cast to int32, refusing values that do not fit."""
    if np.abs(values).max(initial=0) >= 2 ** 31:
        raise ValueError(f"{name}: integer bias does not fit int32; the layer's input or weight "
                         "scale is far too small for its bias.")
    return values.astype(np.int32)


def _pool_layer(name: str, in_fq: FakeQuantize, out_fq: FakeQuantize, area: int) -> IntLayer:
    """IntLayer for a global average pool: sum over H x W, then requantize by 1/area."""
    in_scale, in_min, in_max = _act_range(in_fq)
    if max(abs(in_min), abs(in_max)) * area >= FLOAT32_EXACT:
        raise ValueError(f"{name}: pooling {area} positions can exceed 2**24 (float32 exactness).")
    out_scale, qmin, qmax = _act_range(out_fq)
    # one set of requantization constants (shape (1,)), broadcast over the channels
    offset, mult, shift = requant_params(np.array([in_scale / (out_scale * area)]))
    return IntLayer(name=name, op="avgpool", weight=None, bias=None, stride=(1, 1),
                    padding=(0, 0), groups=1, offset=offset, mult=mult, shift=shift, qmin=qmin,
                    qmax=qmax, weight_bits=None, input_scale=in_scale, weight_scale=None,
                    output_scale=out_scale)


_WEIGHTED = (nniqat.ConvBnReLU2d, nniqat.ConvBn2d, nniqat.ConvReLU2d, nnqat.Conv2d,
             nniqat.LinearReLU, nnqat.Linear)
_PASS_THROUGH = (nn.Dropout, nn.Flatten, nn.Identity)


def build_integer_model(prepared: torch.fx.GraphModule, example_inputs: tuple, weight_bits: int,
                        output: str = "int8") -> "IntegerModel":
    """Read a prepared (fake-quant) FX model, layer by layer, into an IntegerModel."""
    graph_module = copy.deepcopy(prepared).eval()
    ShapeProp(graph_module).propagate(*example_inputs)   # records the tensor shapes on nodes
    input_fq, current, pending, layers = None, None, None, []
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        # get_submodule, not named_modules(): shared quantizers appear there under one name only
        mod = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize):
            if pending is not None:
                layers.append(pending(mod))
                pending = None
            elif current is not None and _act_range(mod) != _act_range(current):
                raise NotImplementedError(f"{node.name} requantizes without a layer; not supported.")
            input_fq = mod if input_fq is None else input_fq
            current = mod
        elif isinstance(mod, _WEIGHTED) and current is not None and pending is None:
            pending = partial(_weighted_layer, node.target, mod, _act_range(current)[0],
                              bits=weight_bits)
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and current is not None and pending is None:
            if mod.output_size not in (1, (1, 1)):
                raise NotImplementedError(f"{node.target}: only global pooling (output 1x1) is supported.")
            area = math.prod(node.args[0].meta["tensor_meta"].shape[2:])
            pending = partial(_pool_layer, node.target, current, area=area)
        elif not isinstance(mod, _PASS_THROUGH):
            what = type(mod).__name__ if mod is not None else f"{node.op} {node.target}"
            raise NotImplementedError(
                f"{node.name} ({what}) has no TI NPU integer form in kws_utils.quant; supported: "
                "Conv2d(+BN)(+ReLU), Linear(+ReLU), global AdaptiveAvgPool2d, Dropout, Flatten.")
    if pending is not None or input_fq is None:
        raise NotImplementedError("the graph does not end with a quantized layer.")
    return IntegerModel(_act_range(input_fq), layers, tuple(example_inputs[0].shape[1:]), output)


def _requantize(acc: torch.Tensor, layer: IntLayer, shape: list[int]) -> torch.Tensor:
    """clamp(floor((acc + offset) * mult / 2**shift)) in exact int64 arithmetic."""
    offset, mult, shift = (torch.from_numpy(v.astype(np.int64)).reshape(shape)
                           for v in (layer.offset, layer.mult, layer.shift))
    return torch.clamp(((acc + offset) * mult) >> shift, layer.qmin, layer.qmax)


def run_layer(layer: IntLayer, x: torch.Tensor) -> torch.Tensor:
    """One integer layer on int64 activations (float32 is exact: accumulators < 2**24)."""
    if layer.op == "avgpool":
        return _requantize(x.sum(dim=(2, 3)), layer, [1, -1])
    weight = torch.from_numpy(layer.weight).float()
    bias = torch.from_numpy(layer.bias).float()
    if layer.op == "conv":
        acc = F.conv2d(x.float(), weight, bias, layer.stride, layer.padding, groups=layer.groups)
        return _requantize(acc.long(), layer, [1, -1, 1, 1])
    return _requantize(F.linear(x.float(), weight, bias).long(), layer, [1, -1])


class IntegerModel(nn.Module):
    """The TI NPU integer model: int8 input, integer layers, int8 (or dequantized) output."""

    def __init__(self, input_range: tuple[float, int, int], layers: list[IntLayer],
                 input_shape: tuple[int, ...], output: str = "int8") -> None:
        super().__init__()
        if output not in ("int8", "float"):
            raise ValueError(f"output={output!r}: use 'int8' or 'float'.")
        self.input_scale, self.input_qmin, self.input_qmax = input_range
        self.layers, self.input_shape, self.output = layers, input_shape, output
        self.output_scale = layers[-1].output_scale
        _check_accumulators(self)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> int64 codes: clamp(round(x / input_scale)) (as in the ONNX graph)."""
        if tuple(x.shape[1:]) != self.input_shape:
            if self.input_shape == config.INPUT_SHAPE:
                kws_model.check_input(x)
            raise ValueError(f"input must be (N, {self.input_shape}); got {tuple(x.shape)}.")
        q = torch.round(x.float() / torch.tensor(self.input_scale, dtype=torch.float32))
        return torch.clamp(q, self.input_qmin, self.input_qmax).long()

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer output codes (int64) for a float input batch."""
        q = self.quantize_input(x)
        for layer in self.layers:
            q = run_layer(layer, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """int8 logits (output='int8') or logits dequantized with output_scale (output='float')."""
        q = self.forward_int(x)
        if self.output == "float":
            return q.float() * torch.tensor(self.output_scale, dtype=torch.float32)
        return q.to(output_int_dtype(self.layers[-1]))

    def export(self, example_input: torch.Tensor, filename: str | Path = "model.onnx",
               input_names: list[str] | None = None, output_names: list[str] | None = None,
               opset_version: int = 17, **_: Any) -> Path:
        """Write this integer model as an ONNX graph of standard operators."""
        self.quantize_input(example_input)  # shape check with the clear message
        return onnx_form.export_integer_onnx(self, filename, input_names=input_names,
                                              output_names=output_names,
                                              opset_version=opset_version)

    def extra_repr(self) -> str:
        """A short summary line per layer."""
        return "\n".join(f"{l.name}: {l.op} w{l.weight_bits or '-'} out_scale={l.output_scale:g} "
                         f"clamp[{l.qmin}, {l.qmax}]" for l in self.layers)



def _check_accumulators(model: IntegerModel) -> None:
    """Refuse models whose accumulators could leave the range float32 carries exactly."""
    x_max = max(abs(model.input_qmin), abs(model.input_qmax))
    for layer in model.layers:
        bound = 0  # pooling sums are checked when the pool layer is built
        if layer.weight is not None:
            per_out = np.abs(layer.weight.astype(np.int64)).reshape(len(layer.weight), -1).sum(1)
            bound = int((per_out * x_max + np.abs(layer.bias.astype(np.int64))).max())
        if bound >= FLOAT32_EXACT:
            raise ValueError(f"{layer.name}: accumulator bound {bound} >= 2**24, not exact in "
                             "float32 (ONNX Conv/Gemm).")
        x_max = max(abs(layer.qmin), abs(layer.qmax))

