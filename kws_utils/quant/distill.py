"""QAT with knowledge distillation: a float teacher's logits train its own quantized copy.

The student is a QAT wrapper of either backend (``quant_backend()``: TI's
``tinyml_torchmodelopt`` or the course's), so it keeps TI's integer format: same qconfig, same
``convert()`` and ``export()``. What changes is only the training around it:

- the loss: KL divergence to the teacher's temperature-softened logits (Hinton et al. 2015),
  optionally mixed with cross-entropy when labels exist; without labels this is label-free QAT;
- the start: the float weights, or a float copy whose round-to-nearest gives the integers of
  learned-rounding PTQ (``rounded_start``);
- BatchNorm statistics frozen from a chosen epoch (``freeze_bn_stats``, works on both backends);
- optionally, weight scales frozen after the first batch (``freeze_weight_scales``; TI's
  ``convert()`` does not clamp weights that then grow past the last grid point, see notebook 05);
- a linear learning-rate warm-up over the first steps, then TI's cosine per epoch (or per step).

All of it runs on TI's own ``TINPUTinyMLQATFxModule`` (KWS_QUANT_BACKEND=ti): the loss and the
schedule live outside the wrapper, BatchNorm is frozen with torch's ``freeze_bn_stats`` on its
fused layers, and the learned-rounding start is a plain float model (made with the course's PTQ
wrapper) that TI's wrapper then wraps.

Usage::

    wrapper = TINPUTinyMLQATFxModule(student, total_epochs=5, qconfig_type=qconfig_for(2), ...)
    history = distill_fit(wrapper, teacher, feats.train_views, Schedule(epochs=5, lr=0.005),
                          KDLoss(temperature=4.0), labels=feats.train_y, val=(feats.val_x, feats.val_y))
    wrapper.convert()
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer

from kws_utils import config, holdout, training
from kws_utils.errors import InputError
from kws_utils.quant import course, qconfig, rounding, wrappers


@dataclass(frozen=True)
class KDLoss:
    """Distillation loss: T^2 KL(teacher/T || student/T) + ce_weight x cross-entropy (if labels)."""

    temperature: float = 4.0
    ce_weight: float = 0.0      # 0: pure distillation; the labels (if any) only score validation
    # the cross-entropy's loss; None: plain. training.course_loss(feats) keeps notebook 03's prior
    # correction, which plain cross-entropy on the training mix undoes (notebook 04).
    ce_loss: nn.Module | None = None

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch of logits."""
        t = self.temperature
        # T^2 keeps the gradient size independent of T (the soft targets' gradients scale as 1/T^2).
        kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                      reduction="batchmean", log_target=True) * t * t
        if labels is None or self.ce_weight == 0:
            return kd
        return kd + self.ce_weight * (self.ce_loss or F.cross_entropy)(student, labels)


