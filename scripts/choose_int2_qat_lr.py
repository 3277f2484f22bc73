"""Choose the int2 QAT learning rate of a profile on the validation split, never on a test set.

TI's rule trains QAT at the float rate / 100. At 2 bits that rate can drive the logits to NaN
(notebook 05's plain int2 QAT stops with an error); a profile then names a departure,
``Profile.int2_qat_lr``. This script trains notebook 05's int2 QAT (TI's wrapper and qconfig, the
course's loop ``quant.qat`` with notebook 05's loss ``training.course_loss``, TI's epochs capped by the
profile) from notebook 03's model at TI's rate
and at smaller ones, and records each run's validation curve. The rate to use is the one with the best
last validation accuracy among the runs that did not diverge.

    KWS_PROFILE=default python scripts/choose_int2_qat_lr.py --threads 1   # about 10 min per rate, one core

Writes output/int2_qat_lr/<profile>_<dataset>.json; notebook 05's set-up cell prints it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kws_utils import config, data, files, quant, training  # noqa: E402

FACTORS = (1.0, 0.5, 0.2)   # of TI's rate (float lr / 100); 0.2 is the workshop profile's departure


def results_path(profile: str, kind: str) -> Path:
    """Where the comparison of one profile and dataset is saved."""
    return config.output_dir() / "int2_qat_lr" / f"{profile}_{kind}.json"


def run(net: torch.nn.Module, feats: training.FeatureSets, lr: float, epochs: int, batch_size: int,
        loss_fn: torch.nn.Module) -> dict:
    """One int2 QAT run at ``lr`` with ``loss_fn``: its validation curve, or where it diverged."""
    start = time.perf_counter()
    try:
        _, history = quant.qat(net, 2, feats, epochs, lr, batch_size, loss_fn=loss_fn)
        row = {"val_acc": [round(a, 4) for a in history.val_acc]}
    except FloatingPointError as err:   # a diverged run is a result too
        row = {"diverged": str(err)}
    print(f"lr {lr:g}: {row}", flush=True)
    return {"lr": lr, "epochs": epochs, "seconds": round(time.perf_counter() - start, 1), **row}


def chosen(runs: list[dict]) -> dict | None:
    """The run with the best last validation accuracy among those that did not diverge."""
    finished = [r for r in runs if "val_acc" in r]
    return max(finished, key=lambda r: r["val_acc"][-1]) if finished else None


def main() -> None:
    """Train int2 QAT at each rate and save the curves atomically."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = config.profile()
    info = data.ensure_dataset()
    feats = training.course_features(info)   # notebook 03's training clips
    net = training.float_model(feats)
    epochs = config.qat_epochs_for(2, prof)
    loss_fn = training.course_loss(feats)   # notebook 05's QAT loss
    runs = [run(net, feats, prof.qat_lr * f, epochs, prof.batch_size, loss_fn) for f in FACTORS]
    best = chosen(runs)
    result = {"profile": prof.name, "dataset": info.kind, "seed": config.SEED,
              "trained_on": feats.trained_on(), "chosen_on": f"{info.kind} validation split",
              "loss": type(loss_fn).__name__, "ti_lr": prof.qat_lr,
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": runs,
              "chosen_lr": best["lr"] if best else None}
    path = results_path(prof.name, info.kind)
    files.write_text(path, json.dumps(result, indent=1))
    print(f"chosen on validation: lr {result['chosen_lr']}; wrote {path}")


if __name__ == "__main__":
    main()
