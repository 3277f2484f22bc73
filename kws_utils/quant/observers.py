"""Observers and fake quantization: symmetric ranges, power-of-2 scales, MSE weight clipping."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver,
                                   PerChannelMinMaxObserver, QConfig)
from torch.ao.quantization.backend_config import (BackendPatternConfig, DTypeConfig,
                                                  ObservationType, get_native_backend_config)

from kws_utils.quant.qconfig import normalize_qconfig_type


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

