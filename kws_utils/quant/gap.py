"""Fake-quant model versus integer model: the NPU's average pool in float, and the gap per layer.

The TI NPU's global average pool sums H x W values and requantizes the sum by ``1 / area`` with the
model's multiplier width. With power-of-2 scales that width is 1 bit (TI's rule, kept by the
course's integer model), so ``1 / 125`` becomes ``mult 1, shift 6`` = ``1 / 64``: the integer
model's pooled values are ``125 / 64`` = 1.95 times the mean, clipped at the pool's integer range,
and the classifier's logits grow with them. The fake-quant model of either backend computes the
exact mean, so it calibrates and trains for the wrong inputs. A second, smaller difference: the
fake-quant model rounds again after Dropout and Flatten, on scales the integer model never uses.
``match_integer_model`` removes both (``match_npu_pool``, ``skip_pass_through_quantizers``);
``layer_gap`` measures, layer by layer, how far the fake-quant activations are from the integer
model's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, disable_observer

from kws_utils.quant.integer import IntegerModel, _mult_shift, run_layer
from kws_utils.quant.qconfig import MULT_BITS


def _calibrated(fq: FakeQuantize) -> bool:
    """True once the quantizer's observer has recorded a finite range."""
    obs = fq.activation_post_process
    lo = getattr(obs, "min_val", None)
    return lo is not None and lo.numel() > 0 and bool(torch.isfinite(lo).all())


def pool_gain(area: int, mult_bits: int) -> float:
    """area * mult * 2**-shift: what the NPU's pool multiplies the mean by (125/64 at 1 bit, 125)."""
    if not isinstance(area, int) or area < 1:
        raise ValueError(f"area={area!r}: give the number of pooled positions (H x W), >= 1.")
    mult, shift = _mult_shift(torch.tensor([1 / area]), mult_bits)
    return float(area * mult[0] * 2.0 ** -shift[0])


class NpuPoolGain:
    """Forward hook of a global average pool: the pooled values the NPU computes, in float.

    The mean times the NPU's gain (``area * mult * 2**-shift``), then rounded and clipped to the
    integer pool's output grid: the step and range of the quantizer after the last weighted layer
    (the integer pool keeps that scale; Dropout's own quantizer has no integer counterpart).
    """

    def __init__(self, mult_bits: int, step_fq: nn.Module) -> None:
        self.mult_bits, self.step_fq = mult_bits, step_fq

    def __call__(self, pool: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Fake-quantize mean x gain on the integer pool's grid (straight-through gradient)."""
        x, fq = inputs[0], self.step_fq
        gained = output * pool_gain(int(x.shape[2] * x.shape[3]), self.mult_bits)
        if pool.training:
            return gained
        return torch.fake_quantize_per_tensor_affine(
            gained, float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]),
            fq.quant_min, fq.quant_max)

    def __repr__(self) -> str:
        return f"NpuPoolGain(mult_bits={self.mult_bits})"


def _graph_module(wrapper: nn.Module) -> torch.fx.GraphModule:
    """The prepared (fake-quant) FX graph inside a wrapper of either backend."""
    module = getattr(wrapper, "module", None)
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"{type(wrapper).__name__} holds no prepared fake-quant graph (.module): pass "
                        "a TINPUTinyML*FxModule of either backend, before TI's convert().")
    return module


def _mult_bits(wrapper: nn.Module, exact_pool: bool) -> int:
    """The pool's multiplier width: 1 bit with power-of-2 weight scales (TI's rule), else 8."""
    if exact_pool or getattr(wrapper, "exact_pool", False):
        return MULT_BITS
    qt = getattr(wrapper, "qconfig_type", None)
    if not isinstance(qt, dict) or "weight" not in qt:
        raise TypeError(f"{type(wrapper).__name__} has no qconfig_type: pass a TINPUTinyML*FxModule.")
    return 1 if qt["weight"].get("power2_scale", True) else MULT_BITS


