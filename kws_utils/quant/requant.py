"""The NPU's requantization in the fake-quant model: the integer bias and the 8-bit multiplier.

Each weighted layer of the integer model computes ``clamp(floor((acc + T) * mult * 2**-shift))``,
with ``acc`` counted in accumulator units ``a = s_x s_w`` and one integer ``T = round(round(bias / a)
+ half step)`` (TI's rounding). The fake-quant model computes ``round((acc a + bias) / s_y)`` in
float instead. Two things part them when the weight scales are free (4 and 2 bits):

- the bias and the half step are rounded to whole accumulator units. With ternary weights ``s_w``
  is large, so one unit is a large part of an output step, or several (notebook 05 prints the range
  of ``M = a / s_y``), and each channel's outputs move by up to ``M`` steps;
- ``mult * 2**-shift`` is ``M`` rounded to an 8-bit ``mult`` (at most 0.4 % of ``M``).

``match_requantization`` makes the fake-quant model compute both, as ``match_npu_pool`` does for the
pool: each layer's output before its ReLU becomes ``(acc + T) * mult * 2**-shift - 1/2`` steps (a
hair more, so that round-half-to-even rounds exact halves up, as the NPU's floor does). Only the
fake-quant model changes; scales, integers and ``convert()`` stay as they are. The float bias keeps
its gradient (straight-through), so QAT on such a wrapper trains the model the NPU runs.
"""
from __future__ import annotations

import types

import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize

from kws_utils import holdout
from kws_utils.quant.gap import _calibrated, _graph_module
from kws_utils.quant.integer import _fused_float, _mult_shift, _quantize_per_channel


PARTS = ("bias", "mult")


@torch.no_grad()
def requant_terms(mod: nn.Module, in_fq: FakeQuantize, out_fq: FakeQuantize,
                  parts: tuple[str, ...] = PARTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (ratio, new bias): ``ratio * (y - bias) + new bias`` is the integer layer's output
    before its clamp, in float (``y``: the fake-quant output before the ReLU, ``bias``: its float bias).

    ``parts``: which of the NPU's two roundings to compute, ``"bias"`` (bias and half step in whole
    accumulator units) and ``"mult"`` (the 8-bit multiplier); one alone shows what it costs.
    """
    s_x = float(in_fq.scale.reshape(-1)[0])
    s_y = float(out_fq.scale.reshape(-1)[0])
    _, bias = _fused_float(mod)
    s_w = mod.weight_fake_quant.scale.detach().reshape(-1).double().expand(len(bias))
    acc = s_w * s_x                                                   # float64, as convert()
    q_bias = _quantize_per_channel(bias.float(), acc, torch.qint32).float()
    half = s_y / 2 / acc.float()
    # TI rounds once more in float32; without "bias" the float bias and half step stay exact
    total = torch.round(q_bias + half).double() if "bias" in parts else bias.double() / acc + half.double()
    mult, shift = _mult_shift((acc / s_y).float())
    # what the NPU multiplies by; without "mult", M itself
    m_int = mult.double() * torch.exp2(-shift.double()) if "mult" in parts else acc / s_y
    steps = total * m_int - 0.5 + torch.exp2(-shift.double() - 1)
    ratio = m_int * s_y / acc
    return ratio.float(), (steps * s_y - ratio * bias.double()).float()


def _requantized(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``ratio * y + offset`` per output channel of ``mod``, the terms computed without gradient."""
    bn = getattr(mod, "bn", None)
    if bn is not None and bn.training:   # batch statistics: convert()'s bias is not this one yet
        return y
    in_fq, out_fq, parts = mod.__dict__[_KEY]
    if not (_calibrated(in_fq) and _calibrated(out_fq)):
        # the output quantizer observes after this layer: on a fresh wrapper its scale is still the
        # placeholder 1.0, and a moving-average observer would start from outputs built on it
        return y
    ratio, offset = requant_terms(mod, in_fq, out_fq, parts)
    shape = (1, -1, *[1] * (y.dim() - 2))
    return y * ratio.reshape(shape) + offset.reshape(shape)


