"""The TI NPU integer model: plain per-layer data (IntLayer) and its integer forward.

The arithmetic is TI's (``tinyml_torchmodelopt`` 1.4.0, TINPU_INT_MODEL), so that the course's
integer model gives TI's output vectors:

- input: ``q = clamp(floor((x + in_offset) * in_mult * 2**-in_shift))`` in float32, with
  ``in_mult`` an 8-bit integer approximating ``1 / input_scale``;
- each Conv/Linear: integer weights (BatchNorm folded as ``torch.ao`` folds it at convert),
  accumulator ``acc = conv(q, w) + bias``, then ``clamp(floor((acc + offset) * mult * 2**-shift))``
  where ``offset`` adds half an output step, rounded together with the bias as TI rounds it;
  ``mult`` has 1 bit when the model uses power-of-2 scales, else 8 bits;
- global average pool: the sum over H x W, requantized by ``1 / area`` with the same multiplier
  width (TI's choice: with 1-bit multipliers the divisor becomes a power of two; the course's
  ``exact_pool`` option keeps 8 bits here instead);
- the scale of a Dropout/Flatten/pool output is the scale of the layer before it.

Every step runs in float32 exactly as the ONNX graph does, so onnxruntime gives the same bits.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
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
from torch.nn.utils.fusion import fuse_conv_bn_weights

from kws_utils import config, model as kws_model
from kws_utils.errors import InputError, InputTypeError
from kws_utils.quant import onnx_form
from kws_utils.quant.observers import TernaryFakeQuantize
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

    def total_offset(self) -> np.ndarray:
        """bias + offset: the one constant the NPU (and the ONNX graph) adds to the raw sum."""
        bias = self.bias if self.bias is not None else 0
        return np.asarray(bias, np.int64) + self.offset.astype(np.int64)

    def multiplier(self) -> np.ndarray:
        """mult * 2**-shift per channel as float32 (exact: a small integer times a power of two)."""
        return (self.mult.astype(np.float64) * 2.0 ** -self.shift.astype(np.float64)).astype(np.float32)


def _mult_shift(real_mult: Any, mult_bits: int = MULT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mult, shift) with mult * 2**-shift ~= real_mult, mult < 2**mult_bits (float32, as TI)."""
    m = torch.as_tensor(real_mult, dtype=torch.float32).reshape(-1)
    top = 2 ** mult_bits - 1
    shift = torch.floor(torch.log2(top / m.abs())).clamp(0, MAX_SHIFT)
    mult = torch.round(torch.pow(torch.tensor(2.0), shift) * m.abs()) * m.sign()
    if (mult.abs() > top).any() or (mult == 0).any():
        raise ValueError(f"requantization multiplier out of range ({m.min():.3g} .. {m.max():.3g}) "
                         f"for {mult_bits}-bit multipliers: the output scale does not suit the "
                         "layer; calibrate with representative data.")
    return mult, shift


