"""Plots and tables shared by the notebooks; each one names the data it was made from."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from kws_utils import config
from kws_utils.errors import InputError

SOURCE_TAGS = {
    "real": "real Speech Commands v2",
    "synthetic": "SYNTHETIC speech data, not comparable with MLPerf",
    "mlperf": "real MLPerf kws01 inputs",
}


def source_tag(kind: str) -> str:
    """A short label naming the data a figure or table comes from."""
    if kind not in SOURCE_TAGS:
        raise InputError(f"unknown data source {kind!r}; use one of {sorted(SOURCE_TAGS)}.")
    return SOURCE_TAGS[kind]


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], title: str = "") -> str:
    """Format rows as a fixed-width text table (numbers right-aligned) for printing."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise InputError(f"rows[{i}] has {len(row)} cells but there are {len(headers)} "
                             "headers: give every row one cell per header.")
    cells = [[f"{c:,}" if isinstance(c, (int, np.integer)) and not isinstance(c, bool)
              else f"{c:.4g}" if isinstance(c, (float, np.floating)) else str(c) for c in row]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = ([title] if title else []) + [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


def class_counts(counts: dict[str, Sequence[int]], source: str, title: str = "Clips per class") -> plt.Figure:
    """Grouped bar chart of clips per class for each split."""
    for split, c in counts.items():
        if len(c) != len(config.LABELS):
            raise InputError(f"counts[{split!r}] has {len(c)} numbers; give one per class "
                             f"({len(config.LABELS)}, e.g. data.class_counts(clips)).")
    if not counts:
        raise InputError("counts is empty: give {split name: counts per class}.")
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(counts)
    x = np.arange(len(config.LABELS))
    for i, (split, c) in enumerate(counts.items()):
        ax.bar(x + i * width, c, width, label=split)
    ax.set_xticks(x + width * (len(counts) - 1) / 2, config.LABELS, rotation=30)
    ax.set(title=f"{title} ({source_tag(source)})", xlabel="class", ylabel="clips")
    ax.legend()
    fig.tight_layout()
    return fig


def clip_views(wave: np.ndarray, spectrogram_db: np.ndarray, mfcc: np.ndarray, word: str,
               source: str) -> plt.Figure:
    """A clip as waveform, log-magnitude spectrogram and MFCC, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    t = np.arange(len(wave)) / config.SAMPLE_RATE
    axes[0].plot(t, wave, lw=0.5)
    axes[0].set(title=f'"{word}": waveform', xlabel="time (s)", ylabel="amplitude (int16 units)")
    frame_s = config.FRAME_STEP / config.SAMPLE_RATE
    extent = [0, spectrogram_db.shape[0] * frame_s, 0, config.SAMPLE_RATE / 2000]
    im = axes[1].imshow(spectrogram_db.T, origin="lower", aspect="auto", extent=extent, cmap="magma")
    axes[1].set(title="spectrogram", xlabel="time (s)", ylabel="frequency (kHz)")
    fig.colorbar(im, ax=axes[1], label="magnitude (dB)")
    im = axes[2].imshow(mfcc.T, origin="lower", aspect="auto", cmap="viridis",
                        extent=[0, mfcc.shape[0] * frame_s, -0.5, mfcc.shape[1] - 0.5])
    axes[2].set(title="MFCC (model input)", xlabel="time (s)", ylabel="coefficient index")
    fig.colorbar(im, ax=axes[2], label="value (log-mel DCT units)")
    fig.suptitle(source_tag(source), fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(history: object, source: str, title: str = "Float training") -> plt.Figure:
    """Loss and accuracy per epoch for training and validation."""
    lengths = {len(getattr(history, k)) for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    if len(lengths) != 1 or 0 in lengths:
        raise InputError("history must hold one train/validation loss and accuracy per epoch "
                         "(a training.History from fit), with at least one epoch.")
    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot(epochs, history.train_loss, "o-", label="train")
    a.plot(epochs, history.val_loss, "o-", label="validation")
    a.set(title=f"{title}: loss", xlabel="epoch", ylabel="cross-entropy (nats)")
    b.plot(epochs, np.array(history.train_acc) * 100, "o-", label="train")
    b.plot(epochs, np.array(history.val_acc) * 100, "o-", label="validation")
    b.set(title=f"{title}: accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (a, b):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(source_tag(source), fontsize=9)
    fig.tight_layout()
    return fig


def confusion(cm: torch.Tensor | np.ndarray, source: str, title: str = "Confusion matrix (test set)") -> plt.Figure:
    """Confusion matrix in % of each true class: the colours and the numbers in the cells agree."""
    cm = np.asarray(cm)
    n = len(config.LABELS)
    if cm.shape != (n, n) or (cm < 0).any():
        raise InputError(f"cm must be a ({n}, {n}) matrix of counts >= 0 (training."
                         f"confusion_matrix), got shape {cm.shape}.")
    share = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, f"{share[i, j]:.0f}" if share[i, j] >= 0.5 else "<1", ha="center",
                        va="center", fontsize=7, color="white" if share[i, j] > 50 else "black")
    ticks = np.arange(len(config.LABELS))
    ax.set_xticks(ticks, config.LABELS, rotation=45)
    ax.set_yticks(ticks, [f"{label} ({int(n)})" for label, n in zip(config.LABELS, cm.sum(1))])
    ax.set(title=f"{title}\n{source_tag(source)}", xlabel="predicted class",
           ylabel="true class (clips)")
    fig.colorbar(im, ax=ax, label="share of the true class's clips (%)")
    fig.tight_layout()
    return fig


def mfcc_grid(mfccs: dict[str, np.ndarray | torch.Tensor], source: str, title: str) -> plt.Figure:
    """Several (49, 10) MFCC matrices side by side on one colour scale."""
    if not mfccs:
        raise InputError("mfccs is empty: give {name: (49, 10) MFCC matrix}.")
    for k, v in mfccs.items():
        if np.asarray(v).size != config.N_FRAMES * config.N_MFCC:
            raise InputError(f"mfccs[{k!r}] has shape {np.asarray(v).shape}; each must hold one "
                             f"({config.N_FRAMES}, {config.N_MFCC}) MFCC matrix.")
    arrays = {k: np.asarray(v).reshape(config.N_FRAMES, config.N_MFCC) for k, v in mfccs.items()}
    low, high = min(a.min() for a in arrays.values()), max(a.max() for a in arrays.values())
    fig, axes = plt.subplots(1, len(arrays), figsize=(3.2 * len(arrays), 3.4), squeeze=False,
                             sharey=True, layout="constrained")
    frame_s = config.FRAME_STEP / config.SAMPLE_RATE
    for ax, (name, a) in zip(axes[0], arrays.items()):
        im = ax.imshow(a.T, origin="lower", aspect="auto", cmap="viridis", vmin=low, vmax=high,
                       extent=[0, config.N_FRAMES * frame_s, -0.5, config.N_MFCC - 0.5])
        ax.set(title=name, xlabel="time (s)")
    axes[0][0].set_ylabel("MFCC index")
    fig.colorbar(im, ax=axes[0].tolist(), label="MFCC value")
    fig.suptitle(f"{title} ({source_tag(source)})", fontsize=10)
    return fig


def accuracy_vs_weight_bytes(points: Sequence[tuple[str, float, float]], source: str,
                             title: str = "Accuracy against weight memory") -> plt.Figure:
    """Accuracy (%) against packed weight bytes (log scale): full 0-100 % range and a labelled zoom.

    Points sharing a method (the label's last word, e.g. 'PTQ', 'QAT') are joined by a line; a
    label of one word (e.g. 'float32') is drawn as a star with a dashed reference line. The right
    panel zooms on the points within 10 points of the best and writes each value beside its point,
    PTQ below and QAT above, because at 8 and 4 bits they lie a few clips apart.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    groups: dict[str, list[tuple[float, float]]] = {}
    ticks: dict[float, str] = {}
    for label, n_bytes, acc in points:
        if not (0 < n_bytes < np.inf and 0 <= acc <= 1):
            raise InputError(f"point {label!r}: weight bytes must be > 0 and accuracy a share in "
                             f"[0, 1], got {n_bytes!r} bytes and {acc!r}.")
        fmt, _, method = label.partition(" ")
        ticks[n_bytes / 1024] = f"{fmt}\n{n_bytes / 1024:.1f} KiB"
        groups.setdefault(method or fmt, []).append((n_bytes / 1024, acc * 100))
    best = max(acc * 100 for _, _, acc in points)
    near = [acc * 100 for _, _, acc in points if acc * 100 >= best - 10]
    zoom = (np.floor(min(near)) - 0.5, min(np.ceil(best) + 0.5, 100.5))
    offsets = {"PTQ": (6, -14), "QAT": (6, 8)}
    for ax, ylim in zip(axes, ((0, 105), zoom)):
        for name, xy in groups.items():
            xs, ys = zip(*sorted(xy))
            if len(xy) == 1 and name not in ("PTQ", "QAT"):
                ax.axhline(ys[0], color="grey", ls="--", lw=1)
                ax.plot(xs, ys, "*", ms=14, label=name)
            else:
                ax.plot(xs, ys, "o-" if name == "QAT" else "s--", label=name, alpha=0.8)
            if ax is axes[1]:
                for x, y in xy:
                    if ylim[0] <= y <= ylim[1]:
                        ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points",
                                    xytext=offsets.get(name, (6, 4)), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), list(ticks.values()))
        ax.minorticks_off()
        ax.set(xlabel="packed weight memory (KiB, log scale)", ylabel="test accuracy (%)", ylim=ylim)
        ax.grid(alpha=0.3)
    axes[0].set_title("full range")
    axes[1].set_title(f"zoom: points within 10 points of the best ({zoom[0]:.1f}-{zoom[1]:.1f} %)")
    axes[0].legend(loc="best")  # wherever it hides no point
    fig.suptitle(f"{title}\n{source_tag(source)}", fontsize=10)
    fig.tight_layout()
    return fig
