"""Training: seeding, batching cached features, the float training loop and evaluation."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from kws_utils import config, data, features, files, holdout, mlperf, progress, synthetic
from kws_utils.errors import InputError, InputTypeError, TrainingDiverged
from kws_utils.model import DSCNN, load_checkpoint, prior_corrected, prior_log_ratio, reference_model


def set_seed(seed: int = config.SEED) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator for data order."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"seed={seed!r}: give a whole number from 0 to 2**32 - 1 (the course uses "
                         f"{config.SEED}).")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seeded_model(seed: int = config.SEED) -> tuple[DSCNN, torch.Generator]:
    """A fresh DS-CNN whose initial weights are drawn after seeding, and that seed's data-order generator."""
    generator = set_seed(seed)   # first: building the model draws its initial weights
    return DSCNN(), generator


class Batches:
    """Mini-batches straight from in-memory feature tensors (no per-sample collate)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, sampler: Sampler | None = None) -> None:
        if len(x) != len(y):
            raise InputError(f"{len(x)} inputs but {len(y)} labels: they must pair one to one.")
        _check_count("batch_size", batch_size, 1)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.generator, self.sampler = shuffle, generator, sampler

    def __len__(self) -> int:
        """Number of batches per pass."""
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        """Sample indices for one pass: in order, shuffled, or drawn by a sampler."""
        n = len(self.x)
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler))
        if self.shuffle:
            return torch.randperm(n, generator=self.generator)
        return torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, labels) batches."""
        idx = self.order()
        for start in range(0, len(idx), self.batch_size):
            take = idx[start:start + self.batch_size]
            yield self.x[take], self.y[take]


@dataclass
class History:
    """Per-epoch loss and accuracy of a training run."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    """Loss, accuracy, predictions and logits of a model on one labelled set."""

    loss: float
    accuracy: float
    preds: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor


def _fast_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Put a batch in channels_last memory order, which oneDNN convolves faster on CPU."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class RandDropout(nn.Module):
    """Dropout with its keep-mask drawn by torch.rand: the same Bernoulli(1 - p) mask and 1/(1 - p) scale."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability p and rescale the rest (identity in eval mode)."""
        if not self.training or self.p == 0:
            return x
        # On CPU, bernoulli_ draws one Mersenne-Twister number per element through a slow scalar
        # path; uniform_ (torch.rand) is vectorised and about 2.4x faster, and dropout was a
        # third of each DS-CNN training step.
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep.mul_(1 / (1 - self.p))


