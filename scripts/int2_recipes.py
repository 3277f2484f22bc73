"""Compare int2 QAT recipes of the course model: TI's plain recipe against distillation variants.

Every candidate keeps TI's integer format (the active backend's QAT wrapper, qconfig_for(2),
convert(), export()) and is scored through the exported integer ONNX under onnxruntime: on the
dataset's test split and, when available, the official real test set (scoring only); the
fake-quant accuracy (the model as the integer model computes it) is recorded beside it. Learned-
rounding PTQ (quant.ptq_learned) is the baseline to beat. Notebook 05 prints the results file and
picks the recipe on the validation split.

    python scripts/int2_recipes.py                          # default profile: 3-4 min per recipe on 2 cores
    python scripts/int2_recipes.py --only "TI's plain recipe" ...   # a subset, by name; other rows are kept
    python scripts/int2_recipes.py --keep-8bit edges        # the same recipes with conv1 and fc6 8-bit

``--keep-8bit`` (``model.KEEP_8BIT``: ``edges``, ``edges_dw``) keeps those layers' weights 8-bit (TI's
``mixed_precision``) in the learned-rounding baseline and in every candidate; its rows go to their
own results file, so that notebook 05's all-int2 table never mixes with them.

Kept rows that started from learned rounding are marked ``earlier_start`` when learned-rounding PTQ
now scores differently (the rounding method changed since they ran): notebook 05 labels them and
picks its recipe among the others.

Writes output/int2_recipes/<profile>_<dataset>[_8bit_<choice>].json (see results_path).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import disable_observer  # noqa: E402

from kws_utils import config, data, export as kws_export, files, quant, real_audio, training  # noqa: E402
from kws_utils import model as kws_model  # noqa: E402
from kws_utils.quant import distill  # noqa: E402

BITS = 2
GAP_CLIPS = 200   # validation clips for the layer-by-layer gap (as notebook 04)


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
    freeze_weight_scales: bool = False  # keep the start's weight scales (learned rounding's)
    match_integer: bool = False         # train the fake-quant model that computes the integer one
    epochs: int | None = None           # None: the script's --epochs (TI's rule, capped by the profile)
    prior_adjusted: bool = False        # cross-entropy that keeps notebook 03's prior correction
    start_calib: str = "validation"     # learned-rounding start calibrated on: "validation" or "training" clips
    distil_clips: str = "course"        # distilled on notebook 03's training clips ("course") or on "all"
    per_step: bool = False              # cosine learning rate per step instead of TI's per epoch
    exact_requant: bool = False         # train with the NPU's integer bias and exact multipliers


# what every "NPU requantization" row shares: the last rows' start, clips and schedule, and the NPU's arithmetic
_NPU_REQUANT = dict(rounded_start=True, freeze_bn_epoch=0, start_calib="training", distil_clips="all",
                    per_step=True, match_integer=True, exact_requant=True)

RECIPES = (
    Recipe("TI's plain recipe"),
    Recipe("distil (T=4)", kd_temperature=4.0),
    Recipe("distil + CE", kd_temperature=4.0, ce_weight=0.5),
    Recipe("learned rounding + distil", kd_temperature=4.0, rounded_start=True),
    Recipe("learned rounding + distil, BN frozen", kd_temperature=4.0, rounded_start=True,
           freeze_bn_epoch=0),
    Recipe("learned rounding + distil, BN frozen, lr x 0.2", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.2),
    Recipe("learned rounding + distil, BN and weight scales frozen, lr x 0.2", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.2, freeze_weight_scales=True),
    Recipe("learned rounding + distil, BN and weight scales frozen, lr x 0.1", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1, freeze_weight_scales=True),
    Recipe("learned rounding + distil, BN frozen, lr x 0.1", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1),
    Recipe("learned rounding + distil + CE, BN frozen, lr x 0.1", kd_temperature=4.0, ce_weight=0.5,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1),
    Recipe("learned rounding + distil, BN frozen, lr x 0.05", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.05),
    Recipe("learned rounding + distil, BN and weight scales frozen, lr x 0.1, NPU pool",
           kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1,
           freeze_weight_scales=True, match_integer=True),
    Recipe("learned rounding + distil, BN frozen, warm-up, lr x 3", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, warmup_epochs=0.5, lr_factor=3.0),
    # twice the epochs: 8-9 min on 2 cores (measured 2026-12-01), inside issue 18's 10-minute budget
    Recipe("learned rounding + distil, BN frozen, lr x 0.1, 10 epochs", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1, epochs=10),
    Recipe("learned rounding + distil, BN frozen, lr x 0.2, 10 epochs", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.2, epochs=10),
    # Plain cross-entropy on the training split relearns its class mix (notebook 04); these rows train
    # with training.course_loss, which keeps notebook 03's prior correction on the offline dataset.
    Recipe("TI's plain recipe, prior-adjusted loss", prior_adjusted=True),
    Recipe("learned rounding + distil + prior-adjusted CE, BN frozen, lr x 0.1", kd_temperature=4.0,
           ce_weight=0.5, rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1, prior_adjusted=True),
    Recipe("learned rounding + distil + prior-adjusted CE, BN frozen, lr x 0.1, 10 epochs",
           kd_temperature=4.0, ce_weight=0.5, rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1,
           epochs=10, prior_adjusted=True),
    # The start calibrated on config.QAT_START_CALIB_CLIPS training clips instead of 1,000 validation
    # clips (the split that chooses the recipe); "every training clip": the teacher labels the clips
    # notebook 03's realism filter left out too, so the student imitates it on the whole training mix.
    Recipe("learned rounding on training clips + distil, BN frozen, lr x 0.1", kd_temperature=4.0,
           rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1, start_calib="training"),
    Recipe("learned rounding on training clips + distil on every training clip, BN frozen, lr x 0.1, "
           "cosine per step", kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0, lr_factor=0.1,
           start_calib="training", distil_clips="all", per_step=True),
    Recipe("learned rounding on training clips + distil on every training clip, BN frozen, lr x 0.05, "
           "cosine per step", kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0, lr_factor=0.05,
           start_calib="training", distil_clips="all", per_step=True),
    # The fake-quant model computes the NPU's requantization (quant.match_requantization): integer
    # bias and half step, 8-bit multipliers, and the NPU's pool, so QAT trains the model deployed.
    Recipe("learned rounding on training clips + distil on every training clip, BN frozen, lr x 0.05, "
           "cosine per step, NPU requantization", kd_temperature=4.0, lr_factor=0.05, **_NPU_REQUANT),
    Recipe("learned rounding on training clips + distil on every training clip, BN frozen, lr x 0.1, "
           "cosine per step, NPU requantization", kd_temperature=4.0, lr_factor=0.1, **_NPU_REQUANT),
    Recipe("learned rounding on training clips + distil (T=2) on every training clip, BN frozen, lr x 0.05, "
           "cosine per step, NPU requantization", kd_temperature=2.0, lr_factor=0.05, **_NPU_REQUANT),
    Recipe("learned rounding on training clips + distil (T=2) on every training clip, BN frozen, lr x 0.1, "
           "cosine per step, NPU requantization", kd_temperature=2.0, lr_factor=0.1, **_NPU_REQUANT),
    Recipe("learned rounding on training clips + distil (T=1) on every training clip, BN frozen, lr x 0.05, "
           "cosine per step, NPU requantization", kd_temperature=1.0, lr_factor=0.05, **_NPU_REQUANT),
    Recipe("learned rounding on training clips + distil (T=2) on every training clip, BN frozen, lr x 0.05, "
           "cosine per step, NPU requantization, 10 epochs", kd_temperature=2.0, lr_factor=0.05, epochs=10,
           **_NPU_REQUANT),
)
DISTIL_CLIPS = ("course", "all")


def results_path(profile: str, dataset: str, keep_8bit: str = "none") -> Path:
    """Where the comparison of one profile, dataset and mixed-precision choice is saved."""
    suffix = "" if keep_8bit == "none" else f"_8bit_{keep_8bit}"
    return config.output_dir() / "int2_recipes" / f"{profile}_{dataset}{suffix}.json"


def training_calibration(feats: training.FeatureSets, n: int = config.QAT_START_CALIB_CLIPS) -> torch.Tensor:
    """A seeded subset of ``n`` training inputs drawn across the augmented views (never validation)."""
    return quant.calibration_subset(torch.cat(feats.train_views), n)


def converged(val_acc: list[float], spread: float = config.CONVERGED_SPREAD) -> bool:
    """True when the last three validation accuracies lie within ``spread`` of each other."""
    return len(val_acc) >= 3 and max(val_acc[-3:]) - min(val_acc[-3:]) <= spread


def onnx_path(name: str, keep_8bit: tuple[str, ...] = ()) -> Path:
    """Where a recipe's integer ONNX file is written (named after the recipe and its 8-bit layers)."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    if keep_8bit:   # another file than the all-int2 recipe's of the same name
        slug += "_8bit_" + "_".join(keep_8bit)
    return config.output_dir() / "int2_recipes" / "onnx" / f"{slug}.onnx"


