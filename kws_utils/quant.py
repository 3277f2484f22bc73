"""Quantization for the TI NPU: QAT/PTQ wrappers with the API of TI's ``tinyml_torchmodelopt``.

TI's package (``tinyml_torchmodelopt.quantization``, in github.com/TexasInstruments/tinyml-tensorlab)
cannot be installed here, so the course carries this small implementation with the same class
names and arguments. A learner's code runs against either by changing one import (see
``quant_backend()`` and ``KWS_QUANT_BACKEND=ti``).

Workflow (both QAT and PTQ)::

    qmodel = TINPUTinyMLQATFxModule(model, total_epochs=4, qconfig_type=qconfig_for(8),
                                    example_inputs=torch.zeros(1, 1, 49, 10))
    for epoch in range(4):
        qmodel.train()            # one call per epoch: drives the freezing schedule
        ...usual training loop on qmodel...
        qmodel.eval()
    int_model = qmodel.convert()  # IntegerModel: integer weights, int requantization
    int_model.export(example, "kws_int8.onnx", input_names=["input"])

PTQ calibration needs no training: wrap with ``TINPUTinyMLPTQFxModule(model, total_epochs=1)``,
then ``qmodel.eval()`` and run forward passes over a few hundred representative inputs under
``torch.no_grad()`` (the observers record ranges; BatchNorm uses its running statistics), then
``convert()``.

Schedule over ``total_epochs`` (TI's rule): epochs are counted by ``train()`` calls. QAT
BatchNorm statistics freeze from epoch ``total_epochs // 2 - 1`` on, observer ranges from epoch
``total_epochs // 2 + 1`` on (override with ``num_batch_norm_update_epochs`` /
``num_observer_update_epochs``, ``False`` = never). PTQ keeps BatchNorm frozen throughout.
``convert()`` freezes everything.

Numbers: weights are symmetric, ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int8 [-127, 127], int4
[-7, 7], int2 ternary [-1, 1]) with one scale per output channel; activations 8-bit, unsigned
[0, 255] after ReLU and signed [-128, 127] otherwise (TI stores both as quint8 with zero point
0 or 128). Each Conv/Linear requantizes its int32 accumulator with
``clamp(floor((acc + offset) * mult * 2**-shift), qmin, qmax)``, ``mult`` at most 8 bits.
"""
from __future__ import annotations

import copy
import importlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver,
                                   PerChannelMinMaxObserver, QConfig, QConfigMapping)
from torch.ao.quantization import quantize_fx
from torch.ao.quantization.backend_config import (BackendPatternConfig, DTypeConfig,
                                                  ObservationType, get_native_backend_config)
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kws_utils import config, export as kws_export, model as kws_model, training

WEIGHT_BITS = (8, 4, 2)
MULT_BITS = 8          # the NPU's requantization multiplier is an 8-bit unsigned integer
MAX_SHIFT = 31
FLOAT32_EXACT = 2 ** 24  # integers carried in float32 (ONNX Conv/Gemm) are exact below this


class TinyMLModelQConfigFormat:
    """Model formats for ``export`` (names as in TI's package)."""

    FLOAT_MODEL = "FLOAT_MODEL"
    FAKEQ_MODEL = "FAKEQ_MODEL"
    QDQ_MODEL = "QDQ_MODEL"
    INT_MODEL = "INT_MODEL"
    TINPU_INT_MODEL = "TINPU_INT_MODEL"


# ----------------------------------------------------------------------------------------------
# qconfig_type dictionaries
# ----------------------------------------------------------------------------------------------
_KNOWN_KEYS = {"bitwidth", "qscheme", "power2_scale", "quant_min", "quant_max", "range_max",
               "fixed_range", "observer", "dtype"}


def default_qconfig_type() -> dict:
    """TI NPU default: 8-bit per-channel symmetric weights, 8-bit activations, power-of-2 scales."""
    return qconfig_for(8)


def qconfig_for(weight_bits: int, power2_scale: bool | None = None) -> dict:
    """A qconfig_type dict for 8, 4 or 2-bit weights (power-of-2 weight scales only for 8 bits)."""
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits={weight_bits}: the TI NPU supports {WEIGHT_BITS}.")
    power2 = weight_bits == 8 if power2_scale is None else power2_scale
    return {
        "weight": {"bitwidth": weight_bits, "qscheme": torch.per_channel_symmetric,
                   "power2_scale": power2, "range_max": None, "fixed_range": False},
        "activation": {"bitwidth": 8, "qscheme": torch.per_tensor_symmetric,
                       "power2_scale": True, "range_max": None, "fixed_range": False},
    }


