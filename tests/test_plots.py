"""The plot fixes of issue 11: whole-epoch ticks, the labelled zoom of accuracy vs bytes, the DET axes."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

from kws_utils import plots, streaming  # noqa: E402


def test_training_curves_tick_whole_epochs() -> None:
    history = SimpleNamespace(train_loss=[1.0, 0.6, 0.5], val_loss=[0.9, 0.7, 0.65],
                              train_acc=[0.5, 0.7, 0.8], val_acc=[0.55, 0.72, 0.78])
    fig = plots.training_curves(history, "synthetic")
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_accuracy_vs_bytes_has_a_labelled_zoom() -> None:
    points = [("float32", 88064, 0.978), ("int8 PTQ", 22016, 0.9767), ("int8 QAT", 22016, 0.9769),
              ("int2 PTQ", 5504, 0.095), ("int2 QAT", 5504, 0.95)]
    full, zoom = plots.accuracy_vs_weight_bytes(points, "synthetic").axes
    assert full.get_ylim() == (0, 105)
    assert zoom.get_ylim()[0] > 50          # the collapsed int2 PTQ point is left out of the zoom
    labels = {t.get_text() for t in zoom.texts}
    assert {"97.67", "97.69", "95.00"} <= labels


def test_det_curve_uses_log_axes() -> None:
    scores = [streaming.Score(t, h, 20 - h, f, 0.1) for t, h, f in ((0.2, 18, 90), (0.5, 15, 9), (0.9, 10, 0))]
    ax = streaming.plot_det(scores, "synthetic").axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"  # symlog: 0 false alarms is a point
