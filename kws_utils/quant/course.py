"""Course helpers (notebooks 04-06): BatchNorm folding, variant names, calibration, and one call
per quantized variant (wrap -> calibrate or fine-tune -> convert -> export -> check with ONNX)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kws_utils import config, export as kws_export, training
from kws_utils.quant.integer import IntegerModel
from kws_utils.quant.observers import ceil_power2
from kws_utils.quant.qconfig import WEIGHT_BITS, qconfig_for
from kws_utils.quant.wrappers import (TINPUTinyMLPTQFxModule, TINPUTinyMLQATFxModule,
                                      TINPUTinyMLQuantFxModule, quant_backend)


QUANT_METHODS = ("ptq", "qat")


def variant_onnx_path(bits: int, method: str) -> Path:
    """Where notebooks 04-05 save an integer model: ``artifacts/quant_kws_int{bits}_{method}.onnx``."""
    if bits not in WEIGHT_BITS or method not in QUANT_METHODS:
        raise ValueError(f"variant int{bits}/{method!r}: bits must be one of {WEIGHT_BITS}, "
                         f"method one of {QUANT_METHODS}.")
    return config.artifacts_dir() / f"quant_kws_int{bits}_{method}.onnx"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm2d folded into the Conv2d registered just before it."""
    folded = copy.deepcopy(model).eval()
    parents = [m for m in folded.modules() if len(list(m.children()))]
    for parent in parents:
        previous = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and isinstance(previous, tuple):
                conv_name, conv = previous
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, child))
                setattr(parent, name, nn.Identity())
            previous = (name, child) if isinstance(child, nn.Conv2d) else None
    return folded


def fake_quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool = True,
                         power2: bool = True) -> torch.Tensor:
    """Symmetric min/max quantize-dequantize of a weight tensor (axis 0 = output channel)."""
    limit = 2 ** (bits - 1) - 1
    max_abs = (weight.detach().abs().flatten(1).amax(1) if per_channel
               else weight.detach().abs().max().reshape(1)).clamp_min(1e-12)
    scale = max_abs / limit
    scale = (ceil_power2(scale) if power2 else scale).reshape([-1] + [1] * (weight.dim() - 1))
    return torch.clamp(torch.round(weight / scale), -limit, limit) * scale


def schedule_state(wrapper: TINPUTinyMLQuantFxModule) -> tuple[bool, bool]:
    """(BatchNorm statistics frozen, observer ranges frozen), read from the wrapped model."""
    bn = [m.freeze_bn for m in wrapper.modules() if hasattr(m, "freeze_bn")]
    obs = [bool(m.observer_enabled[0]) for m in wrapper.modules() if isinstance(m, FakeQuantize)]
    return bool(bn) and all(bn), not any(obs)


