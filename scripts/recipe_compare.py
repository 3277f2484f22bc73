"""Train the float DS-CNN (and int2 QAT) with TI's recipe and with each named departure; save JSON.

TI's keyword-spotting example (tinyml-tensorlab, examples/audio_keyword_spotting/main.py) trains
with SGD without momentum, weight decay 1e-4, cross-entropy and CosineAnnealingLR(T_max=epochs)
stepped once per epoch; its QAT runs at lr / 100. The course follows it by default. The departures
config.Profile can name (momentum, a per-batch cosine schedule, a separate int2 QAT learning rate)
are measured here against it, on the active profile and dataset, so notebook 03 can show both: on
notebook 03's training clips (``training.course_features``: realism-filtered on the offline dataset)
and with its prior correction (``training.course_prior``).

    KWS_PROFILE=ci python scripts/recipe_compare.py        # ~4 min of CPU time on the CI profile
    python scripts/recipe_compare.py                       # 28 min on the default profile, 2 cores
    python scripts/recipe_compare.py --skip-qat            # float runs only

Writes output/recipe_compare/<profile>_<dataset>.json (see results_path).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kws_utils import config, data, files, quant, training  # noqa: E402
from kws_utils.model import DSCNN  # noqa: E402

# With momentum m, SGD's steady-state step is lr / (1 - m): a momentum run at lr * (1 - m) takes
# steps of the same size as TI's, so the comparison is about momentum, not about step size.
MOMENTUM = 0.9
# The course's 2-bit QAT learning rate before it adopted TI's lr / 100.
INT2_QAT_LR = 0.002


def results_path(profile: str, dataset: str) -> Path:
    """Where the comparison of one profile and dataset is saved (notebook 03 reads it)."""
    return config.output_dir() / "recipe_compare" / f"{profile}_{dataset}.json"


def float_run(feats: training.FeatureSets, name: str, lr: float, momentum: float,
              per_batch: bool) -> tuple[dict, DSCNN]:
    """Train one float DS-CNN with the profile's epochs; its settings, curves and test accuracy."""
    prof = config.profile()
    net, generator = training.seeded_model(config.SEED)
    start = time.perf_counter()
    history = training.fit(net, feats.train_views, feats.train_y, feats.val_x, feats.val_y,
                           epochs=prof.epochs, lr=lr, batch_size=prof.batch_size,
                           generator=generator, momentum=momentum,
                           per_batch_schedule=per_batch)
    net = training.course_prior(net.cpu(), feats)   # notebook 03's last step, where the course takes it
    test = training.evaluate(net, feats.test_x, feats.test_y)
    print(f"{name}: test accuracy {test.accuracy:.2%}")
    return {"name": name, "lr": round(lr, 12), "momentum": momentum, "per_batch_schedule": per_batch,
            "epochs": prof.epochs, "seconds": round(time.perf_counter() - start, 1),
            "val_acc": history.val_acc, "val_loss": history.val_loss,
            "test_accuracy": test.accuracy}, net


def int2_qat_run(net: DSCNN, feats: training.FeatureSets, name: str, lr: float) -> dict:
    """2-bit QAT from ``net`` at ``lr`` for TI's number of epochs; its curve and test accuracy."""
    prof = config.profile()
    epochs = config.qat_epochs_for(2, prof)
    model = DSCNN()
    model.load_state_dict(net.state_dict())
    start = time.perf_counter()
    try:
        wrapper, history = quant.qat(model.eval(), 2, feats, epochs, lr, prof.batch_size)
        acc, val = quant.accuracy(wrapper, feats.test_x, feats.test_y), history.val_acc
    except FloatingPointError as err:   # a diverged run is a result too
        acc, val = float("nan"), [str(err)]
    print(f"{name}: int2 QAT test accuracy {acc:.2%}")
    return {"name": name, "lr": lr, "epochs": epochs, "seconds": round(time.perf_counter() - start, 1),
            "val_acc": val, "test_accuracy": acc}


def main() -> None:
    """Run every recipe on the active profile and dataset and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-qat", action="store_true", help="float runs only")
    args = parser.parse_args()
    prof = config.profile()
    info = data.ensure_dataset()
    feats = training.course_features(info)   # notebook 03's training clips
    lr = prof.lr
    ti, ti_net = float_run(feats, "TI's recipe (default)", lr, 0.0, False)
    runs = [ti,
            float_run(feats, f"momentum {MOMENTUM} (lr x {1 - MOMENTUM:.1f})", lr * (1 - MOMENTUM),
                      MOMENTUM, False)[0],
            float_run(feats, "per-batch cosine schedule", lr, 0.0, True)[0],
            float_run(feats, f"momentum {MOMENTUM} + per-batch (the course's earlier recipe)",
                      lr * (1 - MOMENTUM), MOMENTUM, True)[0]]
    # The second rate: the profile's int2 departure where it names one, else the course's earlier rate.
    other = (("the profile's int2 rate (Profile.int2_qat_lr)", prof.int2_qat_lr) if prof.int2_qat_lr
             else ("the course's earlier int2 rate", INT2_QAT_LR))
    qat_runs = [] if args.skip_qat else [
        int2_qat_run(ti_net, feats, "int2 QAT at TI's lr / 100", config.qat_lr_for(8, prof)),
        int2_qat_run(ti_net, feats, f"int2 QAT at {other[0]}", other[1])]
    result = {"profile": prof.name, "dataset": info.kind, "seed": config.SEED, "trained_on": feats.trained_on(),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "float": runs, "int2_qat": qat_runs}
    path = results_path(prof.name, info.kind)
    files.write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