def _conv_bn_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ConvBn2d / ConvBnReLU2d: the class's fused conv + BatchNorm, requantized before the ReLU."""
    return _requantized(self, type(self)._forward(self, x))


def _plain_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A QAT Conv2d or Linear with no fused ReLU: its output, requantized."""
    return _requantized(self, type(self).forward(self, x))


_KEY = "_npu_requant"   # where a matched layer keeps its quantizers and parts


def _layer_quantizers(graph: torch.fx.GraphModule) -> list[tuple[nn.Module, FakeQuantize, FakeQuantize]]:
    """(layer, input quantizer, output quantizer) per weighted layer, by convert()'s rule.

    A layer's input scale is the scale of the first quantizer after the layer before it (the
    model's input quantizer for the first layer): Dropout, Flatten and the pool keep it.
    """
    out, scale_fq, pending = [], None, None
    for node in graph.graph.nodes:
        mod = graph.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize):
            if pending is not None:
                out.append((pending[0], pending[1], mod))
                scale_fq, pending = mod, None
            elif scale_fq is None:
                scale_fq = mod
        elif hasattr(mod, "weight_fake_quant"):
            if scale_fq is None or pending is not None:
                raise ValueError("match_requantization: every weighted layer needs an input and an "
                                 "output quantizer (a prepared TINPUTinyML*FxModule graph).")
            pending = (mod, scale_fq)
    if pending is not None:
        raise ValueError("match_requantization: the last weighted layer has no output quantizer.")
    return out


def match_requantization(wrapper: nn.Module, parts: tuple[str, ...] = PARTS) -> nn.Module:
    """The NPU's integer bias and 8-bit multipliers in a wrapper's fake-quant model; returns the wrapper.

    Either backend, before or after calibration and QAT; call ``plain_layers`` before ``convert()``, so that
    nothing of it reaches the integer model. Needs power-of-2 activation scales (qconfig_for's).
    ``parts``: both roundings by default; ``("bias",)`` or ``("mult",)`` computes one of them only.
    """
    if isinstance(parts, str) or not set(parts) <= set(PARTS):
        raise ValueError(f"parts={parts!r}: give a tuple of {PARTS}, e.g. ('bias',).")
    graph = _graph_module(wrapper)
    qt = getattr(wrapper, "qconfig_type", None)
    if not isinstance(qt, dict) or not qt.get("activation", {}).get("power2_scale", True):
        raise ValueError("match_requantization needs power-of-2 activation scales "
                         "(qconfig_type['activation']['power2_scale'] True, as quant.qconfig_for gives).")
    for mod, in_fq, out_fq in _layer_quantizers(graph):
        # Instance attributes, not a subclass: torch.ao's freeze_bn_stats and convert() match layer
        # types exactly, so the layer must keep its class.
        if hasattr(type(mod), "_forward"):
            mod._forward = types.MethodType(_conv_bn_forward, mod)
        elif isinstance(mod, (nniqat.ConvReLU2d, nniqat.LinearReLU)):
            raise NotImplementedError(f"{type(mod).__name__}: a fused ReLU without BatchNorm is not "
                                      "supported by match_requantization.")
        else:
            mod.forward = types.MethodType(_plain_forward, mod)
        mod.__dict__[_KEY] = (in_fq, out_fq, tuple(parts))   # plain references, not submodules
    return wrapper


def plain_layers(wrapper: nn.Module) -> nn.Module:
    """Undo ``match_requantization`` (the layers' own forward again); returns the wrapper."""
    for mod in wrapper.modules():
        if _KEY in mod.__dict__:
            for name in (_KEY, "_forward", "forward"):
                mod.__dict__.pop(name, None)
    return wrapper


# Adam's rate and batch for tune_biases. Measured on the reference weights at int2, integer model, on the
# pool clips each calibration subset did not draw (467): 300 steps gave 81.9 % (rate 1e-3) and 81.4 % (3e-3)
# over 2 subsets, inside the noise of 467 clips; over 3 subsets 1,000 steps at 1e-3 gave 78.5 % against
# 79.8 % for 300 at 3e-3.
BIAS_LR, BIAS_BATCH = 3e-3, 64


def _bias_holders(graph: torch.fx.GraphModule) -> list[nn.Parameter]:
    """The bias each weighted layer's integer bias is made from: BatchNorm's beta, else the layer's."""
    found = []
    for mod, _, _ in _layer_quantizers(graph):
        holder = mod.bn if hasattr(mod, "bn") else mod
        if holder.bias is None:
            raise ValueError(f"{type(mod).__name__} has no bias to tune: tune_biases needs one per layer.")
        found.append(holder.bias)
    return found


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL divergence of the student's class probabilities from the teacher's, per clip (mean)."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                    reduction="batchmean")


def _logits(module: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """A module's outputs over ``x`` in batches, without gradient."""
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def tune_biases(wrapper: nn.Module, inputs: torch.Tensor, teacher_logits: torch.Tensor, steps: int,
                lr: float = BIAS_LR, seed: int = 0) -> tuple[float, float] | None:
    """Tune every layer's bias so that the integer model's logits match the teacher's; (KL before, after).

    Learned rounding fits each block alone and in float; the NPU then rounds each bias to whole
    accumulator units, and the errors of all layers add up in the logits. Here the biases alone
    (integers and scales stay) are trained on the unlabeled ``inputs`` through the NPU's requantization
    (``match_requantization``, undone afterwards unless the caller had set it), against the float model's
    ``teacher_logits`` on the same inputs. The biases are kept only if they lower the KL divergence over
    all inputs. Needs power-of-2 activation scales; returns None (nothing changed) without them.
    """
    holdout.refuse_test_inputs(inputs, "quant.tune_biases")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r}: give the number of bias-tuning steps, a whole number >= 0.")
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 2 \
            or len(teacher_logits) != len(inputs):
        raise ValueError("teacher_logits must be the float model's (N, classes) outputs on the N inputs.")
    qt = getattr(wrapper, "qconfig_type", None)
    if steps == 0 or not isinstance(qt, dict) or not qt.get("activation", {}).get("power2_scale", True):
        return None
    graph = _graph_module(wrapper)
    if not all(_calibrated(fq) for _, *pair in _layer_quantizers(graph) for fq in pair):
        raise RuntimeError("tune_biases() before calibration: run calibrate(wrapper, x) first, so that the "
                           "integer model's requantization is known.")
    ours = not any(_KEY in m.__dict__ for m in graph.modules())
    if ours:
        match_requantization(wrapper)
    biases = _bias_holders(graph)
    saved = [b.detach().clone() for b in biases]
    flags = {p: p.requires_grad for p in graph.parameters()}
    was_training = graph.training
    graph.eval()   # BatchNorm's running statistics: the ones convert() folds
    try:
        for p in graph.parameters():
            p.requires_grad_(False)
        for b in biases:
            b.requires_grad_(True)
        before = float(_kl(_logits(graph, inputs), teacher_logits))
        opt = torch.optim.Adam(biases, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(inputs), (min(BIAS_BATCH, len(inputs)),), generator=gen)
            loss = _kl(graph(inputs[idx]), teacher_logits[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = float(_kl(_logits(graph, inputs), teacher_logits))
        if not after < before:   # no better over all inputs: keep what learned rounding gave
            with torch.no_grad():
                for b, s in zip(biases, saved):
                    b.copy_(s)
            after = before
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        graph.train(was_training)
        if ours:
            plain_layers(wrapper)
    return before, after