@contextmanager
def faster_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every nn.Dropout in ``model`` for RandDropout, restoring them on exit."""
    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, RandDropout(child.p))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    tensor = next(model.parameters(), None)
    tensor = tensor if tensor is not None else next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def on_device(model: nn.Module, device: torch.device | None = None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``device`` (default: config.device()), then move it back."""
    # Moving back keeps every caller's contract: models are on the CPU between stages, where
    # integer conversion, ONNX export and the NumPy reference run.
    device = device or config.device()
    home = model_device(model)
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)
def _check_count(name: str, value: object, least: int) -> int:
    """A whole-number argument (batch size, epochs...) of at least ``least``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(f"{name}={value!r}: give a whole number >= {least}.")
    return int(value)


def _check_loss(loss: torch.Tensor, x: torch.Tensor, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
    """Stop training on a NaN/inf loss, saying the likely reason (data, weights, learning rate)."""
    if torch.isfinite(loss).all():
        return
    lr = optimizer.param_groups[0]["lr"]
    if not torch.isfinite(x).all():
        why = "the input batch holds NaN or inf values: check the features (and the audio)"
    elif not all(torch.isfinite(p).all() for p in model.parameters()):
        why = (f"the weights became NaN/inf: the learning rate (lr={lr:g}) is too large or not a "
               "number; use a smaller one")
    else:
        why = f"the logits overflowed: lower the learning rate (lr={lr:g}) or check the inputs"
    raise TrainingDiverged(f"training stopped: the loss is {loss.item()} ({why}).")


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                loss_fn: nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                channels_last: bool = True, desc: str = "train", show_progress: bool = False
                ) -> tuple[float, float]:
    """One pass of SGD over ``batches`` (a scheduler given here steps every batch); loss, accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    # The optimizer holds the parameter tensors themselves, so .to() keeps it valid on any device;
    # the loss moves too, as a class-weighted loss carries its weights as a tensor.
    with on_device(model) as device, on_device(loss_fn, device), faster_dropout(model):
        for x, y in progress.bar(batches, desc=desc, disable=not show_progress):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(_fast_layout(x, channels_last))
            loss = loss_fn(logits, y)
            _check_loss(loss, x, model, optimizer)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             loss_fn: nn.Module | None = None) -> EvalResult:
    """Evaluate ``model`` in eval mode on features ``x`` with labels ``y``."""
    if len(x) == 0:
        raise InputError("x holds no inputs: evaluate needs at least one (N, 1, 49, 10) input.")
    if y.dtype.is_floating_point or y.ndim != 1 or y.min() < 0 or y.max() >= len(config.LABELS):
        raise InputError(f"y must be a 1-D tensor of class indices 0..{len(config.LABELS) - 1}, "
                         f"got dtype {y.dtype}, shape {tuple(y.shape)}.")
    model.eval()
    with on_device(model) as device:
        logits = torch.cat([model(xb.to(device)).cpu() for xb, _ in Batches(x, y, batch_size)])
    loss = (loss_fn or nn.CrossEntropyLoss())(logits, y).item()
    preds = logits.argmax(1)
    return EvalResult(loss, (preds == y).float().mean().item(), preds, y, logits)


WEIGHT_DECAY = 1e-4   # TI's keyword-spotting example