@dataclass(frozen=True)
class Schedule:
    """Epochs, peak lr, warm-up (in epochs, may be fractional) and the BatchNorm freeze epoch."""

    epochs: int
    lr: float
    batch_size: int = 100
    warmup_epochs: float = 0.0
    freeze_bn_epoch: int | None = None   # None: the wrapper's own schedule (TI's rule)
    freeze_weight_scales: bool = False   # keep the weight scales the first batch observes
    per_step: bool = False               # cosine over every step instead of TI's one value per epoch

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        """TI's cosine per epoch (or per step), times a linear warm-up over the first warmup_epochs."""
        progress = epoch + (step / steps if self.per_step else 0.0)
        cosine = self.lr * 0.5 * (1 + math.cos(math.pi * progress / self.epochs))
        done = epoch + (step + 1) / steps
        return cosine * min(1.0, done / self.warmup_epochs) if self.warmup_epochs > 0 else cosine


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The teacher's logits for every input (eval mode: no dropout, running BatchNorm)."""
    teacher.eval()
    return torch.cat([teacher(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def freeze_batchnorm(wrapper: nn.Module) -> nn.Module:
    """Stop BatchNorm statistics updates in every fused QAT layer (either backend)."""
    return wrapper.apply(freeze_bn_stats)


def freeze_weight_scales(wrapper: nn.Module) -> nn.Module:
    """Stop every weight observer (either backend); activation observers keep their schedule."""
    for mod in wrapper.modules():
        if hasattr(mod, "weight_fake_quant"):
            mod.weight_fake_quant.apply(disable_observer)
    return wrapper


def _check_views(views: list[torch.Tensor], labels: torch.Tensor | None) -> None:
    """Refuse empty, mismatched or test inputs before any training starts."""
    if isinstance(views, torch.Tensor) or not views:
        raise InputError("views must be a non-empty list of input tensors (N, 1, 49, 10).")
    for v in views:
        if labels is not None and len(v) != len(labels):
            raise InputError(f"a view holds {len(v)} inputs but labels {len(labels)}: give one "
                             "label per input, or labels=None for label-free distillation.")
        holdout.refuse_test_inputs(v, "quant.distill_fit")


def distill_fit(wrapper: nn.Module, teacher: nn.Module, views: list[torch.Tensor],
                schedule: Schedule, loss: KDLoss = KDLoss(), labels: torch.Tensor | None = None,
                val: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> training.History:
    """Train a QAT wrapper on the teacher's logits, one view per epoch; val accuracy per epoch."""
    _check_views(views, labels)
    targets = [teacher_logits(teacher, v) for v in views]   # fixed soft targets, computed once
    generator = generator or training.set_seed(config.SEED)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=schedule.lr,
                                weight_decay=training.WEIGHT_DECAY)   # TI's: no momentum
    history = training.History()
    for epoch in range(schedule.epochs):
        wrapper.train()   # one call per epoch drives the wrapper's freezing schedule
        if schedule.freeze_bn_epoch is not None and epoch >= schedule.freeze_bn_epoch:
            freeze_batchnorm(wrapper)
        if schedule.freeze_weight_scales and epoch > 0:   # train() may have switched them back on
            freeze_weight_scales(wrapper)
        x, t = views[epoch % len(views)], targets[epoch % len(views)]
        order = torch.randperm(len(x), generator=generator)
        steps = -(-len(x) // schedule.batch_size)
        history.lr.append(schedule.lr_at(epoch, 0, steps))
        total = 0.0
        for step in range(steps):
            idx = order[step * schedule.batch_size:(step + 1) * schedule.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(epoch, step, steps)
            optimizer.zero_grad()
            batch_loss = loss(wrapper(x[idx]), t[idx], None if labels is None else labels[idx])
            if schedule.freeze_weight_scales and epoch == 0 and step == 0:
                # At 2 bits a min/max scale follows the channel's largest weight: one weight moving
                # re-grids the whole channel. The first forward pass has set the start's scales.
                freeze_weight_scales(wrapper)
            if not torch.isfinite(batch_loss):
                raise FloatingPointError(f"distillation diverged at epoch {epoch}, step {step}: "
                                         f"loss {batch_loss.item()}; lower the lr ({schedule.lr:g}).")
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item() * len(idx)
        history.train_loss.append(total / len(x))
        if val is not None:
            result = training.evaluate(wrapper, *val)
            history.val_loss.append(result.loss)
            history.val_acc.append(result.accuracy)
    wrapper.eval()
    return history


def _float_name(fused: str, part: str) -> str:
    """The DS-CNN state-dict key of a fused QAT layer's parameter (``bn.`` -> its BatchNorm)."""
    if not part.startswith("bn."):
        return f"{fused}.{part}"
    bn = "bn1" if fused == "conv1" else f"bn{fused[-1]}{1 if fused.startswith('depthwise') else 2}"
    return f"{bn}.{part[3:]}"


def float_from_wrapper(wrapper: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a DS-CNN) carrying the wrapper's weights and BatchNorm (unfused)."""
    out = copy.deepcopy(model)
    state = out.state_dict()
    for name, mod in rounding.weighted_layers(wrapper.module):
        for part, value in mod.state_dict().items():
            if "fake_quant" not in part and "post_process" not in part:
                state[_float_name(name, part)] = value.clone()
    out.load_state_dict(state)
    return out.eval()


def rounded_start(model: nn.Module, bits: int, calib_x: torch.Tensor,
                  iters: int | None = None, keep_8bit: tuple[str, ...] = ()) -> nn.Module:
    """A float copy of ``model`` whose weights round to learned-rounding PTQ's integers."""
    wrapper = wrappers.TINPUTinyMLPTQFxModule(
        copy.deepcopy(model).eval(), total_epochs=1, qconfig_type=qconfig.qconfig_for(bits, keep_8bit=keep_8bit),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    course.calibrate(wrapper, calib_x)
    rounding.learn_rounding(wrapper, calib_x, iters=iters or config.profile().rounding_iters,
                            progress=False, bias_steps=config.profile().bias_steps)
    return float_from_wrapper(wrapper, model)


def qat_wrapper(model: nn.Module, bits: int, epochs: int, keep_8bit: tuple[str, ...] = ()) -> nn.Module:
    """A QAT wrapper of the active backend around a copy of ``model``, TI's qconfig for ``bits``."""
    wrapper = wrappers.quant_backend().TINPUTinyMLQATFxModule(
        copy.deepcopy(model).eval(), total_epochs=epochs,
        qconfig_type=qconfig.qconfig_for(bits, keep_8bit=keep_8bit),
        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    return course.stable_conv_bn(wrapper)