def score_onnx(wrapper: nn.Module, name: str, feats: training.FeatureSets,
               real: tuple[torch.Tensor, torch.Tensor] | None, keep_8bit: tuple[str, ...] = ()) -> dict:
    """Export a converted wrapper's integer ONNX and score it on the test split and real test set."""
    path = quant.export_integer(wrapper, onnx_path(name, keep_8bit))
    acc, identical = quant.onnx_check(quant.integer_module(wrapper), path, feats.test_x, feats.test_y)
    real_acc = None if real is None else kws_export.onnx_accuracy(path, *real)
    return {"onnx": path.name, "onnx_test_accuracy": acc, "onnx_identical_to_torch": identical,
            "onnx_real_test_accuracy": real_acc}


def gap_record(fake: nn.Module, path: Path, feats: training.FeatureSets) -> dict:
    """Fake-quant against integer ONNX: prediction flips on the test split, layer gap on validation."""
    flips = quant.prediction_flips(fake, kws_export.onnx_predict(path, feats.test_x), feats.test_x, feats.test_y)
    rows = quant.layer_gap(fake, quant.read_integer_onnx(path), feats.val_x[:GAP_CLIPS])
    return {"flips": asdict(flips), "layer_gap": [asdict(r) for r in rows]}


def run_recipe(recipe: Recipe, model: nn.Module, feats: training.FeatureSets,
               real: tuple[torch.Tensor, torch.Tensor] | None, calib: dict[str, torch.Tensor],
               epochs: int, base_lr: float, batch_size: int, keep_8bit: tuple[str, ...] = (),
               every_clip: training.FeatureSets | None = None) -> dict:
    """Train one candidate from ``model`` (also the teacher); its curve, time and ONNX scores.

    ``calib``: the learned-rounding calibration inputs by name ("validation", "training"); ``every_clip``: the
    unfiltered training features, needed by recipes that distil on every training clip.
    """
    start = time.perf_counter()
    lr = base_lr * recipe.lr_factor
    epochs = recipe.epochs or epochs
    if recipe.start_calib not in calib or recipe.distil_clips not in DISTIL_CLIPS:
        raise ValueError(f"recipe {recipe.name!r}: start_calib must be one of {sorted(calib)} and "
                         f"distil_clips one of {DISTIL_CLIPS}.")
    src = every_clip if recipe.distil_clips == "all" else feats
    if src is None:
        raise ValueError(f"recipe {recipe.name!r} distils on every training clip: pass every_clip "
                         "(training.prepare_features(info)).")
    try:
        init = distill.rounded_start(model, BITS, calib[recipe.start_calib], keep_8bit=keep_8bit) \
            if recipe.rounded_start else model
        wrapper = distill.qat_wrapper(init, BITS, epochs, keep_8bit)
        if recipe.match_integer:
            quant.match_integer_model(wrapper)
        if recipe.exact_requant:
            quant.match_requantization(wrapper)
        loss = training.course_loss(feats) if recipe.prior_adjusted else None   # None: plain CE
        if recipe.kd_temperature is None:   # quant.qat's steps, unrolled to score the fake-quant model
            history = quant.qat_fit(wrapper, feats, epochs, lr, batch_size, training.set_seed(config.SEED),
                                    loss)
        else:
            history = distill.distill_fit(
                wrapper, model, src.train_views,
                distill.Schedule(epochs, lr, batch_size, recipe.warmup_epochs, recipe.freeze_bn_epoch,
                                 recipe.freeze_weight_scales, recipe.per_step),
                distill.KDLoss(recipe.kd_temperature, recipe.ce_weight, loss),
                labels=src.train_y if recipe.ce_weight else None, val=(feats.val_x, feats.val_y))
        # the fake-quant model as the integer model computes it (issue 18: it should predict the ONNX)
        fake = quant.match_integer_model(copy.deepcopy(wrapper))
        fake.apply(disable_observer)   # scoring must not move its ranges (TI's froze them at epoch 3 of 5)
        fake_acc = quant.accuracy(fake, feats.test_x, feats.test_y)
        quant.plain_layers(wrapper)   # convert() matches layer types exactly; the exact scales stay
        wrapper.convert()   # TI's convert() turns the wrapper itself into the integer model
        scores = score_onnx(wrapper, recipe.name, feats, real, keep_8bit)
        scores.update(gap_record(fake, onnx_path(recipe.name, keep_8bit), feats))
    except FloatingPointError as err:   # a diverged run is a result too
        return {**asdict(recipe), "epochs": epochs, "lr": lr, "diverged": str(err)}
    out = {**asdict(recipe), "epochs": epochs, "lr": lr, "backend": type(wrapper).__module__,
           "seconds": round(time.perf_counter() - start, 1), "val_acc": history.val_acc,
           "converged": converged(history.val_acc), "fake_quant_test_accuracy": fake_acc, **scores}
    print(f"{recipe.name}: val {[round(a, 4) for a in history.val_acc]}, fake-quant test {fake_acc:.2%}, ONNX test "
          f"{out['onnx_test_accuracy']:.2%}, real {out['onnx_real_test_accuracy']}, {out['seconds']} s", flush=True)
    return out