def make_optimizer(model: nn.Module, lr: float, epochs: int, steps_per_epoch: int = 1,
                   momentum: float = 0.0, per_batch_schedule: bool = False
                   ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """TI's recipe: SGD (weight decay 1e-4, no momentum) and CosineAnnealingLR over the epochs.

    ``momentum`` > 0 and ``per_batch_schedule`` (T_max counted in batches) are departures from it.
    """
    # foreach: one multi-tensor update for all 30 parameter tensors instead of 30 small ones.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=WEIGHT_DECAY, foreach=True)
    t_max = epochs * steps_per_epoch if per_batch_schedule else epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    return optimizer, scheduler


def _check_fit_args(train_views: list[torch.Tensor], train_y: torch.Tensor, epochs: int,
                    lr: float, batch_size: int) -> None:
    """Refuse arguments that would make fit() fail deep inside torch or train on nothing."""
    _check_count("epochs", epochs, 0)
    _check_count("batch_size", batch_size, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not 0 < lr < math.inf:
        raise InputError(f"lr={lr!r}: the learning rate must be a finite number > 0 (the course "
                         "uses 0.05).")
    if isinstance(train_views, torch.Tensor) or len(train_views) == 0:
        raise InputTypeError("train_views must be a non-empty list of feature tensors "
                             "(N, 1, 49, 10), one per cached augmentation.")
    _check_labels("train_y", train_y)
    for view in train_views:
        if len(view) != len(train_y):
            raise InputError(f"a training view holds {len(view)} inputs but train_y {len(train_y)} "
                             "labels: they must pair one to one.")


def _check_labels(name: str, y: object) -> None:
    """Refuse labels that are not a 1-D integer tensor of class indices 0..11, naming them."""
    n = len(config.LABELS)
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool \
            or y.ndim != 1 or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < n):
        detail = (f"dtype {y.dtype}, shape {tuple(y.shape)}, values {int(y.min())}..{int(y.max())}"
                  if isinstance(y, torch.Tensor) and len(y) and not y.dtype.is_floating_point
                  else f"{getattr(y, 'dtype', type(y).__name__)}")
        raise InputError(f"{name} must be a 1-D tensor of class indices 0..{n - 1} (torch.long), "
                         f"got {detail}. Use the labels of data.splits (y.long()).")


def fit(model: nn.Module, train_views: list[torch.Tensor], train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, epochs: int, lr: float, batch_size: int,
        generator: torch.Generator, sampler: Sampler | None = None,
        loss_fn: nn.Module | None = None, channels_last: bool = True,
        momentum: float | None = None, per_batch_schedule: bool | None = None) -> History:
    """Train with CrossEntropy + SGD + cosine annealing (TI's recipe), cycling the augmented views.

    ``momentum`` and ``per_batch_schedule`` default to the active profile's (off: TI's recipe).
    """
    prof = config.profile()
    momentum = prof.momentum if momentum is None else momentum
    per_batch = prof.per_batch_schedule if per_batch_schedule is None else per_batch_schedule
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    _check_fit_args(train_views, train_y, epochs, lr, batch_size)
    _check_labels("val_y", val_y)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = (len(train_y) + batch_size - 1) // batch_size
    optimizer, scheduler = make_optimizer(model, lr, epochs, steps, momentum, per_batch)
    history = History()
    bar = progress.bar(range(epochs), desc="epochs", unit="epoch")
    for epoch in bar:
        # Each epoch sees a different cached augmentation of the training clips.
        batches = Batches(train_views[epoch % len(train_views)], train_y, batch_size,
                          shuffle=True, generator=generator, sampler=sampler)
        history.lr.append(optimizer.param_groups[0]["lr"])
        loss, acc = train_epoch(model, batches, optimizer, loss_fn,
                                scheduler if per_batch else None, channels_last, f"epoch {epoch + 1}")
        if not per_batch:
            scheduler.step()
        val = evaluate(model, val_x, val_y, loss_fn=loss_fn)
        bar.set_postfix(val_acc=f"{val.accuracy:.3f}")
        history.train_loss.append(loss)
        history.train_acc.append(acc)
        history.val_loss.append(val.loss)
        history.val_acc.append(val.accuracy)
    return history


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor,
                     n_classes: int = len(config.LABELS)) -> torch.Tensor:
    """Counts (true class, predicted class) as an (n_classes, n_classes) integer matrix."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    n_classes = _check_count("n_classes", n_classes, 1)
    for name, t in (("preds", preds), ("labels", labels)):
        if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool or t.ndim != 1:
            raise InputError(f"{name} must be a 1-D tensor of integer class indices, got dtype "
                             f"{t.dtype} and shape {tuple(t.shape)} (use logits.argmax(1)).")
        if len(t) and (t.min() < 0 or t.max() >= n_classes):
            raise InputError(f"{name} holds class {int(t.min() if t.min() < 0 else t.max())}, "
                             f"outside 0..{n_classes - 1}: check the labels or n_classes.")
    if preds.shape != labels.shape:
        raise InputError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must have "
                         "the same length.")
    return torch.bincount(labels * n_classes + preds, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall of every class from a confusion matrix (rows are true classes)."""
    return cm.diag().float() / cm.sum(1).clamp(min=1).float()


@dataclass
class FeatureSets:
    """Cached model inputs of every split: augmented training views, clean validation and test."""

    source: str                       # "real" or "synthetic": which dataset the numbers come from
    train_views: list[torch.Tensor]   # each (N_train, 1, 49, 10): one augmentation of the train set
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    filtered_from: int | None = None   # training clips before the realism filter (None: not filtered)

    def trained_on(self) -> str:
        """What a model trained on these features was trained on, for a results table."""
        if self.filtered_from is None:
            return f"{self.source} training split"
        return (f"{self.source} training split, realism-filtered ({len(self.train_y):,} of "
                f"{self.filtered_from:,} clips)")