def requant_params(real_mult: Any, mult_bits: int = MULT_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (offset, mult, shift): mult * 2**-shift ~= real_mult with the largest shift that keeps
    mult below 2**mult_bits (TI's rule), and offset = 2**(shift-1) / mult rounded, the half step."""
    mult, shift = _mult_shift(real_mult, mult_bits)
    offset = torch.round(_half_step(mult, shift))
    return tuple(v.numpy().astype(np.int32) for v in (offset, mult, shift))


def _half_step(mult: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The offset that turns floor() into round-half-up: 2**(shift-1) / mult (float32)."""
    return torch.pow(torch.tensor(2.0), shift - 1) / mult


@dataclass
class InputStage:
    """float input -> integer codes: ``clamp(floor((x + offset) * mult * 2**-shift), qmin, qmax)``."""

    offset: float      # float32 value
    mult: int
    shift: int
    qmin: int
    qmax: int

    @classmethod
    def for_scale(cls, scale: float, qmin: int, qmax: int) -> "InputStage":
        """TI's input quantizer for ``scale``: an 8-bit multiplier approximating 1 / scale."""
        inv = 1 / torch.tensor(scale, dtype=torch.float32)
        mult, shift = _mult_shift(inv, 8)
        return cls(float(_half_step(mult, shift)[0]), int(mult[0]), int(shift[0]), qmin, qmax)

    def multiplier(self) -> np.float32:
        """mult * 2**-shift as the one float32 constant of the graph (exact: a power-of-2 step)."""
        return np.float32(self.mult * 2.0 ** -self.shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of a float input, computed in the graph's float32 steps."""
        y = (x.float() + torch.tensor(self.offset, dtype=torch.float32)) * torch.from_numpy(
            np.array(self.multiplier()))
        return torch.clamp(torch.floor(y), self.qmin, self.qmax).long()


def _act_qparams(fq: FakeQuantize) -> tuple[float, int]:
    """(scale, zero_point) of an activation quantizer, as torch's convert reads them."""
    scale, zp = fq.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])


def _signed_range(zero_point: int, bits: int = 8) -> tuple[int, int]:
    """TI's clamp for a requantized tensor: unsigned when the zero point is 0, else signed."""
    return (0, 2 ** bits - 1) if zero_point == 0 else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)


def _fused_float(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias as torch.ao's convert folds them (fuse_conv_bn_weights for ConvBn)."""
    bias = mod.bias if mod.bias is not None else torch.zeros(mod.weight.shape[0])
    weight = mod.weight
    if isinstance(mod.weight_fake_quant, TernaryFakeQuantize):
        # TI makes the raw weights ternary before folding BatchNorm (hard steps in eval)
        weight = mod.weight_fake_quant.ternary(weight)
    if not hasattr(mod, "bn"):
        return weight.detach(), bias.detach()
    bn = mod.bn
    w, b = fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias)
    return w.detach(), b.detach()


def _quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round(x / scale) per output channel, exactly as torch.ao's convert quantizes (int codes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # quantized dtypes are deprecated; the rounding is what we need
        return torch.quantize_per_channel(x, scale, torch.zeros(len(scale), dtype=torch.long), 0,
                                          dtype).int_repr()


def _int_weight(w: torch.Tensor, fq: FakeQuantize) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights, float64 per-channel scales): torch's weight quantization, clamped."""
    scale, zp = fq.calculate_qparams()
    scale = scale.reshape(-1).double().expand(w.shape[0]).clone()
    q = _quantize_per_channel(w.float(), scale, torch.qint8)
    return torch.clamp(q, fq.quant_min, fq.quant_max), scale


def _weight_bits(fq: FakeQuantize) -> int:
    """The bit width a weight quantizer's range [-(2**(b-1)-1), 2**(b-1)-1] needs."""
    return int(np.ceil(np.log2(fq.quant_max + 1))) + 1


def _weighted_layer(name: str, mod: nn.Module, in_scale: float, out_fq: FakeQuantize,
                    mult_bits: int) -> IntLayer:
    """IntLayer of a fused conv(-bn)(-relu) or linear(-relu) QAT module, in TI's arithmetic."""
    weight, bias = _fused_float(mod)
    w_int, w_scale = _int_weight(weight, mod.weight_fake_quant)
    out_scale, out_zp = _act_qparams(out_fq)
    acc_scale = w_scale * in_scale                                          # float64
    q_bias = _quantize_per_channel(bias.float(), acc_scale, torch.qint32)
    mult, shift = _mult_shift((acc_scale / out_scale).float(), mult_bits)
    half = out_scale / 2 / acc_scale.float()
    # TI rounds bias + half step together in float32; keep the bias apart, the rest as offset.
    offset = torch.round(q_bias.float() + half).long() - q_bias.long()
    conv = isinstance(mod, nn.Conv2d)
    relu = isinstance(mod, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d, nniqat.LinearReLU))
    if relu:
        qmin, qmax = 0, 255
    elif conv:
        qmin, qmax = -255, 255      # TI clamps a conv without ReLU to 9 bits
    else:
        qmin, qmax = _signed_range(out_zp)
    return IntLayer(
        name=name, op="conv" if conv else "linear", weight=w_int.numpy().astype(np.int8),
        bias=q_bias.numpy().astype(np.int32), stride=tuple(mod.stride) if conv else (1, 1),
        padding=_padding(mod) if conv else (0, 0), groups=mod.groups if conv else 1,
        offset=offset.numpy().astype(np.int32), mult=mult.numpy().astype(np.int32),
        shift=shift.numpy().astype(np.int32), qmin=qmin, qmax=qmax,
        weight_bits=_weight_bits(mod.weight_fake_quant), input_scale=in_scale,
        weight_scale=w_scale.numpy(), output_scale=out_scale)


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Symmetric integer padding of a conv (string padding modes are not supported)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"conv padding {conv.padding!r}/{conv.padding_mode}: use "
                                  "integer zero padding for the NPU export.")
    return tuple(conv.padding)