def match_npu_pool(wrapper: nn.Module, exact_pool: bool = False) -> nn.Module:
    """Give a wrapper (either backend, before training or calibration) the NPU's pool; returns it.

    Every global ``AdaptiveAvgPool2d`` of the fake-quant graph gets an ``NpuPoolGain`` hook, so
    calibration, QAT and the fake-quant accuracy see the pooled values the integer model computes.
    ``exact_pool``: the course wrapper's option of that name (an 8-bit pool multiplier).
    """
    graph = _graph_module(wrapper)
    bits = _mult_bits(wrapper, exact_pool)
    found, step_fq, pending = 0, None, False
    for node in graph.graph.nodes:
        mod = graph.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize) and (pending or step_fq is None):
            step_fq, pending = mod, False        # convert()'s rule: the scale the pool keeps
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            pending = True
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
            # a hook, not a subclass: the module keeps its type, which torch.ao's and TI's convert
            # match exactly, so the integer model is unchanged (both backends)
            if not any(isinstance(h, NpuPoolGain) for h in mod._forward_hooks.values()):
                mod.register_forward_hook(NpuPoolGain(bits, step_fq))
            found += 1
    if not found:
        raise ValueError("match_npu_pool: the wrapped model has no global AdaptiveAvgPool2d.")
    return wrapper


class PassThrough:
    """Forward hook of a quantizer with no integer counterpart: its output is its input."""

    def __call__(self, fq: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """The input unchanged (the observer still records; its scale is never used)."""
        return inputs[0]

    def __repr__(self) -> str:
        return "PassThrough()"


_PASS_THROUGH = (nn.Dropout, nn.Flatten, nn.Identity, nn.AdaptiveAvgPool2d)


def skip_pass_through_quantizers(wrapper: nn.Module) -> nn.Module:
    """Make the quantizers after Dropout, Flatten and the pool pass values through; returns the wrapper.

    Both backends' integer models keep the scale of the layer before those ops, with no
    requantization; the fake-quant model rounds again on a scale of its own (Dropout's observed in
    train() mode, on values inflated by 1/(1-p)). A quantizer module is skipped only when every
    use of it follows such an op.
    """
    graph = _graph_module(wrapper)
    uses: dict[str, list[bool]] = {}
    for node in graph.graph.nodes:
        mod = graph.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize):
            prev = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            before = graph.get_submodule(prev.target) if prev is not None and prev.op == "call_module" else None
            uses.setdefault(node.target, []).append(isinstance(before, _PASS_THROUGH))
    for target, after_pass_through in uses.items():
        mod = graph.get_submodule(target)
        if all(after_pass_through) and not any(isinstance(h, PassThrough) for h in mod._forward_hooks.values()):
            mod.register_forward_hook(PassThrough())
    return wrapper


def _frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode copy whose observers are off: measuring it never moves the given model's ranges."""
    out = copy.deepcopy(module).eval()
    out.apply(disable_observer)
    return out


def match_integer_model(wrapper: nn.Module, exact_pool: bool = False) -> nn.Module:
    """``match_npu_pool`` and ``skip_pass_through_quantizers``: the fake-quant model computes what the
    integer model computes, up to rounding ties; returns the wrapper (either backend)."""
    return skip_pass_through_quantizers(match_npu_pool(wrapper, exact_pool))


@dataclass
class LayerGap:
    """One integer layer next to the fake-quant model: differences in output steps (integers)."""

    name: str
    op: str
    scale: float              # the output step of the integer layer
    differ: float             # fraction of output values that differ
    mean_abs: float           # mean |integer - fake-quant / scale|, in steps
    max_abs: float
    clipped: float            # fraction of integer outputs at the clamp limits (qmin or qmax)


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps every node's output."""

    def run_node(self, n: torch.fx.Node):
        """Run one node and record its value."""
        self.values[n.name] = out = super().run_node(n)
        return out


def _fake_layer_outputs(graph: torch.fx.GraphModule, x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """(fake-quant output, integer output step) of each NPU layer, in graph order (convert's rule)."""
    recorder = _Recorder(graph)
    recorder.values = {}
    with torch.no_grad():
        recorder.run(x)
    outputs, scale, pending = [], None, None
    for node in graph.graph.nodes:
        mod = graph.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize):
            if pending is not None:       # a weighted layer's output quantizer: its step is the layer's
                scale = float(mod.calculate_qparams()[0].reshape(-1)[0])
                outputs.append((recorder.values[node.name], scale))
                pending = None
            elif scale is None:
                scale = float(mod.calculate_qparams()[0].reshape(-1)[0])
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            pending = node
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            # the integer pool keeps its input's step; compare with the value after its quantizer
            nxt = node.next
            outputs.append((recorder.values[nxt.name if nxt.op == "call_module" else node.name], scale))
    return outputs