FEATURE_VERSION = 2  # bump when the feature code changes in a way the settings below do not show


def feature_settings(info: "data.DatasetInfo", splits: dict[str, list],
                     time_masks: int = 0) -> dict[str, object]:
    """Every setting that changes the cached features: dataset, splits, MFCC and augmentation."""
    # Time masks only when used, so caches made before the option keep their names.
    masks = {"time_masks": time_masks, "time_mask_frames": features.TIME_MASK_FRAMES} if time_masks else {}
    return {**masks,
        "dataset": info.kind, "train_dir": str(info.train_dir), "test_dir": str(info.test_dir),
        "split_sizes": [len(splits[s]) for s in ("train", "validation", "test")],
        "seed": config.SEED, "version": FEATURE_VERSION,
        "sample_rate": config.SAMPLE_RATE, "clip_samples": config.CLIP_SAMPLES,
        "frame_length": config.FRAME_LENGTH, "frame_step": config.FRAME_STEP,
        "n_fft": config.N_FFT, "n_mels": config.N_MELS, "n_mfcc": config.N_MFCC,
        "mel_edges_hz": [features.LOWER_EDGE_HZ, features.UPPER_EDGE_HZ],
        "log_offset": features.LOG_OFFSET, "compute_dtype": str(features.COMPUTE_DTYPE),
        "background_frequency": features.BACKGROUND_FREQUENCY,
        "background_volume": features.BACKGROUND_VOLUME,
        "max_shift_samples": features.MAX_SHIFT_SAMPLES,
        "content": clips_fingerprint(splits),
        "markers": [synthetic.read_marker(Path(d)) for d in (info.train_dir, info.test_dir)],
    }