def _pool_layer(name: str, act: tuple[float, int], area: int, mult_bits: int) -> IntLayer:
    """IntLayer of a global average pool: sum over H x W, requantized by 1 / area."""
    scale, zp = act
    if 255 * area >= FLOAT32_EXACT:
        raise ValueError(f"{name}: pooling {area} positions can exceed 2**24 (float32 exactness).")
    mult, shift = _mult_shift(torch.tensor([1 / area]), mult_bits)
    offset = torch.round(zp + _half_step(mult, shift)).long()
    qmin, qmax = _signed_range(zp)
    return IntLayer(name=name, op="avgpool", weight=None, bias=None, stride=(1, 1),
                    padding=(0, 0), groups=1, offset=offset.numpy().astype(np.int32),
                    mult=mult.numpy().astype(np.int32), shift=shift.numpy().astype(np.int32),
                    qmin=qmin, qmax=qmax, weight_bits=None, input_scale=scale, weight_scale=None,
                    output_scale=scale)


_WEIGHTED = (nniqat.ConvBnReLU2d, nniqat.ConvBn2d, nniqat.ConvReLU2d, nnqat.Conv2d,
             nniqat.LinearReLU, nnqat.Linear)
_PASS_THROUGH = (nn.Dropout, nn.Flatten, nn.Identity)


def build_integer_model(prepared: torch.fx.GraphModule, example_inputs: tuple,
                        power2_scale: bool = True, output: str = "int8",
                        exact_pool: bool = False) -> "IntegerModel":
    """Read a prepared (fake-quant) FX model, layer by layer, into an IntegerModel (TI's rules)."""
    graph_module = copy.deepcopy(prepared).eval()
    ShapeProp(graph_module).propagate(*example_inputs)   # records the tensor shapes on nodes
    mult_bits = 1 if power2_scale else MULT_BITS
    stage, act, in_scale, pending, layers = None, None, None, None, []
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        # get_submodule, not named_modules(): shared quantizers appear there under one name only
        mod = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize):
            if act is None:
                act = _act_qparams(mod)
                in_scale, stage = act[0], InputStage.for_scale(act[0], *_signed_range(act[1]))
            elif pending is not None:
                layers.append(pending(out_fq=mod))
                act, pending = _act_qparams(mod), None
            # else: a quantizer after Dropout/Flatten/pool; TI's integer model keeps the scale
        elif isinstance(mod, _WEIGHTED) and act is not None and pending is None:
            def pending(out_fq, name=node.target, mod=mod, in_scale=act[0]):
                return _weighted_layer(name, mod, in_scale, out_fq, mult_bits)
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and act is not None and pending is None:
            if mod.output_size not in (1, (1, 1)):
                raise NotImplementedError(f"{node.target}: only global pooling (output 1x1) is supported.")
            area = int(np.prod(node.args[0].meta["tensor_meta"].shape[2:]))
            layers.append(_pool_layer(node.target, act, area, MULT_BITS if exact_pool else mult_bits))
        elif not isinstance(mod, _PASS_THROUGH):
            what = type(mod).__name__ if mod is not None else f"{node.op} {node.target}"
            raise NotImplementedError(
                f"{node.name} ({what}) has no TI NPU integer form in kws_utils.quant; supported: "
                "Conv2d(+BN)(+ReLU), Linear(+ReLU), global AdaptiveAvgPool2d, Dropout, Flatten.")
    if pending is not None or stage is None or not layers:
        raise NotImplementedError("the graph does not end with a quantized layer.")
    return IntegerModel((in_scale, stage.qmin, stage.qmax), layers,
                        tuple(example_inputs[0].shape[1:]), output, input_stage=stage)


