"""The QAT/PTQ wrappers with TI's API (TINPUTinyML*FxModule), and the backend switch."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import warnings
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.ao.nn.intrinsic.qat as nniqat
from torch import nn
from torch.ao.quantization import FakeQuantize, QConfigMapping
from torch.ao.quantization import quantize_fx

from kws_utils import config, model as kws_model
from kws_utils.errors import InputError
from kws_utils.quant import onnx_form
from kws_utils.quant.integer import IntegerModel, build_integer_model
from kws_utils.quant.observers import (SoftFakeQuantize, TernaryFakeQuantize,
                                       make_backend_config, make_qconfig)
from kws_utils.quant.qconfig import layer_qconfig_type, normalize_qconfig_type


class TinyMLModelQConfigFormat:
    """Model formats for ``export`` (names as in TI's package)."""

    FLOAT_MODEL = "FLOAT_MODEL"
    FAKEQ_MODEL = "FAKEQ_MODEL"
    QDQ_MODEL = "QDQ_MODEL"
    INT_MODEL = "INT_MODEL"
    TINPU_INT_MODEL = "TINPU_INT_MODEL"

def _as_example_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple; the DS-CNN input shape when none are given."""
    if example_inputs is None:
        return (torch.zeros(1, *config.INPUT_SHAPE),)
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


# Leaf module types TI quantizes; other leaves get no qconfig (TI's apply_quantization_to_supported_layers).
_TI_SUPPORTED = (nn.Identity, nn.Dropout, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d,
                 nn.BatchNorm2d, nn.BatchNorm3d, nn.Linear, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def qconfig_mapping(model: nn.Module, qt: dict) -> QConfigMapping:
    """TI's mapping: the global qconfig, per-layer widths of mixed_precision, none for other leaves."""
    mapping = QConfigMapping().set_global(make_qconfig(qt))
    names = {name for name, _ in model.named_modules()}
    for bits, layers in qt["weight"]["mixed_precision"].items():
        missing = sorted(set(layers) - names)
        if missing:
            raise ValueError(f"mixed_precision[{bits}] names modules the model does not have: {missing}.")
        layer_qc = make_qconfig(layer_qconfig_type(qt, bits))
        for layer in layers:
            mapping.set_module_name(layer, layer_qc)
    for name, module in model.named_modules():
        if name and not list(module.children()) and not isinstance(module, _TI_SUPPORTED):
            mapping.set_module_name(name, None)
    return mapping


def _prepare(model: nn.Module, mapping: QConfigMapping, example: tuple,
             share_dropout_observer: bool) -> torch.fx.GraphModule:
    """Fuse conv-bn-relu and insert fake quantizers with torch.ao FX (QAT preparation)."""
    model = copy.deepcopy(model).train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_fx.prepare_qat_fx(model, mapping, example,
                                              backend_config=make_backend_config(share_dropout_observer))
    except Exception as err:  # FX raises many error types while tracing (TraceError, TypeError ...)
        raise TypeError(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}). "
            "FX needs a forward() without Python control flow on tensor values and without "
            "asserts/prints on tensors: move input checks out of forward(), or quantize a "
            "sub-module that traces.") from err


def _check_example(example: tuple, model: nn.Module) -> None:
    """The DS-CNN's input-shape check on example_inputs, naming the argument."""
    if isinstance(model, kws_model.DSCNN):
        try:
            kws_model.check_input(example[0])
        except ValueError as err:
            raise ValueError(f"example_inputs: {err}") from None