def layer_gap(wrapper: nn.Module, integer_model: IntegerModel, x: torch.Tensor) -> list[LayerGap]:
    """Per NPU layer: how far the fake-quant activations are from the integer model's, in steps.

    ``wrapper``: a calibrated or trained wrapper of either backend, before TI's ``convert()`` (TI's
    turns the wrapper into the integer model; measure a deep copy). ``integer_model``: its integer
    model (the course's ``wrapper.integer_model`` or ``read_integer_onnx(path)`` for either).
    Each layer runs on the integer model's own inputs, so the differences accumulate as on the NPU.
    """
    graph = _frozen_copy(_graph_module(wrapper))
    fake = _fake_layer_outputs(graph, x)
    if len(fake) != len(integer_model.layers):
        raise ValueError(f"the fake-quant graph has {len(fake)} NPU layers, the integer model "
                         f"{len(integer_model.layers)}: pass the integer model of this wrapper.")
    rows, q = [], integer_model.quantize_input(x)
    with torch.no_grad():
        for layer, (value, scale) in zip(integer_model.layers, fake):
            q = run_layer(layer, q)
            diff = (q.double() - value.reshape(q.shape).double() / scale).abs()
            at_limit = ((q == layer.qmin) & (layer.qmin != 0)) | (q == layer.qmax)
            rows.append(LayerGap(layer.name, layer.op, scale, float((diff > 0.5).double().mean()),
                                 float(diff.mean()), float(diff.max()),
                                 float(at_limit.double().mean())))
    return rows


def gap_table(rows: list[LayerGap]) -> list[tuple]:
    """Rows for plots.table: layer, op, step, % differing, mean and max |difference|, % clipped."""
    return [(r.name, r.op, f"{r.scale:g}", f"{r.differ:.1%}", f"{r.mean_abs:.2f}", f"{r.max_abs:.0f}",
             f"{r.clipped:.1%}") for r in rows]


GAP_HEADERS = ["layer", "op", "step", "outputs differing", "mean |diff| (steps)",
               "max |diff| (steps)", "integer outputs at the clamp"]


@dataclass
class Flips:
    """Where a fake-quant model and its integer model predict different classes on labelled clips."""

    clips: int
    differ: int               # clips whose predicted class differs
    fake_only_right: int      # fake-quant right, integer wrong
    integer_only_right: int   # integer right, fake-quant wrong
    margin_all: float         # median top-2 margin of the integer logits (integer steps of fc6's output), all clips
    margin_flipped: float     # the same on the clips that flip (nan when none flips)

    @property
    def gap_points(self) -> float:
        """Fake-quant minus integer accuracy, in points: what the flips add up to."""
        return 100 * (self.fake_only_right - self.integer_only_right) / self.clips


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per row: the largest logit minus the second largest (0 on a tie)."""
    top = np.sort(np.asarray(logits, dtype=np.float64), axis=1)
    return top[:, -1] - top[:, -2]


def prediction_flips(fake: nn.Module, integer_logits: np.ndarray, x: torch.Tensor,
                     y: torch.Tensor, batch_size: int = 500) -> Flips:
    """Compare a fake-quant model's predictions on ``x`` with its integer model's logits (ONNX output)."""
    integer_logits = np.asarray(integer_logits)
    if integer_logits.shape[0] != len(x) or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"integer_logits has {integer_logits.shape[0]} rows, x {len(x)} and y {len(y)}: give "
                         "the integer model's outputs for exactly these labelled clips (at least one).")
    fake = _frozen_copy(fake)
    with torch.no_grad():
        fake_pred = torch.cat([fake(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()
    int_pred, labels = integer_logits.argmax(1), y.numpy()
    differ = fake_pred != int_pred
    margin = top2_margin(integer_logits)
    return Flips(len(labels), int(differ.sum()), int((differ & (fake_pred == labels)).sum()),
                 int((differ & (int_pred == labels)).sum()), float(np.median(margin)),
                 float(np.median(margin[differ])) if differ.any() else float("nan"))