def _check_part(part: dict, kind: str) -> None:
    """Reject keys and values this implementation cannot honour, with the reason."""
    unknown = set(part) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"qconfig_type['{kind}'] has unknown keys {sorted(unknown)}; "
                         f"known: {sorted(_KNOWN_KEYS)}.")
    if part.get("range_max") is not None or part.get("fixed_range"):
        raise NotImplementedError(f"qconfig_type['{kind}']: range_max/fixed_range are not "
                                  "implemented in kws_utils.quant; leave them None/False.")


def normalize_qconfig_type(qconfig_type: dict | None) -> dict:
    """Validate a qconfig_type dict and fill in defaults; raise on unsupported settings."""
    given = copy.deepcopy(qconfig_type) if qconfig_type is not None else default_qconfig_type()
    if not isinstance(given, dict) or set(given) - {"weight", "activation"}:
        raise ValueError("qconfig_type must be None or a dict {'weight': {...}, 'activation': {...}}.")
    w = {**default_qconfig_type()["weight"], **given.get("weight", {})}
    a = {**default_qconfig_type()["activation"], **given.get("activation", {})}
    _check_part(w, "weight")
    _check_part(a, "activation")
    if w["bitwidth"] not in WEIGHT_BITS:
        raise ValueError(f"weight bitwidth {w['bitwidth']} is not supported: use one of {WEIGHT_BITS}.")
    if a["bitwidth"] != 8:
        raise ValueError(f"activation bitwidth {a['bitwidth']} is not supported: the NPU uses 8.")
    if w["qscheme"] not in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
        raise ValueError("weight qscheme must be torch.per_channel_symmetric or "
                         "torch.per_tensor_symmetric (the NPU has no weight zero points).")
    if a["qscheme"] != torch.per_tensor_symmetric:
        raise ValueError("activation qscheme must be torch.per_tensor_symmetric.")
    if w["bitwidth"] == 8 and not w["power2_scale"]:
        raise ValueError("8-bit weights need power2_scale=True on the TI NPU.")
    half = 2 ** (w["bitwidth"] - 1)
    w.setdefault("quant_min", None)
    w.setdefault("quant_max", None)
    w["quant_min"] = -(half - 1) if w["quant_min"] is None else w["quant_min"]
    w["quant_max"] = half - 1 if w["quant_max"] is None else w["quant_max"]
    if not -half <= w["quant_min"] < 0 < w["quant_max"] <= half - 1:
        raise ValueError(f"weight quant range [{w['quant_min']}, {w['quant_max']}] does not fit "
                         f"{w['bitwidth']} bits [{-half}, {half - 1}].")
    if (a.get("quant_min"), a.get("quant_max")) not in ((None, None), (0, 255)):
        raise ValueError("activation quant_min/quant_max must be 0/255 (quint8, as TI stores them).")
    a["quant_min"], a["quant_max"] = 0, 255
    w["observer"] = w.get("observer") or ("minmax" if w["bitwidth"] == 8 else "mse")
    if w["observer"] not in ("minmax", "mse"):
        raise ValueError(f"weight observer {w['observer']!r}: use 'minmax' or 'mse'.")
    return {"weight": w, "activation": a}


