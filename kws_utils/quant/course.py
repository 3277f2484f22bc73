"""Course helpers (notebooks 04-06): BatchNorm folding, variant names, calibration, and one call
per quantized variant (wrap -> calibrate or fine-tune -> convert -> export -> check with ONNX)."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, disable_observer
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kws_utils import config, export as kws_export, files, holdout, tinpu_onnx, training
from kws_utils.errors import InputError, TrainingDiverged
from kws_utils.quant.gap import match_integer_model
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


def _check_calibration(x: object) -> None:
    """Refuse calibration inputs that are empty, wrongly shaped or not finite, naming calib_x."""
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise InputError(f"calib_x must be a non-empty tensor (N, 1, 49, 10) of features, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise InputError("calib_x holds NaN or infinite values: the quantization ranges would be "
                         "NaN. Check the features (and the audio) used for calibration.")


def calibrate(wrapper: TINPUTinyMLQuantFxModule, x: torch.Tensor, batch_size: int = 100,
              seed: int = config.SEED) -> TINPUTinyMLQuantFxModule:
    """PTQ calibration as TI's KWS example does it: train() (one epoch), forward passes, eval(); then the ranges stay."""
    training._check_count("batch_size", batch_size, 1)
    _check_calibration(x)
    holdout.refuse_test_inputs(x, "quant.calibrate")
    # train() mode keeps dropout on, so the observed ranges depend on its masks: seed them
    # (without disturbing the caller's random state) so that calibration is reproducible.
    with torch.random.fork_rng(), torch.no_grad(), training.on_device(wrapper) as device:
        torch.manual_seed(seed)     # no_grad above: only the observers learn
        wrapper.train()
        for i in range(0, len(x), batch_size):
            wrapper(x[i:i + batch_size].to(device))
    wrapper.eval()
    # eval() leaves the observers on (in both packages): scoring the calibrated model, on test clips
    # too, would go on moving its ranges before convert(). Calibration ends here.
    wrapper.apply(disable_observer)
    return wrapper


