"""The QAT/PTQ wrappers with TI's API (TINPUTinyML*FxModule), and the backend switch."""
from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.ao.nn.intrinsic.qat as nniqat
from torch import nn
from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping
from torch.ao.quantization import quantize_fx

from kws_utils import config
from kws_utils.quant import onnx_form
from kws_utils.quant.integer import IntegerModel, build_integer_model
from kws_utils.quant.observers import make_backend_config, make_qconfig
from kws_utils.quant.qconfig import normalize_qconfig_type


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
            return onnx_form.export_qdq_onnx(self.integer_model, filename, input_names,
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



def quant_backend() -> ModuleType:
    """The module with the TINPU classes: kws_utils.quant, or TI's when KWS_QUANT_BACKEND=ti."""
    if config.quant_backend_choice() == "ti":
        try:
            return importlib.import_module("tinyml_torchmodelopt.quantization")
        except ImportError as err:
            raise ImportError("KWS_QUANT_BACKEND=ti but tinyml_torchmodelopt is not installed: "
                              "pip install TI's tinyml-modeloptimization or unset the variable.") from err
    return importlib.import_module("kws_utils.quant")