# ----------------------------------------------------------------------------------------------
# Observers: symmetric ranges, optional power-of-2 scales, MSE-chosen weight clipping
# ----------------------------------------------------------------------------------------------
def ceil_power2(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to the next power of two (up, so that the observed range still fits)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


MSE_RATIOS = torch.linspace(0.2, 1.0, 81)  # clipping ranges tried, as fractions of max |w|


def _mse_range(w2d: torch.Tensor, qmin: int, qmax: int, power2: bool) -> torch.Tensor:
    """Per-row clipping range minimising the weight quantization error (grid search)."""
    max_abs = w2d.abs().amax(dim=1).clamp_min(1e-12)
    half = (qmax - qmin) / 2
    # All candidate scales at once, (ratios, rows, 1): one vectorised pass instead of 81 loops,
    # because QAT recomputes the range of every layer at every step.
    scale = MSE_RATIOS.to(w2d)[:, None] * max_abs / half
    scale = (ceil_power2(scale) if power2 else scale)[..., None]
    err = ((torch.clamp(torch.round(w2d / scale), qmin, qmax) * scale - w2d) ** 2).sum(dim=2)
    best = err.argmin(dim=0)   # first minimum, so ties keep the smaller range
    return scale[best, torch.arange(len(max_abs)), 0] * half


class _WeightObserverMixin:
    """Weight ranges from the CURRENT weights (QAT moves them), optionally MSE-clipped."""

    def _setup(self, power2_scale: bool, range_method: str) -> None:
        """Store the options shared by the per-channel and per-tensor weight observers."""
        self.power2_scale, self.range_method = power2_scale, range_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Set min/max to the chosen range of ``x`` (not a running min/max over steps)."""
        w = x.detach().float()
        axis = getattr(self, "ch_axis", None)
        w2d = w.transpose(0, axis).flatten(1) if axis is not None else w.reshape(1, -1)
        if self.range_method == "mse":
            rng = _mse_range(w2d, self.quant_min, self.quant_max, self.power2_scale)
        else:
            rng = w2d.abs().amax(dim=1)
        rng = rng if axis is not None else rng[0]
        self.min_val.resize_(rng.shape).copy_(-rng)
        self.max_val.resize_(rng.shape).copy_(rng)
        return x

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        """Symmetric qparams, with the scale rounded up to a power of two if configured."""
        scale, zero_point = super()._calculate_qparams(min_val, max_val)
        return (ceil_power2(scale) if self.power2_scale else scale), zero_point


class PerChannelWeightObserver(_WeightObserverMixin, PerChannelMinMaxObserver):
    """Per-output-channel symmetric weight observer (power-of-2 / MSE options)."""

    def __init__(self, *args: Any, power2_scale: bool = True, range_method: str = "minmax",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(power2_scale, range_method)


class PerTensorWeightObserver(_WeightObserverMixin, MinMaxObserver):
    """Per-tensor symmetric weight observer (power-of-2 / MSE options)."""

    def __init__(self, *args: Any, power2_scale: bool = True, range_method: str = "minmax",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(power2_scale, range_method)


class ActivationObserver(MovingAverageMinMaxObserver):
    """TI-style activation range: full [0, 255] when non-negative, else symmetric around 128."""

    def __init__(self, *args: Any, power2_scale: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.power2_scale = power2_scale

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        """Scale and zero point (0 for unsigned tensors, 128 for signed ones)."""
        span = self.quant_max - self.quant_min
        if bool(min_val >= 0):
            scale, zero_point = max_val / span, self.quant_min
        else:
            scale, zero_point = torch.max(-min_val, max_val) / (span / 2), (span + 1) // 2
        scale = torch.clamp(scale.reshape(1).float(), min=self.eps.item())
        scale = ceil_power2(scale) if self.power2_scale else scale
        return scale, torch.tensor([zero_point], dtype=torch.int32, device=scale.device)


def make_qconfig(qconfig_type: dict | None) -> QConfig:
    """Turn a (normalized) qconfig_type dict into a torch QConfig of FakeQuantize factories."""
    qt = normalize_qconfig_type(qconfig_type)
    w, a = qt["weight"], qt["activation"]
    per_channel = w["qscheme"] == torch.per_channel_symmetric
    weight_fq = FakeQuantize.with_args(
        observer=PerChannelWeightObserver if per_channel else PerTensorWeightObserver,
        quant_min=w["quant_min"], quant_max=w["quant_max"], dtype=torch.qint8,
        qscheme=w["qscheme"], power2_scale=w["power2_scale"], range_method=w["observer"])
    act_fq = FakeQuantize.with_args(
        observer=ActivationObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=torch.per_tensor_symmetric, power2_scale=a["power2_scale"])
    return QConfig(activation=act_fq, weight=weight_fq)


def make_backend_config():
    """PyTorch's native backend config, with Dropout/Flatten sharing their input's qparams."""
    # The NPU has no requantization step for identity-like ops, so they must not get a scale
    # of their own (by default Dropout does, and would learn a range inflated by 1/(1-p)).
    shared = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)
    backend = get_native_backend_config()
    for op in (nn.Dropout, nn.Flatten):
        backend.set_backend_pattern_config(
            BackendPatternConfig(op).set_dtype_configs([shared]).set_observation_type(
                ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT))
    return backend


# ----------------------------------------------------------------------------------------------
# The wrapper (TI API)
# ----------------------------------------------------------------------------------------------
def _as_example_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple; the DS-CNN input shape when none are given."""
    if example_inputs is None:
        return (torch.zeros(1, *config.INPUT_SHAPE),)
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _prepare(model: nn.Module, qconfig: QConfig, example: tuple) -> torch.fx.GraphModule:
    """Fuse conv-bn-relu and insert fake quantizers with torch.ao FX (QAT preparation)."""
    mapping = QConfigMapping().set_global(qconfig)
    model = copy.deepcopy(model).train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_fx.prepare_qat_fx(model, mapping, example,
                                              backend_config=make_backend_config())
    except Exception as err:  # FX raises many error types while tracing (TraceError, TypeError ...)
        raise TypeError(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}). "
            "FX needs a forward() without Python control flow on tensor values and without "
            "asserts/prints on tensors: move input checks out of forward(), or quantize a "
            "sub-module that traces.") from err