def baselines(model: nn.Module, feats: training.FeatureSets,
              real: tuple[torch.Tensor, torch.Tensor] | None, calib: dict[str, torch.Tensor],
              keep_8bit: tuple[str, ...] = ()) -> dict:
    """The float model and learned-rounding PTQ on each calibration set, scored as the recipes."""
    out = {"float_test_accuracy": quant.accuracy(model, feats.test_x, feats.test_y),
           "float_real_test_accuracy": None if real is None else quant.accuracy(model, *real)}
    for name, calib_x in calib.items():   # "learned_rounding_ptq" keeps its name: the validation-calibrated one
        start = time.perf_counter()
        ptq = quant.ptq_learned(copy.deepcopy(model), BITS, calib_x, progress=False, keep_8bit=keep_8bit)
        seconds = time.perf_counter() - start
        key = "learned_rounding_ptq" + ("" if name == "validation" else f"_{name}")
        print(f"learned-rounding PTQ on {len(calib_x):,} {name} inputs: {seconds:.0f} s", flush=True)
        out[key] = {"seconds": round(seconds, 1), "calibrated_on": f"{len(calib_x):,} {name} inputs",
                    **score_onnx(ptq, key.replace("_", " "), feats, real, keep_8bit)}
    return out


def kept_rows(path: Path, result: dict, rerun: set[str]) -> dict[str, dict]:
    """Rows of an earlier results file that this run does not redo (same model, data and seed).

    A row that started from learned rounding keeps, in ``earlier_start``, the learned-rounding PTQ
    accuracy of the start it had when that differs from this run's (the rounding method changed).
    """
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        same = all(earlier.get(k) == result[k] for k in ("profile", "dataset", "seed", "bits",
                                                         "float_test_accuracy"))
        same = same and earlier.get("weights_8bit", []) == result.get("weights_8bit", [])
        earlier_ptq = earlier["learned_rounding_ptq"]["onnx_test_accuracy"]
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"{path}: not a results file of this script; it will be replaced by this run's rows")
        return {}
    if not same:   # another model or dataset: its rows would not be comparable
        print(f"{path}: its rows come from another model or dataset; this run replaces them")
        return {}
    names = {r.name for r in RECIPES}
    kept = {row["name"]: row for row in earlier.get("recipes", [])
            if row["name"] in names and row["name"] not in rerun}
    for row in kept.values():
        if row.get("rounded_start") and "earlier_start" not in row \
                and earlier_ptq != result["learned_rounding_ptq"]["onnx_test_accuracy"]:
            row["earlier_start"] = {"learned_rounding_ptq_onnx_test_accuracy": earlier_ptq}
    return kept


