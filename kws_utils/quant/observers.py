"""Observers and fake quantization: symmetric ranges, power-of-2 scales, MSE weight clipping."""
from __future__ import annotations

from functools import partial
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


def _clamp_range(obs: Any) -> None:
    """TI's range_max / fixed_range: clip (or pin) the observed range to +-range_max."""
    if obs.range_max is None:
        return
    signed = bool(obs.min_val.min() < 0)
    low = -obs.range_max if signed else 0.0
    if obs.fixed_range:
        obs.min_val.fill_(low)
        obs.max_val.fill_(obs.range_max)
    else:
        obs.min_val.copy_(torch.clamp(obs.min_val, min=low, max=0.0))
        obs.max_val.copy_(torch.clamp(obs.max_val, min=0.0, max=obs.range_max))


class _WeightObserverMixin:
    """Symmetric weight ranges; TI's running min/max by default, or the course's own options."""

    def _setup(self, power2_scale: bool, range_method: str, range_max: float | None,
               fixed_range: bool) -> None:
        """Store the options shared by the per-channel and per-tensor weight observers."""
        self.power2_scale, self.range_method = power2_scale, range_method
        self.range_max, self.fixed_range = range_max, fixed_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update min/max: TI's running min/max, or (course options) the current weights' range."""
        if self.range_method == "default":
            x = super().forward(x)
        else:
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
        _clamp_range(self)
        return x

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        """Symmetric qparams, with the scale rounded up to a power of two if configured."""
        scale, zero_point = super()._calculate_qparams(min_val, max_val)
        if self.power2_scale:
            scale = torch.max(ceil_power2(scale), self.eps)
        return scale, zero_point


class PerChannelWeightObserver(_WeightObserverMixin, PerChannelMinMaxObserver):
    """Per-output-channel symmetric weight observer."""

    def __init__(self, *args: Any, power2_scale: bool = True, range_method: str = "default",
                 range_max: float | None = None, fixed_range: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(power2_scale, range_method, range_max, fixed_range)


class PerTensorWeightObserver(_WeightObserverMixin, MinMaxObserver):
    """Per-tensor symmetric weight observer."""

    def __init__(self, *args: Any, power2_scale: bool = True, range_method: str = "default",
                 range_max: float | None = None, fixed_range: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(power2_scale, range_method, range_max, fixed_range)


class ActivationObserver(MovingAverageMinMaxObserver):
    """TI's activation range: moving-average min/max; symmetric (unsigned tensors use all of
    [0, 255]) or affine; optionally power-of-2 scales."""

    def __init__(self, *args: Any, power2_scale: bool = True, range_max: float | None = None,
                 fixed_range: bool = False, bias_calibration_factor: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.power2_scale, self.range_max, self.fixed_range = power2_scale, range_max, fixed_range
        self.bias_calibration_factor = bias_calibration_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the moving-average range, then apply range_max/fixed_range."""
        x = super().forward(x)
        _clamp_range(self)
        return x

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        """Scale and zero point as torch.ao computes them, with TI's unsigned and power-of-2 rules."""
        symmetric = self.qscheme == torch.per_tensor_symmetric
        if symmetric and bool(min_val >= 0):
            # unsigned: the whole [0, 255] range (torch's affine rule with min 0)
            self.qscheme = torch.per_tensor_affine
            try:
                scale, zero_point = super()._calculate_qparams(min_val * 0.0, max_val)
            finally:
                self.qscheme = torch.per_tensor_symmetric
        elif symmetric:
            max_abs = torch.max(min_val.abs(), max_val.abs())
            scale, zero_point = super()._calculate_qparams(-max_abs, max_abs)
        else:
            scale, zero_point = super()._calculate_qparams(min_val, max_val)
        if self.power2_scale:
            scale = torch.max(ceil_power2(scale), self.eps)
            if not symmetric:
                low = torch.min(min_val, torch.zeros_like(min_val))
                zero_point = torch.clamp(self.quant_min - torch.round(low / scale).to(torch.int),
                                         self.quant_min, self.quant_max)
        return scale, zero_point