class TINPUTinyMLQuantFxModule(nn.Module):
    """QAT/PTQ wrapper producing TI NPU integer models (API and meaning of TI's tinyml_torchmodelopt).

    TI's arguments keep TI's meaning, including the schedule: ``num_batch_norm_update_epochs`` and
    ``num_observer_update_epochs`` of None or 0 mean TI's default epoch (``total_epochs // 2 - 1``
    and ``total_epochs // 2 + 1``), False never freezes. The course's own departures are options,
    all off by default: ``freeze_bn_from_start`` (BatchNorm frozen from the first QAT epoch),
    ``share_dropout_observer`` (Dropout/Flatten reuse their input's scale in the fake-quant
    model) and ``exact_pool`` (8-bit pooling divisor also with power-of-2 scales).
    """

    def __init__(self, model: nn.Module, total_epochs: int, qconfig_type: dict | None = None,
                 example_inputs: Any = None, is_qat: bool = True,
                 num_batch_norm_update_epochs: int | bool | None = None,
                 num_observer_update_epochs: int | bool | None = None,
                 bias_calibration_factor: float = 0.0, output_int: bool = True,
                 verbose: bool = True, freeze_bn_from_start: bool = False,
                 share_dropout_observer: bool = False, exact_pool: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}.")
        for name, value in (("num_batch_norm_update_epochs", num_batch_norm_update_epochs),
                            ("num_observer_update_epochs", num_observer_update_epochs)):
            if value is not None and value is not False and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be None, False or an epoch number >= 0, got {value!r}.")
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, (int, np.integer)) or total_epochs < 1:
            raise InputError(f"total_epochs={total_epochs!r}: give the number of (QAT) epochs as a "
                             "whole number >= 1 (1 for PTQ).")
        self.qconfig_type = normalize_qconfig_type(qconfig_type)
        self.example_inputs = _as_example_tuple(example_inputs)
        _check_example(self.example_inputs, model)
        self.input_shape = tuple(self.example_inputs[0].shape[1:])
        self.module = _prepare(model, qconfig_mapping(model, self.qconfig_type), self.example_inputs,
                               share_dropout_observer)
        # verbose is accepted for TI compatibility; this implementation prints nothing
        self.total_epochs, self.is_qat, self.output_int, self.verbose = (
            total_epochs, is_qat, output_int, verbose)
        self.num_batch_norm_update_epochs = num_batch_norm_update_epochs
        self.num_observer_update_epochs = num_observer_update_epochs
        self.freeze_bn_from_start, self.exact_pool = freeze_bn_from_start, exact_pool
        # TI: the larger of the argument and the qconfig's activation factor (PTQ only)
        self.bias_calibration_factor = max(bias_calibration_factor,
                                           self.qconfig_type["activation"]["bias_calibration_factor"])
        self.temperatures = np.exp(np.linspace(0.0, np.log(500.0), total_epochs))
        self.num_epochs_tracked = 0
        self.integer_model: IntegerModel | None = None
        self._converted_state: dict | None = None
        self._bias_hooks: list = []
        if not is_qat:
            # PTQ only observes: frozen BN and no trainable parameters.
            self.module.apply(nniqat.freeze_bn_stats)
            self.module.requires_grad_(False)

    @property
    def weight_bits(self) -> int:
        """Bit width of the weights (the global one; mixed_precision layers may differ)."""
        return self.qconfig_type["weight"]["bitwidth"]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The fake-quantized (QDQ) model's output."""
        if args and isinstance(args[0], torch.Tensor) and tuple(args[0].shape[1:]) != self.input_shape:
            self._check_input(args[0])
        return self.module(*args, **kwargs)

    def _check_input(self, x: torch.Tensor) -> None:
        """A clear error for an input of the wrong shape (the traced graph has no check)."""
        if self.input_shape == config.INPUT_SHAPE:
            kws_model.check_input(x)
        raise ValueError(f"input must be (N, {', '.join(map(str, self.input_shape))}); got "
                         f"{tuple(x.shape)}.")

    def train(self, mode: bool = True) -> "TINPUTinyMLQuantFxModule":
        """Set the mode; each train() call starts an epoch of the freezing schedule."""
        super().train(mode)
        if mode:
            self._start_epoch()
        else:
            if self.num_epochs_tracked == self.total_epochs:
                self.freeze()
            self._remove_bias_hooks()
        return self

    def _start_epoch(self) -> None:
        """Apply TI's schedule: freeze BN, then observer ranges, in the later epochs."""
        half = self.total_epochs // 2
        bn_at, obs_at = self.num_batch_norm_update_epochs, self.num_observer_update_epochs
        # TI reads None and 0 alike as its default epoch; False never freezes.
        bn_on, obs_on = bn_at is not False, obs_at is not False
        bn_at = 0 if self.freeze_bn_from_start else (bn_at or half - 1)
        obs_at = obs_at or half + 1
        freeze_bn = bn_on and (not self.is_qat or self.num_epochs_tracked >= bn_at)
        freeze_obs = obs_on and self.num_epochs_tracked >= obs_at
        self.freeze(freeze_bn=freeze_bn, freeze_observers=freeze_obs)
        if not self.is_qat and self.bias_calibration_factor:
            self._add_bias_hooks()
        if not freeze_obs:
            for fq in self.modules():
                if isinstance(fq, (SoftFakeQuantize, TernaryFakeQuantize)):
                    fq.update_temperature(float(self.temperatures[self.num_epochs_tracked]))
        self.num_epochs_tracked += 1

    def _add_bias_hooks(self) -> None:
        """PTQ bias calibration (TI's): after each forward, move each bias toward the float mean."""
        self._remove_bias_hooks()
        fraction = self.num_epochs_tracked / self.total_epochs
        weight = 0.1 if fraction <= 0.25 or fraction >= 0.75 else 1.0
        mods = dict(self.module.named_modules())
        for node in self.module.graph.nodes:
            fq, layer = mods.get(node.target), mods.get(getattr(node.prev, "target", None))
            if not isinstance(fq, FakeQuantize) or layer is None:
                continue
            if getattr(layer, "bias", None) is None and hasattr(layer, "bn"):
                layer = layer.bn
            if getattr(layer, "bias", None) is not None:
                factor = fq.activation_post_process.bias_calibration_factor * weight
                self._bias_hooks.append(fq.register_forward_hook(partial(_calibrate_bias, layer=layer,
                                                                          factor=factor)))

    def _remove_bias_hooks(self) -> None:
        """Remove the bias-calibration hooks (at eval())."""
        for hook in self._bias_hooks:
            hook.remove()
        self._bias_hooks = []

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
        self.integer_model = build_integer_model(
            self.module, self.example_inputs, self.qconfig_type["weight"]["power2_scale"], output,
            exact_pool=self.exact_pool)
        self._converted_state = _state_fingerprint(self.module)
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
        if not _same_state(self._converted_state, _state_fingerprint(self.module)):
            # trained or calibrated further since convert(): never write the stale integer model
            self.convert(self.integer_model.output)
        if model_qconfig_format == TinyMLModelQConfigFormat.QDQ_MODEL:
            self.integer_model.quantize_input(example_input)  # shape check with a clear message
            return onnx_form.export_qdq_onnx(self.integer_model, filename, input_names,
                                              output_names, opset_version)
        return self.integer_model.export(example_input, filename, input_names=input_names,
                                         output_names=output_names, opset_version=opset_version)