class TINPUTinyMLQuantFxModule(nn.Module):
    """QAT/PTQ wrapper producing TI NPU integer models (API of TI's tinyml_torchmodelopt)."""

    def __init__(self, model: nn.Module, total_epochs: int, qconfig_type: dict | None = None,
                 example_inputs: Any = None, is_qat: bool = True,
                 num_batch_norm_update_epochs: int | bool | None = None,
                 num_observer_update_epochs: int | bool | None = None,
                 output_int: bool = True, verbose: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}.")
        self.qconfig_type = normalize_qconfig_type(qconfig_type)
        self.example_inputs = _as_example_tuple(example_inputs)
        self.module = _prepare(model, make_qconfig(self.qconfig_type), self.example_inputs)
        # verbose is accepted for TI compatibility; this implementation prints nothing
        self.total_epochs, self.is_qat, self.output_int, self.verbose = (
            total_epochs, is_qat, output_int, verbose)
        self.num_batch_norm_update_epochs = num_batch_norm_update_epochs
        self.num_observer_update_epochs = num_observer_update_epochs
        self.num_epochs_tracked = 0
        self.integer_model: IntegerModel | None = None
        if not is_qat:
            # PTQ only observes: frozen BN and no trainable parameters.
            self.module.apply(nniqat.freeze_bn_stats)
            self.module.requires_grad_(False)

    @property
    def weight_bits(self) -> int:
        """Bit width of the weights."""
        return self.qconfig_type["weight"]["bitwidth"]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The fake-quantized (QDQ) model's output."""
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "TINPUTinyMLQuantFxModule":
        """Set the mode; each train() call starts an epoch of the freezing schedule."""
        super().train(mode)
        if mode:
            self._start_epoch()
        elif self.num_epochs_tracked >= self.total_epochs:
            self.freeze()
        return self

    def _start_epoch(self) -> None:
        """Apply TI's schedule: freeze BN, then observer ranges, in the later epochs."""
        half = self.total_epochs // 2
        bn_at, obs_at = self.num_batch_norm_update_epochs, self.num_observer_update_epochs
        # None means TI's default epoch; False never freezes; 0 freezes from the first epoch.
        bn_at = half - 1 if bn_at is None else bn_at
        obs_at = half + 1 if obs_at is None else obs_at
        freeze_bn = bn_at is not False and (not self.is_qat or self.num_epochs_tracked >= bn_at)
        freeze_obs = obs_at is not False and self.num_epochs_tracked >= obs_at
        self.freeze(freeze_bn=freeze_bn, freeze_observers=freeze_obs)
        self.num_epochs_tracked += 1

    def freeze(self, freeze_bn: bool = True, freeze_observers: bool = True) -> "TINPUTinyMLQuantFxModule":
        """Freeze (True) or unfreeze (False) BatchNorm statistics and observer ranges."""
        self.module.apply(torch.ao.quantization.disable_observer if freeze_observers
                          else torch.ao.quantization.enable_observer)
        self.module.apply(nniqat.freeze_bn_stats if freeze_bn else nniqat.update_bn_stats)
        return self

    def unfreeze(self, freeze_bn: bool = False, freeze_observers: bool = False) -> "TINPUTinyMLQuantFxModule":
        """Let BatchNorm statistics and observer ranges update again."""
        return self.freeze(freeze_bn, freeze_observers)

    def convert(self, output: str | None = None) -> "IntegerModel":
        """Freeze and build the TI NPU integer model (BN folded, integer weights, requantization)."""
        _check_calibrated(self.module)
        self.freeze()
        output = output or ("int8" if self.output_int else "float")
        self.integer_model = build_integer_model(self.module, self.example_inputs,
                                                 self.weight_bits, output)
        return self.integer_model

    def export(self, example_input: torch.Tensor, filename: str | Path = "model.onnx",
               input_names: list[str] | None = None, output_names: list[str] | None = None,
               model_qconfig_format: str = TinyMLModelQConfigFormat.TINPU_INT_MODEL,
               opset_version: int = 17, **_: Any) -> Path:
        """Write the converted integer model (default) or its QDQ (fake-quant) form as ONNX."""
        if model_qconfig_format not in (TinyMLModelQConfigFormat.TINPU_INT_MODEL,
                                        TinyMLModelQConfigFormat.INT_MODEL,
                                        TinyMLModelQConfigFormat.QDQ_MODEL):
            raise ValueError(f"model_qconfig_format {model_qconfig_format!r}: use TINPU_INT_MODEL "
                             "or QDQ_MODEL (see TinyMLModelQConfigFormat).")
        if self.integer_model is None:
            raise RuntimeError("export() needs the converted model: call .convert() first "
                               "(after calibrating (PTQ) or training (QAT) the wrapper).")
        if model_qconfig_format == TinyMLModelQConfigFormat.QDQ_MODEL:
            self.integer_model.quantize_input(example_input)  # shape check with a clear message
            return kws_export.export_qdq_onnx(self.integer_model, filename, input_names,
                                              output_names, opset_version)
        return self.integer_model.export(example_input, filename, input_names=input_names,
                                         output_names=output_names, opset_version=opset_version)