def _soft_round_sigmoid(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """floor(x) + sigmoid(T * (frac(x) - 0.5)); the floor passes gradients straight through."""
    floor = x + (torch.floor(x) - x).detach()
    return floor + torch.sigmoid(temperature * (x - floor - 0.5))


def _soft_round_tanh(x: torch.Tensor, temperature: float, eps: float = 1e-3) -> torch.Tensor:
    """A tanh step around each half-integer, sharper as T grows; identity for T < eps."""
    if temperature < eps:
        return x
    t = torch.tensor(max(temperature, eps), dtype=x.dtype, device=x.device)
    mid = x + (torch.floor(x) - x).detach() + 0.5
    return mid + torch.tanh(t * (x - mid)) / (torch.tanh(t / 2.0) * 2.0)


class SoftFakeQuantize(FakeQuantize):
    """Fake quantization whose rounding is soft while training (TI's soft_quant), hard in eval.

    The temperature starts at TI's value and follows TI's schedule (set by the wrapper per epoch).
    """

    def __init__(self, *args: Any, soft_quant: str = "soft_sigmoid", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.soft_quant = soft_quant
        self.temperature = 6.0 if soft_quant == "soft_sigmoid" else 1.0

    def update_temperature(self, temperature: float) -> None:
        """Set the rounding temperature (higher = closer to hard rounding)."""
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe and fake-quantize; while training return the softly rounded values instead."""
        hard = super().forward(x)
        if not self.training:
            return hard
        scale, zp = self.scale, self.zero_point
        if self.is_per_channel:   # one row per output channel
            scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
        q = x.view(x.shape[0], -1) / scale + zp
        q = (_soft_round_sigmoid(q, self.temperature) if self.soft_quant == "soft_sigmoid"
             else _soft_round_tanh(q, self.temperature))
        q = torch.clamp(q, self.quant_min, self.quant_max)
        return ((q - zp) * scale).view(x.shape)


class RowMaxObserver(PerChannelMinMaxObserver):
    """Per-output-channel range = the largest |value| of the current tensor (DBQ's scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record -max|row|, +max|row| of the current tensor (no running min/max)."""
        peak = x.detach().reshape(x.shape[0], -1).abs().amax(dim=1)
        self.min_val.resize_(peak.shape).copy_(-peak)
        self.max_val.resize_(peak.shape).copy_(peak)
        return x

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        """Scale = the row's peak (one ternary step), at least 1e-5; zero point 0."""
        return torch.clamp(max_val, min=1e-5), torch.zeros(max_val.shape, dtype=torch.int64)


class TernaryFakeQuantize(FakeQuantize):
    """TI's 'dbq' weights: each row thresholded at +-1/3 of its peak into {-1, 0, +1} x peak.

    While training the thresholds are sigmoids of slope T (T doubles every epoch while the
    observers run, as in TI); in eval they are hard steps. The result is then fake-quantized
    with the row peak as scale (TI's DBQ observer), which is also what convert() uses.
    """

    THRESHOLDS = (-1.0 / 3.0, 1.0 / 3.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = 1.0

    def update_temperature(self, _: float | None = None) -> None:
        """Double the slope of the soft thresholds (TI's schedule, capped at 2**20)."""
        self.temperature = min(self.temperature * 2, 2 ** 20)

    def ternary(self, x: torch.Tensor) -> torch.Tensor:
        """Each row as peak x {-1, 0, +1} (soft steps while training)."""
        rows = x.reshape(x.size(0), -1)
        peak = torch.clamp(rows.abs().max(dim=1, keepdim=True)[0], min=1e-8)
        norm = rows / peak
        level = sum(torch.sigmoid((norm - t) * self.temperature) if self.training
                    else (norm - t > 0).to(norm.dtype) for t in self.THRESHOLDS)
        return (peak * (level - 1.0)).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ternary values of each row, then the fake quantization."""
        return super().forward(self.ternary(x))


def make_qconfig(qconfig_type: dict | None) -> QConfig:
    """Turn a qconfig_type dict (one layer's, normalized) into a torch QConfig of fake quantizers."""
    normalized = qconfig_type is not None and "mixed_precision" in qconfig_type.get("weight", {})
    qt = qconfig_type if normalized else normalize_qconfig_type(qconfig_type)
    w, a = qt["weight"], qt["activation"]
    per_channel = w["qscheme"] == torch.per_channel_symmetric
    w_cls = FakeQuantize if w["soft_quant"] == "default" else partial(SoftFakeQuantize, soft_quant=w["soft_quant"])
    w_observer = PerChannelWeightObserver if per_channel else PerTensorWeightObserver
    if w["soft_quant"] == "dbq":
        w_cls, w_observer = TernaryFakeQuantize, RowMaxObserver
    a_cls = FakeQuantize if a["soft_quant"] == "default" else partial(SoftFakeQuantize, soft_quant=a["soft_quant"])
    w_options = {} if w["soft_quant"] == "dbq" else dict(
        power2_scale=w["power2_scale"], range_method=w["observer"], range_max=w["range_max"],
        fixed_range=w["fixed_range"])
    weight_fq = _with_args(w_cls, observer=w_observer, quant_min=w["quant_min"],
                           quant_max=w["quant_max"], dtype=torch.qint8,
                           qscheme=torch.per_channel_symmetric if w["soft_quant"] == "dbq" else w["qscheme"],
                           **w_options)
    act_fq = _with_args(
        a_cls, observer=ActivationObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=a["qscheme"], power2_scale=a["power2_scale"], range_max=a["range_max"],
        fixed_range=a["fixed_range"], bias_calibration_factor=a["bias_calibration_factor"])
    return QConfig(activation=act_fq, weight=weight_fq)


def _with_args(cls: Any, **kwargs: Any) -> Any:
    """A fake-quantizer factory (torch's with_args, also for a partial of a class)."""
    return torch.ao.quantization.observer._PartialWrapper(partial(cls, **kwargs))


def make_backend_config(share_dropout_observer: bool = False):
    """PyTorch's native backend config (TI's); optionally Dropout/Flatten share their input's qparams."""
    backend = get_native_backend_config()
    if not share_dropout_observer:
        return backend
    # Course option: the NPU has no requantization step for identity-like ops, so in the
    # fake-quant model they need no scale of their own (by default Dropout gets one, learned on
    # outputs inflated by 1/(1-p) in training; TI's integer model ignores it anyway).
    shared = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)
    for op in (nn.Dropout, nn.Flatten):
        backend.set_backend_pattern_config(
            BackendPatternConfig(op).set_dtype_configs([shared]).set_observation_type(
                ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT))
    return backend