class TINPUTinyMLQATFxModule(TINPUTinyMLQuantFxModule):
    """Quantization-aware training: train the wrapper like the float model, then convert()."""


class TINPUTinyMLPTQFxModule(TINPUTinyMLQuantFxModule):
    """Post-training quantization: forward passes over calibration data, eval(), then convert()."""

    def __init__(self, *args: Any, is_qat: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, is_qat=is_qat, **kwargs)


def _calibrate_bias(fq: nn.Module, inputs: tuple, output: torch.Tensor, layer: nn.Module,
                    factor: float) -> torch.Tensor:
    """Add factor x (mean before - mean after fake quantization) per channel to the layer's bias."""
    x = inputs[0] if isinstance(inputs, tuple) else inputs
    channels = layer.bias.shape[0]
    if x.dim() == 3:
        error = x.mean(dim=(0, 1)) - output.mean(dim=(0, 1))
    elif x.dim() == 4 and x.shape[1] == channels:
        error = x.mean(dim=(0, 2, 3)) - output.mean(dim=(0, 2, 3))
    elif x.dim() == 4 and x.shape[3] == channels:
        error = x.mean(dim=(0, 1, 2)) - output.mean(dim=(0, 1, 2))
    else:
        return output
    layer.bias.data += error * factor
    return output


def _state_fingerprint(module: nn.Module) -> dict:
    """A copy of every parameter and buffer (weights, BN statistics, observer ranges)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict | None, b: dict) -> bool:
    """True when two fingerprints hold equal tensors."""
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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



def ti_installed() -> bool:
    """True if TI's tinyml_torchmodelopt can be imported here."""
    return importlib.util.find_spec("tinyml_torchmodelopt") is not None


_NOTICE_SHOWN: list[bool] = []


def quant_backend() -> ModuleType:
    """The module with the TINPU classes: TI's package by default when installed, else kws_utils.quant."""
    choice = config.quant_backend_choice()
    if choice == "ti" or (choice == "auto" and ti_installed()):
        try:
            return importlib.import_module("tinyml_torchmodelopt.quantization")
        except ImportError as err:
            raise ImportError("KWS_QUANT_BACKEND=ti but tinyml_torchmodelopt is not installed: "
                              "pip install TI's tinyml-modeloptimization (README, 'Set-up') or set "
                              "KWS_QUANT_BACKEND=course.") from err
    if choice == "auto" and not _NOTICE_SHOWN:
        _NOTICE_SHOWN.append(True)   # once per process: the notebooks call this often
        print("TI's tinyml_torchmodelopt is not installed: using kws_utils.quant, the course's "
              "stand-in with the same API and integer results.")
    return importlib.import_module("kws_utils.quant")
