"""Training: seeding, batching cached features, the float training loop and evaluation."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kws_utils import config


def set_seed(seed: int = config.SEED) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Batches:
    """Mini-batches straight from in-memory feature tensors (no per-sample collate)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, weights: torch.Tensor | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels: they must pair one to one.")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.generator, self.weights = shuffle, generator, weights

    def __len__(self) -> int:
        """Number of batches per pass."""
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        """Sample indices for one pass: in order, shuffled, or drawn by class weight."""
        n = len(self.x)
        if self.weights is not None:
            # Weighted sampling with replacement: each pass sees classes equally often.
            return torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
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


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                loss_fn: nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                channels_last: bool = True, desc: str = "train") -> tuple[float, float]:
    """One pass of SGD over ``batches`` (scheduler stepped per batch); returns loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in tqdm(batches, desc=desc, leave=False):
        optimizer.zero_grad(set_to_none=True)
        logits = model(_fast_layout(x, channels_last))
        loss = loss_fn(logits, y)
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
    model.eval()
    logits = torch.cat([model(xb) for xb, _ in Batches(x, y, batch_size)])
    loss = (loss_fn or nn.CrossEntropyLoss())(logits, y).item()
    preds = logits.argmax(1)
    return EvalResult(loss, (preds == y).float().mean().item(), preds, y, logits)


def make_optimizer(model: nn.Module, lr: float, epochs: int, steps_per_epoch: int
                   ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """SGD with momentum and a per-step cosine-annealed learning rate over all epochs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    return optimizer, scheduler


def fit(model: nn.Module, train_views: list[torch.Tensor], train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, epochs: int, lr: float, batch_size: int,
        generator: torch.Generator, weights: torch.Tensor | None = None,
        loss_fn: nn.Module | None = None, channels_last: bool = True) -> History:
    """Train with CrossEntropy + SGD + cosine annealing, cycling the cached augmented views."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = (len(train_y) + batch_size - 1) // batch_size
    optimizer, scheduler = make_optimizer(model, lr, epochs, steps)
    history = History()
    for epoch in tqdm(range(epochs), desc="epochs"):
        # Each epoch sees a different cached augmentation of the training clips.
        batches = Batches(train_views[epoch % len(train_views)], train_y, batch_size,
                          shuffle=True, generator=generator, weights=weights)
        history.lr.append(optimizer.param_groups[0]["lr"])
        loss, acc = train_epoch(model, batches, optimizer, loss_fn, scheduler, channels_last,
                                f"epoch {epoch + 1}")
        val = evaluate(model, val_x, val_y, loss_fn=loss_fn)
        history.train_loss.append(loss)
        history.train_acc.append(acc)
        history.val_loss.append(val.loss)
        history.val_acc.append(val.accuracy)
    return history


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor,
                     n_classes: int = len(config.LABELS)) -> torch.Tensor:
    """Counts (true class, predicted class) as an (n_classes, n_classes) integer matrix."""
    return torch.bincount(labels * n_classes + preds, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall of every class from a confusion matrix (rows are true classes)."""
    return cm.diag().float() / cm.sum(1).clamp(min=1).float()