class TINPUTinyMLQATFxModule(TINPUTinyMLQuantFxModule):
    """Quantization-aware training: train the wrapper like the float model, then convert()."""


class TINPUTinyMLPTQFxModule(TINPUTinyMLQuantFxModule):
    """Post-training quantization: eval() + forward passes over calibration data, then convert()."""

    def __init__(self, *args: Any, is_qat: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, is_qat=is_qat, **kwargs)


def _check_calibrated(module: nn.Module) -> None:
    """Raise unless training stayed finite and every fake quantizer has seen data."""
    ranges = {name: fq.activation_post_process.min_val for name, fq in module.named_modules()
              if isinstance(fq, FakeQuantize)}
    broken = [name for name, v in ranges.items() if torch.isnan(v).any()]
    broken += [name for name, w in module.named_parameters() if not torch.isfinite(w).all()]
    if broken:
        raise FloatingPointError(f"training diverged: {len(broken)} quantizer ranges or weights "
                                 f"({broken[0]}, ...) are NaN/inf. Lower the QAT learning rate and "
                                 "start again from the float model.")
    unseen = [name for name, v in ranges.items() if not torch.isfinite(v).all()]
    if unseen:
        raise RuntimeError(f"convert() before calibration: {len(unseen)} quantizers ({unseen[0]}, ...) "
                           "have seen no data. For PTQ call qmodel.eval() and run forward passes "
                           "over calibration inputs under torch.no_grad(); for QAT train first.")


# ----------------------------------------------------------------------------------------------
# The integer model: plain data + an exact integer forward
# ----------------------------------------------------------------------------------------------
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
        return kws_export.export_integer_onnx(self, filename, input_names=input_names,
                                              output_names=output_names,
                                              opset_version=opset_version)

    def extra_repr(self) -> str:
        """A short summary line per layer."""
        return "\n".join(f"{l.name}: {l.op} w{l.weight_bits or '-'} out_scale={l.output_scale:g} "
                         f"clamp[{l.qmin}, {l.qmax}]" for l in self.layers)


def output_int_dtype(layer: IntLayer) -> torch.dtype:
    """The smallest integer dtype holding the layer's clamp range (int8 for signed logits)."""
    if layer.qmin >= -128 and layer.qmax <= 127:
        return torch.int8
    return torch.uint8 if layer.qmin >= 0 and layer.qmax <= 255 else torch.int16


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


# ----------------------------------------------------------------------------------------------
# Backend switch
# ----------------------------------------------------------------------------------------------
def quant_backend() -> ModuleType:
    """The module with the TINPU classes: this one, or TI's when KWS_QUANT_BACKEND=ti."""
    if config.quant_backend_choice() == "ti":
        try:
            return importlib.import_module("tinyml_torchmodelopt.quantization")
        except ImportError as err:
            raise ImportError("KWS_QUANT_BACKEND=ti but tinyml_torchmodelopt is not installed: "
                              "pip install TI's tinyml-modeloptimization or unset the variable.") from err
    return sys.modules[__name__]


# ----------------------------------------------------------------------------------------------
# Course helpers (notebooks 04-06): BatchNorm folding, variant names, calibration, one call per
# quantized variant (wrap -> calibrate or fine-tune -> convert -> export -> check with ONNX)
# ----------------------------------------------------------------------------------------------
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
        wrapper, history = qat(model, bits, feats, config.qat_epochs_for(bits, prof),
                               config.qat_lr_for(bits, prof), prof.batch_size)
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