def ptq(model: nn.Module, bits: int, calib_x: torch.Tensor, batch_size: int = 100,
        qconfig_type: dict | None = None, backend: ModuleType | None = None,
        match_integer: bool = True) -> TINPUTinyMLPTQFxModule:
    """Wrap a copy (TI's wrapper changes its model in place) for PTQ, calibrate, convert.

    ``backend``: the module with the TINPU classes; by default ``quant_backend()``.
    ``match_integer``: calibrate the fake-quant model that computes what the integer model computes
    (``match_integer_model``: the NPU's pool, no rounding after Dropout/Flatten); False: TI's plain
    wrapper, whose pool is the exact mean.
    """
    wrapper = (backend or quant_backend()).TINPUTinyMLPTQFxModule(
        copy.deepcopy(model), total_epochs=1, qconfig_type=qconfig_type or qconfig_for(bits),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    if match_integer:
        match_integer_model(wrapper)
    calibrate(wrapper, calib_x, batch_size)
    wrapper.convert()   # freezes the observers: later evaluations cannot move the ranges
    return wrapper


def qat_fit(wrapper: TINPUTinyMLQATFxModule, feats: Any, epochs: int, lr: float, batch_size: int,
            generator: torch.Generator, loss_fn: nn.Module | None = None) -> training.History:
    """The QAT loop of notebook 04, as TI's example trains: train() per epoch, SGD, cosine.

    ``loss_fn``: None is TI's cross-entropy; ``training.course_loss(feats)`` keeps notebook 03's
    prior correction where the course makes one (notebook 04 measures why).
    """
    steps = -(-len(feats.train_y) // batch_size)
    optimizer, scheduler = training.make_optimizer(wrapper, lr, epochs, steps)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    history = training.History()
    device = config.device()     # training runs on KWS_DEVICE; convert() and export on the CPU
    wrapper.to(device)
    for epoch in range(epochs):
        history.lr.append(optimizer.param_groups[0]["lr"])
        wrapper.train()   # one call per epoch drives the freezing schedule (BN, then observers)
        views = feats.train_views[epoch % len(feats.train_views)]
        total, correct = 0.0, 0
        for xb, yb in training.Batches(views, feats.train_y, batch_size, shuffle=True,
                                       generator=generator):
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            logits = wrapper(xb)
            loss = loss_fn(logits, yb)
            try:   # else NaN weights surface only later, in convert() or the ONNX file
                training._check_loss(loss, xb, wrapper, optimizer)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"QAT stopped in epoch {epoch + 1}: {err} For 2-bit weights the "
                                       "QAT rate is the profile's int2_qat_lr in kws_utils/config.py.") from None
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        scheduler.step()             # TI's cosine schedule steps once per epoch
        val = training.evaluate(wrapper, feats.val_x, feats.val_y, loss_fn=loss_fn)   # eval() mode
        history.train_loss.append(total / len(feats.train_y))
        history.train_acc.append(correct / len(feats.train_y))
        history.val_loss.append(val.loss)
        history.val_acc.append(val.accuracy)
    wrapper.cpu()
    return history


def qat(model: nn.Module, bits: int, feats: Any, epochs: int, lr: float, batch_size: int,
        seed: int = config.SEED, match_integer: bool = False,
        loss_fn: nn.Module | None = None) -> tuple[TINPUTinyMLQATFxModule, Any]:
    """Fine-tune a QAT wrapper with ``qat_fit`` (notebook 04's loop), convert; (wrapper, history).

    ``loss_fn``: as in ``qat_fit`` (None: TI's plain cross-entropy).

    ``match_integer``: train the fake-quant model that computes what the integer model computes
    (``match_integer_model``). Off by default: measured on the CI profile (int8, from the MLPerf
    reference weights), training through the NPU's 125/64 pool gain diverged (13.75 %).
    """
    wrapper = quant_backend().TINPUTinyMLQATFxModule(
        copy.deepcopy(model), total_epochs=epochs, qconfig_type=qconfig_for(bits),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    stable_conv_bn(wrapper)
    if match_integer:
        match_integer_model(wrapper)
    history = qat_fit(wrapper, feats, epochs, lr, batch_size, training.set_seed(seed), loss_fn)
    wrapper.convert()   # raises FloatingPointError if the fine-tuning diverged (course backend)
    return wrapper, history


def is_ti(wrapper: nn.Module) -> bool:
    """True for a wrapper of TI's tinyml_torchmodelopt, False for kws_utils.quant's."""
    return type(wrapper).__module__.startswith("tinyml_torchmodelopt")


def integer_module(wrapper: TINPUTinyMLQuantFxModule) -> nn.Module:
    """The converted integer model as a PyTorch module, whichever backend made the wrapper."""
    # TI's convert() turns the wrapper itself into the integer model; ours builds an IntegerModel.
    return wrapper if is_ti(wrapper) else wrapper.integer_model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch's ONNX exporter chatter (opset notes, deprecation warnings) for one export."""
    # onnxscript's version converter logs a warning each time it hands over to the onnx C API
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_integer(wrapper: TINPUTinyMLQuantFxModule, path: str | Path,
                   example: torch.Tensor | None = None) -> Path:
    """Export a converted wrapper (either backend) as TINPU integer ONNX, written atomically."""
    example = torch.zeros(1, *config.INPUT_SHAPE) if example is None else example[:1]
    with files.atomic_path(path) as tmp:
        leftover = tmp.with_name(tmp.name + ".data")
        try:
            with _quiet_exporter():
                # TI's export fixes the batch to the example's unless the axis is declared dynamic.
                wrapper.export(example, str(tmp), input_names=["input"], output_names=["logits"],
                               dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        finally:
            # torch's exporter leaves the weights of its first draft beside the file; the
            # simplified file TI saves over it holds its own weights, so the draft is garbage.
            leftover.unlink(missing_ok=True)
        onnx.checker.check_model(str(tmp))   # fails if the file still pointed at external data
    return Path(path)


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


def onnx_check(int_module: nn.Module, path: str | Path, x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, bool]:
    """(accuracy of the ONNX file under onnxruntime, outputs identical to ``int_module``'s)."""
    onnx_out = kws_export.onnx_predict(path, x)
    int_module.eval()
    with torch.no_grad():
        torch_out = torch.cat([int_module(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
    return float((onnx_out.argmax(1) == y.numpy()).mean()), bool(np.array_equal(onnx_out, torch_out))


def packed_weight_bytes(source: str | Path | tinpu_onnx.NpuModel) -> int:
    """Bytes of all conv/linear weights of an integer ONNX file, packed at each layer's width."""
    return tinpu_onnx.packed_weight_bytes(source)


@dataclass
class VariantResult:
    """One quantized variant: its wrapper, integer model, ONNX file, timings and accuracies."""

    bits: int
    method: str
    wrapper: TINPUTinyMLQuantFxModule
    int_module: nn.Module       # the converted integer model (PyTorch), from either backend
    npu: tinpu_onnx.NpuModel    # the integers as read back from the exported ONNX file
    onnx_path: Path
    seconds: float              # calibration (PTQ) or fine-tuning (QAT), plus convert()
    history: Any | None         # training.History of the QAT fine-tuning (None for PTQ)
    fake_quant_acc: float       # the wrapper (fake quantization in float) on the test set
    int_acc: float              # the PyTorch integer model on the test set
    onnx_acc: float             # the exported ONNX file under onnxruntime on the test set
    onnx_identical: bool        # ONNX outputs == PyTorch integer outputs, bit for bit
    fake_quant: nn.Module       # the fake-quant model that was scored, kept from before convert()


def quantize_variant(model: nn.Module, feats: Any, bits: int, method: str,
                     prof: config.Profile | None = None, match_integer: bool = True) -> VariantResult:
    """PTQ (seeded validation subset) or QAT (qat_fit, TI's epochs/lr rules), convert, export, check.

    QAT trains with ``training.course_loss(feats)``: where notebook 03 corrected the class prior,
    the prior-adjusted cross-entropy keeps that correction (notebook 04 measures it), else TI's.

    ``match_integer``: the fake-quant accuracy is that of the model computing what the integer
    model computes (``match_integer_model``), so it predicts the integer model's; PTQ also
    calibrates that model. QAT trains TI's plain wrapper (training through the NPU's pool gain
    diverged, see ``qat``) and is scored through a matched copy. False: TI's plain wrapper only.
    """
    prof = prof or config.profile()
    start = time.perf_counter()
    if method == "ptq":
        wrapper = quant_backend().TINPUTinyMLPTQFxModule(
            copy.deepcopy(model), total_epochs=1, qconfig_type=qconfig_for(bits),
            example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
        if match_integer:
            match_integer_model(wrapper)
        calibrate(wrapper, calibration_subset(feats.val_x, prof.calib_clips))
        history = None
    elif method == "qat":
        # TI's rules for epochs and lr per bit width, with the profile's named departures
        epochs = config.qat_epochs_for(bits, prof)
        wrapper = quant_backend().TINPUTinyMLQATFxModule(
            copy.deepcopy(model), total_epochs=epochs, qconfig_type=qconfig_for(bits),
            example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
        stable_conv_bn(wrapper)
        history = qat_fit(wrapper, feats, epochs, config.qat_lr_for(bits, prof), prof.batch_size,
                          training.set_seed(config.SEED), training.course_loss(feats))
    else:
        raise ValueError(f"method {method!r}: use one of {QUANT_METHODS}.")
    # TI's convert() replaces the fake-quantized model in place: measure it first.
    scored = copy.deepcopy(wrapper)
    scored.apply(disable_observer)   # QAT's may still be on: scoring must not move the copy's ranges
    if match_integer:
        match_integer_model(scored)
    fake_acc = accuracy(scored, feats.test_x, feats.test_y)
    wrapper.convert()
    seconds = time.perf_counter() - start
    int_mod = integer_module(wrapper)
    path = export_integer(wrapper, variant_onnx_path(bits, method), feats.test_x)
    onnx_acc, identical = onnx_check(int_mod, path, feats.test_x, feats.test_y)
    return VariantResult(bits, method, wrapper, int_mod, tinpu_onnx.load_integer_onnx(path), path,
                         seconds, history, fake_acc, accuracy(int_mod, feats.test_x, feats.test_y),
                         onnx_acc, identical, scored)