def clips_fingerprint(splits: dict[str, list]) -> str:
    """A hash of every clip file's path, size and modification time (re-recorded clips change it)."""
    digest = hashlib.sha256()
    for path in sorted({clip.path for clips in splits.values() for clip in clips}):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_cache_dir(info: "data.DatasetInfo", splits: dict[str, list], time_masks: int = 0) -> Path:
    """A cache folder named after the dataset and a hash of every feature setting."""
    settings = json.dumps(feature_settings(info, splits, time_masks), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return config.data_root() / "feature_cache" / f"{info.kind}_{Path(info.train_dir).name}_{digest}"


def prepare_features(info: "data.DatasetInfo", views: int | None = None,
                     time_masks: int | None = None) -> FeatureSets:
    """Compute (once) and load the features of all splits; training views are augmented."""
    views = views or config.profile().aug_views
    time_masks = config.TIME_MASKS if time_masks is None else time_masks
    splits = data.splits(info)
    folder = feature_cache_dir(info, splits, time_masks)
    if not (folder / "settings.json").is_file():   # says what the hash stands for
        files.write_text(folder / "settings.json",
                         json.dumps(feature_settings(info, splits, time_masks), indent=1, sort_keys=True))
    labels = {s: torch.tensor([c.label for c in clips]) for s, clips in splits.items()}

    def clean(split: str) -> torch.Tensor:
        """Features of one split without augmentation."""
        waves = data.load_clips(splits[split], desc=f"load {split}")
        return features.compute_features(waves, desc=f"MFCC {split}")

    train_waves: list[np.ndarray] = []

    def augmented(view: int) -> torch.Tensor:
        """One augmented copy of the training set, seeded per view."""
        if not train_waves:
            train_waves.append(data.load_clips(splits["train"], desc="load train"))
        generator = torch.Generator().manual_seed(config.SEED * 1000 + view)
        feats = features.compute_features(train_waves[0], augment=(data.noise_bank(info), generator),
                                          desc=f"MFCC train view {view + 1}/{views}")
        return features.time_mask(feats, generator, time_masks)

    test_x = features.cached(folder / "test.pt", lambda: clean("test"),
                             (len(labels["test"]), *config.INPUT_SHAPE))
    holdout.register_test_inputs(test_x, f"{info.kind} test split")
    return FeatureSets(
        source=info.kind,
        train_views=[features.cached(folder / f"train_view{v}.pt", lambda v=v: augmented(v),
                                     (len(labels["train"]), *config.INPUT_SHAPE))
                     for v in range(views)],
        train_y=labels["train"],
        val_x=features.cached(folder / "validation.pt", lambda: clean("validation"),
                              (len(labels["validation"]), *config.INPUT_SHAPE)),
        val_y=labels["validation"],
        test_x=test_x,
        test_y=labels["test"],
    )


def clean_train_features(info: "data.DatasetInfo") -> torch.Tensor:
    """MFCC of the training clips without augmentation, cached beside the other features."""
    splits = data.splits(info)
    folder = feature_cache_dir(info, splits, config.TIME_MASKS)
    return features.cached(folder / "train_clean.pt",
                           lambda: features.compute_features(data.load_clips(splits["train"], desc="load train"),
                                                             desc="MFCC train (clean)"),
                           (len(splits["train"]), *config.INPUT_SHAPE))


def recognised_by(judge: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A boolean mask of the clips that ``judge`` classifies as their own label (the realism filter)."""
    return evaluate(judge, x, y).preds == y


def keep_training_clips(feats: FeatureSets, keep: torch.Tensor) -> FeatureSets:
    """``feats`` with only the training clips where ``keep`` is True, in every augmented view."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != feats.train_y.shape:
        raise InputError(f"keep must be a boolean mask with one entry per training clip "
                         f"({len(feats.train_y)}), e.g. training.recognised_by(...).")
    if not keep.any():
        raise InputError("keep selects no training clip: nothing would be left to train on.")
    return replace(feats, train_views=[view[keep] for view in feats.train_views], train_y=feats.train_y[keep],
                   filtered_from=len(keep))


def realism_filter(info: "data.DatasetInfo", feats: FeatureSets) -> torch.Tensor | None:
    """The training clips the MLPerf reference recognizes, or None (said why) where the course keeps all."""
    if info.kind != "synthetic" or not config.REALISM_FILTER:
        return None   # the real training split is what the reference itself was trained on
    if not mlperf.available():
        _shout(["NOT realism-filtered: the MLPerf reference weights are not on this machine and cannot be "
                "downloaded.", "Training on every synthetic clip; real-speech accuracy will be lower than "
                "the course's. Set KWS_MLPERF_DIR to a copy of the MLPerf Tiny files to filter."])
        return None
    return recognised_by(reference_model(), clean_train_features(info), feats.train_y)


def course_features(info: "data.DatasetInfo") -> FeatureSets:
    """The features notebook 03 trains on: ``prepare_features``, realism-filtered where the course filters."""
    feats = prepare_features(info)
    keep = realism_filter(info, feats)
    if keep is None:
        return feats
    print(f"realism filter (notebook 03): the {int(keep.sum()):,} of {len(keep):,} training clips the MLPerf "
          "reference recognizes")
    return keep_training_clips(feats, keep)


def corrects_prior(feats: FeatureSets) -> bool:
    """True where notebook 03 corrects the class prior: the offline dataset, with the config's switch on."""
    return feats.source == "synthetic" and config.PRIOR_CORRECTION


def course_prior(net: nn.Module, feats: FeatureSets) -> nn.Module:
    """Notebook 03's last step: the prior-corrected copy of ``net`` where the course corrects, else ``net``."""
    return prior_corrected(net, feats.train_y) if corrects_prior(feats) else net


class PriorAdjustedLoss(nn.Module):
    """Cross-entropy of ``logits + log(n x prior)``: trains a prior-corrected model as its uncorrected self."""

    def __init__(self, log_ratio: torch.Tensor) -> None:
        super().__init__()
        self.log_ratio = log_ratio.float()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's mean cross-entropy after adding the training mix back to the logits."""
        # The corrected bias is the trained one minus log(n p); adding it back here gives exactly the
        # uncorrected model's loss and gradients, so training keeps the deployed bias balanced.
        return nn.functional.cross_entropy(logits + self.log_ratio.to(logits), labels)


def course_loss(feats: FeatureSets) -> nn.Module:
    """The loss for training notebook 03's model further: prior-adjusted where it was corrected, else plain."""
    if not corrects_prior(feats):
        return nn.CrossEntropyLoss()
    return PriorAdjustedLoss(prior_log_ratio(feats.train_y, len(config.LABELS)))


def keywords_called_unknown(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the keyword clips (of ``labels``) that ``preds`` calls *unknown* (notebook 04's count)."""
    keyword = labels < len(config.KEYWORDS)
    return (preds[keyword] == config.UNKNOWN_INDEX).float().mean().item()


SHORT_EPOCHS = 3  # a later notebook run on its own trains this long when notebook 03 has not run


def float_checkpoint_path(source: str) -> Path:
    """Where notebook 03 saves the trained float DS-CNN for the given dataset."""
    return config.artifacts_dir(source) / f"kws_float_{source}.pth"


def fallback_checkpoint_path(source: str) -> Path:
    """Where the short stand-in model goes when notebook 03's checkpoint is missing."""
    return config.artifacts_dir(source) / f"kws_float_{source}_fallback_{SHORT_EPOCHS}ep.pth"


def save_checkpoint(model: nn.Module, path: Path, **meta: object) -> None:
    """Save the state dict with metadata (epochs, dataset) via a temp file and rename."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with files.atomic_path(path) as tmp:
        torch.save({"model": state, **meta}, tmp)


def _shout(lines: list[str]) -> None:
    """Print a framed warning that cannot be missed in a notebook's output."""
    rule = "!" * 78
    print("\n".join([rule, *(f"!!! {line}" for line in lines), rule]))


def float_model(feats: FeatureSets) -> nn.Module:
    """Notebook 03's float DS-CNN; without it, a loudly announced short stand-in with its own name."""
    path = float_checkpoint_path(feats.source)
    if path.is_file():
        print(f"loaded the float model trained in notebook 03: {path}")
        return load_checkpoint(DSCNN(), path).eval()
    fallback = fallback_checkpoint_path(feats.source)
    warning = [f"NOT the model of notebook 03: no checkpoint at {path}.",
               f"Using a SHORT {SHORT_EPOCHS}-epoch stand-in float model instead, saved as {fallback.name}.",
               "Its accuracies are lower than the course's; run notebook 03 for the real model."]
    if fallback.is_file():
        _shout(warning[:1] + [f"Loading the earlier {SHORT_EPOCHS}-epoch stand-in {fallback}."] + warning[2:])
        return load_checkpoint(DSCNN(), fallback).eval()
    _shout(warning)
    prof = config.profile()
    net, generator = seeded_model()
    fit(net, feats.train_views, feats.train_y, feats.val_x, feats.val_y, SHORT_EPOCHS, prof.lr,
        prof.batch_size, generator)
    net = course_prior(net.cpu(), feats)   # as notebook 03: feats are course_features' (filtered)
    save_checkpoint(net, fallback, epochs=SHORT_EPOCHS, source=feats.source, fallback=True)
    return net.eval()


def kws01_scores(models: dict[str, nn.Module]) -> dict[str, float] | None:
    """Accuracy of each model on the real MLPerf kws01 inputs, or None when they are unavailable."""
    try:
        folder = mlperf.kws01_dir()
    except data.DownloadError as err:
        print(f"SKIPPED (real MLPerf kws01 inputs unavailable): {err}")
        return None
    x, y, _ = data.load_kws01(folder)
    return {name: evaluate(m, x, y).accuracy for name, m in models.items()}
