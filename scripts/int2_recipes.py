"""Compare int2 QAT recipes of the course model: TI's plain recipe against distillation variants.

Every candidate keeps TI's integer format (the active backend's QAT wrapper, qconfig_for(2),
convert(), export()) and is scored through the exported integer ONNX under onnxruntime: on the
dataset's test split and, when available, the official real test set (scoring only). Learned-
rounding PTQ (quant.ptq_learned) is the baseline to beat.

    KWS_PROFILE=ci python scripts/int2_recipes.py --epochs 4      # ~10 min per recipe on a busy 2-core CPU
    python scripts/int2_recipes.py --only "TI's plain recipe" ...  # a subset, by name

Writes output/int2_recipes/<profile>_<dataset>.json (see results_path).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kws_utils import config, data, export as kws_export, files, quant, real_audio, training  # noqa: E402
from kws_utils.quant import distill  # noqa: E402

BITS = 2
CONVERGED_SPREAD = 0.01   # issue 18: the last three validation epochs within 1 point


@dataclass(frozen=True)
class Recipe:
    """One int2 QAT candidate; ``kd_temperature`` None trains with TI's plain loop (qat_fit)."""

    name: str
    kd_temperature: float | None = None
    ce_weight: float = 0.0
    rounded_start: bool = False        # start from learned-rounding PTQ's integers
    lr_factor: float = 1.0             # x TI's QAT lr (float lr / 100)
    warmup_epochs: float = 0.0
    freeze_bn_epoch: int | None = None  # None: the wrapper's own schedule (TI's rule)


RECIPES = (
    Recipe("TI's plain recipe"),
    Recipe("distil (T=4)", kd_temperature=4.0),
    Recipe("distil + CE", kd_temperature=4.0, ce_weight=0.5),
    Recipe("learned rounding + distil", kd_temperature=4.0, rounded_start=True),
    Recipe("learned rounding + distil, BN frozen", kd_temperature=4.0, rounded_start=True,
           freeze_bn_epoch=0),
    Recipe("learned rounding + distil, BN frozen, lr x 0.2", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.2),
    Recipe("learned rounding + distil, BN frozen, warm-up, lr x 3", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, warmup_epochs=0.5, lr_factor=3.0),
)


def results_path(profile: str, dataset: str) -> Path:
    """Where the comparison of one profile and dataset is saved."""
    return config.output_dir() / "int2_recipes" / f"{profile}_{dataset}.json"


def converged(val_acc: list[float], spread: float = CONVERGED_SPREAD) -> bool:
    """True when the last three validation accuracies lie within ``spread`` of each other."""
    return len(val_acc) >= 3 and max(val_acc[-3:]) - min(val_acc[-3:]) <= spread


def score_onnx(wrapper: nn.Module, name: str, feats: training.FeatureSets,
               real: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Export a converted wrapper's integer ONNX and score it on the test split and real test set."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    path = quant.export_integer(wrapper, config.output_dir() / "int2_recipes" / "onnx" / f"{slug}.onnx")
    acc, identical = quant.onnx_check(quant.integer_module(wrapper), path, feats.test_x, feats.test_y)
    real_acc = None if real is None else float(
        (kws_export.onnx_predict(path, real[0]).argmax(1) == real[1].numpy()).mean())
    return {"onnx": path.name, "onnx_test_accuracy": acc, "onnx_identical_to_torch": identical,
            "onnx_real_test_accuracy": real_acc}


def run_recipe(recipe: Recipe, model: nn.Module, feats: training.FeatureSets,
               real: tuple[torch.Tensor, torch.Tensor] | None, calib_x: torch.Tensor,
               epochs: int, base_lr: float, batch_size: int) -> dict:
    """Train one candidate from ``model`` (also the teacher); its curve, time and ONNX scores."""
    start = time.perf_counter()
    lr = base_lr * recipe.lr_factor
    try:
        if recipe.kd_temperature is None:
            wrapper, history = quant.qat(model, BITS, feats, epochs, lr, batch_size)
        else:
            init = distill.rounded_start(model, BITS, calib_x) if recipe.rounded_start else model
            wrapper = distill.qat_wrapper(init, BITS, epochs)
            history = distill.distill_fit(
                wrapper, model, feats.train_views,
                distill.Schedule(epochs, lr, batch_size, recipe.warmup_epochs, recipe.freeze_bn_epoch),
                distill.KDLoss(recipe.kd_temperature, recipe.ce_weight),
                labels=feats.train_y if recipe.ce_weight else None, val=(feats.val_x, feats.val_y))
            wrapper.convert()   # quant.qat above converts its wrapper itself
        scores = score_onnx(wrapper, recipe.name, feats, real)
    except FloatingPointError as err:   # a diverged run is a result too
        return {**asdict(recipe), "epochs": epochs, "lr": lr, "diverged": str(err)}
    out = {**asdict(recipe), "epochs": epochs, "lr": lr, "backend": type(wrapper).__module__,
           "seconds": round(time.perf_counter() - start, 1), "val_acc": history.val_acc,
           "converged": converged(history.val_acc), **scores}
    print(f"{recipe.name}: val {[round(a, 4) for a in history.val_acc]}, ONNX test "
          f"{out['onnx_test_accuracy']:.2%}, real {out['onnx_real_test_accuracy']}, {out['seconds']} s", flush=True)
    return out


def baselines(model: nn.Module, feats: training.FeatureSets,
              real: tuple[torch.Tensor, torch.Tensor] | None, calib_x: torch.Tensor) -> dict:
    """The float model and learned-rounding PTQ (calibrated on validation inputs), same scoring."""
    real_float = None if real is None else quant.accuracy(model, *real)
    start = time.perf_counter()
    ptq = quant.ptq_learned(model, BITS, calib_x, progress=False)
    seconds = time.perf_counter() - start
    print(f"learned-rounding PTQ: {seconds:.0f} s", flush=True)
    return {"float_test_accuracy": quant.accuracy(model, feats.test_x, feats.test_y),
            "float_real_test_accuracy": real_float,
            "learned_rounding_ptq": {"seconds": round(seconds, 1),
                                     **score_onnx(ptq, "learned rounding ptq", feats, real)}}


def main() -> None:
    """Run the chosen recipes on the active profile and dataset and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--epochs", type=int, help="QAT epochs (default: TI's rule, capped by the profile)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prof = config.profile()
    info = data.ensure_dataset()
    feats = training.prepare_features(info)
    model = training.float_model(feats)
    real = real_audio.test_set(download=False)
    calib_x = quant.calibration_subset(feats.val_x, prof.calib_clips)
    epochs = args.epochs or config.qat_epochs_for(BITS, prof)
    chosen = [r for r in RECIPES if not args.only or r.name in args.only]
    result = {"profile": prof.name, "dataset": info.kind, "seed": config.SEED, "bits": BITS,
              "trained_on": f"{info.kind} training split", "calibrated_on": f"{info.kind} validation split",
              "scored_on": [f"{info.kind} test split", real_audio.describe_test() if real else None],
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              **baselines(model, feats, real, calib_x), "recipes": []}
    path = results_path(prof.name, info.kind)
    for recipe in chosen:   # the file is rewritten after each recipe: a long run keeps what it did
        result["recipes"].append(run_recipe(recipe, model, feats, real, calib_x, epochs,
                                            config.qat_lr_for(BITS, prof), prof.batch_size))
        files.write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