def run_layer(layer: IntLayer, x: torch.Tensor) -> torch.Tensor:
    """One integer layer on int64 activations, computed in the graph's float32 steps (exact)."""
    x = x.float()
    shape = [1, -1, 1, 1] if layer.op == "conv" else [1, -1]
    if layer.op == "avgpool":
        acc = torch.round(x.sum(dim=(2, 3)))
    elif layer.op == "conv":
        acc = F.conv2d(x, torch.from_numpy(layer.weight).float(), None, layer.stride,
                       layer.padding, groups=layer.groups)
    else:
        acc = F.linear(x, torch.from_numpy(layer.weight).float())
    offset = torch.from_numpy(layer.total_offset().astype(np.float32)).reshape(shape)
    scale = torch.from_numpy(layer.multiplier()).reshape(shape)
    return torch.clamp(torch.floor((acc + offset) * scale), layer.qmin, layer.qmax).long()


class IntegerModel(nn.Module):
    """The TI NPU integer model: integer input codes, integer layers, integer (or scaled) output."""

    def __init__(self, input_range: tuple[float, int, int], layers: list[IntLayer],
                 input_shape: tuple[int, ...], output: str = "int8",
                 input_stage: InputStage | None = None) -> None:
        super().__init__()
        if output not in ("int8", "float"):
            raise ValueError(f"output={output!r}: use 'int8' or 'float'.")
        if not layers:
            raise InputError("layers is empty: an integer model needs at least one layer (build it "
                             "with a wrapper's convert() or quant.read_integer_onnx).")
        self.input_scale, self.input_qmin, self.input_qmax = input_range
        self.input_stage = input_stage or InputStage.for_scale(*input_range)
        self.layers, self.input_shape, self.output = layers, input_shape, output
        self.output_scale = layers[-1].output_scale
        _check_accumulators(self)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> integer codes (int64), as the graph's Add/Mul/Floor/Clip input stage."""
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"integer model input must be a torch.Tensor, got {type(x).__name__}; "
                                 "convert with torch.as_tensor(x, dtype=torch.float32).")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError("integer model input holds NaN or infinite values: they have no integer "
                             "code. Check the features (and the audio).")
        if tuple(x.shape[1:]) != self.input_shape:
            if self.input_shape == config.INPUT_SHAPE:
                kws_model.check_input(x)
            raise ValueError(f"input must be (N, {self.input_shape}); got {tuple(x.shape)}.")
        return self.input_stage(x)

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer output codes (int64) for a float input batch."""
        q = self.quantize_input(x)
        for layer in self.layers:
            q = run_layer(layer, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits (output='int8') or logits times output_scale (output='float')."""
        q = self.forward_int(x)
        if self.output == "float":
            return q.float() * torch.tensor(self.output_scale, dtype=torch.float32)
        return q.to(output_int_dtype(self.layers[-1]))

    def export(self, example_input: torch.Tensor, filename: str | Path = "model.onnx",
               input_names: list[str] | None = None, output_names: list[str] | None = None,
               opset_version: int = 17, **_: Any) -> Path:
        """Write this integer model as an ONNX graph in TI's TINPU integer form."""
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
            bound = int((per_out * x_max + np.abs(layer.total_offset())).max())
        if bound >= FLOAT32_EXACT:
            raise ValueError(f"{layer.name}: accumulator bound {bound} >= 2**24, not exact in "
                             "float32 (ONNX Conv/Gemm).")
        x_max = max(abs(layer.qmin), abs(layer.qmax))