def calibration_subset(x: torch.Tensor, n: int, seed: int = config.SEED) -> torch.Tensor:
    """A fixed, seeded random subset of ``n`` inputs (in their original order)."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.sort().values]


@torch.no_grad()
def calibrate(wrapper: TINPUTinyMLQuantFxModule, x: torch.Tensor,
              batch_size: int = 100) -> TINPUTinyMLQuantFxModule:
    """PTQ calibration: eval mode, forward passes over ``x`` so the observers record ranges."""
    wrapper.eval()
    for i in range(0, len(x), batch_size):
        wrapper(x[i:i + batch_size])
    return wrapper


def ptq(model: nn.Module, bits: int, calib_x: torch.Tensor, batch_size: int = 100,
        qconfig_type: dict | None = None) -> TINPUTinyMLPTQFxModule:
    """Wrap for PTQ at ``bits`` (or an explicit qconfig_type), calibrate on ``calib_x``, convert."""
    wrapper = quant_backend().TINPUTinyMLPTQFxModule(
        model, total_epochs=1, qconfig_type=qconfig_type or qconfig_for(bits),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    calibrate(wrapper, calib_x, batch_size)
    wrapper.convert()   # freezes the observers: later evaluations cannot move the ranges
    return wrapper


def qat(model: nn.Module, bits: int, feats: Any, epochs: int, lr: float, batch_size: int,
        seed: int = config.SEED) -> tuple[TINPUTinyMLQATFxModule, Any]:
    """Fine-tune a QAT wrapper with the float recipe (``training.fit``), convert; (wrapper, history)."""
    wrapper = quant_backend().TINPUTinyMLQATFxModule(
        model, total_epochs=epochs, qconfig_type=qconfig_for(bits),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    stable_conv_bn(wrapper)
    # channels_last=False: the per-channel fake quantizers run faster in the default layout
    history = training.fit(wrapper, feats.train_views, feats.train_y, feats.val_x, feats.val_y,
                           epochs=epochs, lr=lr, batch_size=batch_size,
                           generator=training.set_seed(seed), channels_last=False)
    wrapper.convert()   # raises FloatingPointError if the fine-tuning diverged
    return wrapper, history


def stable_conv_bn(wrapper: TINPUTinyMLQuantFxModule) -> TINPUTinyMLQuantFxModule:
    """Use torch.ao's ConvBn QAT path that never divides by the BatchNorm weight.

    The default (approximate) path computes ``conv / (gamma / std)``: when a channel's gamma nears
    zero (seen with 2-bit weights once BatchNorm is frozen) that overflows and the weights turn
    NaN. The stable path computes the same folded ``conv(x, fq(W * gamma / std)) + folded bias``
    with frozen BatchNorm (so ``convert()`` is unchanged) and needs a second convolution only
    while BatchNorm statistics still update.
    """
    for m in wrapper.modules():
        if hasattr(m, "_enable_slow_path_for_better_numerical_stability"):
            m._enable_slow_path_for_better_numerical_stability = True
    return wrapper


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of any model (float, fake-quant or integer logits) on ``x``."""
    model.eval()
    preds = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (preds == y).float().mean().item()


def onnx_check(int_model: IntegerModel, path: str | Path, x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, bool]:
    """(accuracy of the ONNX file under onnxruntime, outputs identical to ``int_model``'s)."""
    onnx_out = kws_export.onnx_predict(path, x)
    with torch.no_grad():
        torch_out = torch.cat([int_model(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
    return float((onnx_out.argmax(1) == y.numpy()).mean()), bool(np.array_equal(onnx_out, torch_out))


def packed_weight_bytes(int_model: IntegerModel) -> int:
    """Bytes of all conv/linear weights packed at the model's bit width (biases not counted)."""
    return sum(math.ceil(l.weight.size * l.weight_bits / 8) for l in int_model.layers
               if l.weight is not None)


@dataclass
class VariantResult:
    """One quantized variant: its wrapper, integer model, ONNX file, timings and accuracies."""

    bits: int
    method: str
    wrapper: TINPUTinyMLQuantFxModule
    int_model: IntegerModel
    onnx_path: Path
    seconds: float              # calibration (PTQ) or fine-tuning (QAT), plus convert()
    history: Any | None         # training.History of the QAT fine-tuning (None for PTQ)
    fake_quant_acc: float       # the wrapper (fake quantization in float) on the test set
    int_acc: float              # the PyTorch IntegerModel on the test set
    onnx_acc: float             # the exported ONNX file under onnxruntime on the test set
    onnx_identical: bool        # ONNX outputs == IntegerModel outputs, bit for bit


def quantize_variant(model: nn.Module, feats: Any, bits: int, method: str,
                     prof: config.Profile | None = None) -> VariantResult:
    """PTQ (seeded validation subset) or QAT (fit at qat_lr), convert, export, check on the test set."""
    prof = prof or config.profile()
    start = time.perf_counter()
    if method == "ptq":
        wrapper, history = ptq(model, bits, calibration_subset(feats.val_x, prof.calib_clips)), None
    elif method == "qat":
        wrapper, history = qat(model, bits, feats, prof.qat_epochs, prof.qat_lr, prof.batch_size)
    else:
        raise ValueError(f"method {method!r}: use one of {QUANT_METHODS}.")
    seconds = time.perf_counter() - start
    int_model = wrapper.integer_model
    path = wrapper.export(feats.test_x[:1], variant_onnx_path(bits, method), input_names=["input"],
                          output_names=["logits"])
    onnx_acc, identical = onnx_check(int_model, path, feats.test_x, feats.test_y)
    return VariantResult(bits, method, wrapper, int_model, path, seconds, history,
                         accuracy(wrapper, feats.test_x, feats.test_y),
                         accuracy(int_model, feats.test_x, feats.test_y), onnx_acc, identical)