def main() -> None:
    """Run the chosen recipes on the active profile and dataset and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--epochs", type=int, help="QAT epochs (default: TI's rule, capped by the profile)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--keep-8bit", choices=sorted(kws_model.KEEP_8BIT), default="none",
                        help="layers whose weights stay 8-bit (default none: every layer int2)")
    args = parser.parse_args()
    chosen = [r for r in RECIPES if not args.only or r.name in args.only]
    unknown = set(args.only or ()) - {r.name for r in RECIPES}
    if unknown:
        parser.error(f"--only {sorted(unknown)}: no such recipe; the names are those of RECIPES in this script")
    keep = kws_model.KEEP_8BIT[args.keep_8bit]
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = config.profile()
    info = data.ensure_dataset()
    feats = training.course_features(info)   # notebook 03's training clips
    model = training.float_model(feats)
    real = real_audio.test_set(download=False)
    calib = {"validation": quant.calibration_subset(feats.val_x, prof.calib_clips),
             "training": training_calibration(feats)}
    every_clip = training.prepare_features(info) if any(r.distil_clips == "all" for r in chosen) else None
    epochs = args.epochs or config.qat_epochs_for(BITS, prof)
    result = {"profile": prof.name, "dataset": info.kind, "seed": config.SEED, "bits": BITS,
              "trained_on": feats.trained_on(), "calibrated_on": f"{info.kind} validation split",
              "scored_on": [f"{info.kind} test split", real_audio.describe_test() if real else None],
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "weights_8bit": list(keep),
              "learned_rounding": {"steps": prof.rounding_iters, "reg": quant.rounding.REG,
                                   "lr": quant.rounding.LR, "bias_steps": prof.bias_steps},
              **baselines(model, feats, real, calib, keep), "recipes": []}
    path = results_path(prof.name, info.kind, args.keep_8bit)
    rows = kept_rows(path, result, {r.name for r in chosen})
    for recipe in chosen:   # the file is rewritten after each recipe: a long run keeps what it did
        rows[recipe.name] = run_recipe(recipe, model, feats, real, calib, epochs, prof.qat_lr,
                                       prof.batch_size, keep, every_clip)   # factors of TI's rate, not a departure
        result["recipes"] = [rows[r.name] for r in RECIPES if r.name in rows]
        files.write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
