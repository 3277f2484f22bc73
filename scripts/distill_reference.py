"""Label-free QAT of the MLPerf reference DS-CNN: its float weights teach their int4 and int2 copies.

The reference weights were trained on real speech the course does not have offline. Here the float
reference model labels unlabelled offline audio with its own logits (features of the synthetic
training set, the real non-test calibration pool, crops of the real background noise) and its
quantized copy (the active backend's QAT wrapper, TI's qconfig) is trained to match them
(quant.distill). No label is read for training. Learned-rounding PTQ calibrated on the pool's other
three quarters (plus silence cuts of the training noise recordings, and ``--calib-copies`` augmented
copies of each clip) is the baseline and the start. ``--keep-8bit`` keeps layers at 8 bits with TI's
``mixed_precision``, as bench_ptq_real.py's rows do. Every model is scored through its exported
integer ONNX on the official test set (4,890 real clips, scoring only); validation is label accuracy
on a held-out quarter of the pool, drawn anew for each of ``--seeds``.

    python scripts/distill_reference.py                        # int4 and int2, CI synthetic views
    python scripts/distill_reference.py --bits 2 --seeds 0 1 2 3 4 --keep-8bit edges_dw

Writes output/<--name>.json (default output/distill_reference.json): per seed and in summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kws_utils import config, data, export as kws_export, features, files, model as kws_model  # noqa: E402
from kws_utils import quant, real_audio, training  # noqa: E402
from kws_utils.quant import distill  # noqa: E402

NOISE_CROPS = 600          # 1-s crops of the real background-noise recordings
VAL_FRACTION = 0.25        # of the pool, held out for validation (labels used only to score it)
KEEP_8BIT = kws_model.KEEP_8BIT


def results_path(name: str = "distill_reference") -> Path:
    """Where the distillation results of a run called ``name`` are saved."""
    return config.output_dir() / f"{name}.json"


def noise_inputs(n: int, seed: int = config.SEED) -> torch.Tensor:
    """MFCC inputs of ``n`` random 1-s crops of the real noise recordings at random volumes."""
    folder = real_audio.noise_dir()
    if folder is None:
        return torch.zeros(0, *config.INPUT_SHAPE)
    recordings = [data.load_audio(p).astype(np.float32) for p in sorted(folder.glob("*.wav"))]
    rng = np.random.default_rng(seed)
    crops = np.zeros((n, config.CLIP_SAMPLES), dtype=np.int16)
    for i in range(n):
        rec = recordings[rng.integers(len(recordings))]
        at = rng.integers(len(rec) - config.CLIP_SAMPLES)
        crops[i] = np.clip(rec[at:at + config.CLIP_SAMPLES] * rng.uniform(0.05, 1.0), -32768, 32767)
    return features.compute_features(crops, desc="MFCC noise")


def synthetic_views(profile: str) -> list[torch.Tensor]:
    """The cached augmented training views of one profile's synthetic dataset (no labels used)."""
    folders = sorted((config.data_root() / "feature_cache").glob(
        f"synthetic_synthetic_speech_commands_{profile}_*"))
    views = sorted(folders[0].glob("train_view*.pt")) if folders else []   # one view per epoch
    if not views:
        raise FileNotFoundError(f"no cached synthetic training views of profile {profile!r} under "
                                f"{config.data_root() / 'feature_cache'}: run `KWS_PROFILE={profile} python scripts/prepare_data.py` first.")
    return [torch.load(v) for v in views]


def split_pool(seed: int = config.SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training inputs, validation inputs, validation labels, training clip indices) of the real pool."""
    pool = real_audio.pool_set()
    if pool is None:
        raise FileNotFoundError("no real calibration pool: see real_audio.pool_clips().")
    order = torch.randperm(len(pool[0]), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(order) * VAL_FRACTION)
    return pool[0][order[n_val:]], pool[0][order[:n_val]], pool[1][order[:n_val]], order[n_val:]


def score(wrapper: nn.Module, name: str, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Export a converted wrapper's integer ONNX and score it on the official test set."""
    path = quant.export_integer(wrapper, config.output_dir() / "distill_reference" / f"{name}.onnx")
    acc, identical = quant.onnx_check(quant.integer_module(wrapper), path, *test)
    return {"onnx": path.name, "onnx_real_test_accuracy": acc, "onnx_identical_to_torch": identical}


def learned_ptq(teacher: nn.Module, bits: int, calib_x: torch.Tensor,
                keep_8bit: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """(learned-rounding PTQ wrapper, not yet converted; the float start that rounds onto it)."""
    wrapper = quant.TINPUTinyMLPTQFxModule(copy.deepcopy(teacher), total_epochs=1,
                                           qconfig_type=quant.qconfig_for(bits, keep_8bit=keep_8bit),
                                           example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    quant.calibrate(wrapper, calib_x)
    quant.learn_rounding(wrapper, calib_x, iters=config.profile().rounding_iters, progress=False,
                         bias_steps=config.profile().bias_steps)
    return wrapper, distill.float_from_wrapper(wrapper, teacher)


def distil(teacher: nn.Module, init: nn.Module, bits: int, views: list[torch.Tensor],
           val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
           schedule: distill.Schedule, temperature: float, run: str, keep_8bit: tuple[str, ...] = (),
           requant: bool = False) -> dict:
    """Label-free distillation from ``init``, ONNX score on the official test set."""
    start = time.perf_counter()
    wrapper = distill.qat_wrapper(init, bits, schedule.epochs, keep_8bit)
    if requant:   # train the model the NPU runs: its pool and its requantization (scripts/int2_recipes.py)
        quant.match_requantization(quant.match_integer_model(wrapper))
    history = distill.distill_fit(wrapper, teacher, views, schedule, distill.KDLoss(temperature), val=val)
    quant.plain_layers(wrapper)
    wrapper.convert()
    out = {"bits": bits, "epochs": schedule.epochs, "lr": schedule.lr, "temperature": temperature,
           "freeze_bn_epoch": schedule.freeze_bn_epoch, "warmup_epochs": schedule.warmup_epochs,
           "start": "learned-rounding PTQ", "backend": type(wrapper).__module__, "weights_8bit": list(keep_8bit),
           "npu_requantization": requant,
           "val_acc": history.val_acc, "seconds": round(time.perf_counter() - start, 1),
           **score(wrapper, f"{run}_int{bits}_distilled", test)}
    print(f"int{bits} distilled: val {[round(a, 4) for a in history.val_acc]}, "
          f"official test (ONNX) {out['onnx_real_test_accuracy']:.2%}, {out['seconds']} s", flush=True)
    return out


def run_seed(args: argparse.Namespace, seed: int, teacher: nn.Module,
             test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """One draw of the pool split, silence cuts and noise crops: PTQ baseline and distillation per bit width."""
    pool_train, val_x, val_y, train_idx = split_pool(seed)
    calib_x = real_audio.calibration_set(train_idx.numpy(), args.calib_copies, seed)   # + silence cuts
    n_speech = len(pool_train) * (1 + args.calib_copies)
    extra = torch.cat([pool_train.repeat(4, 1, 1, 1), noise_inputs(NOISE_CROPS, seed)])  # real audio x 4
    views = ([extra] if args.synthetic == "none"
             else [torch.cat([v, extra]) for v in synthetic_views(args.synthetic)])
    schedule = distill.Schedule(args.epochs, args.lr, 100, warmup_epochs=0.5, freeze_bn_epoch=0)
    keep, name = KEEP_8BIT[args.keep_8bit], f"{args.name}_seed{seed}"
    out = {"seed": seed,
           "trained_on": f"unlabelled: synthetic {args.synthetic} training views ({len(views)} x "
                         f"{len(views[0]) - len(extra)}), real calibration pool ({len(pool_train)} clips x 4), "
                         f"{NOISE_CROPS} real-noise crops; soft targets = the float reference's logits",
           "calibrated_on": f"real calibration pool ({len(pool_train)} clips) + {args.calib_copies} augmented "
                            f"copies of each + {len(calib_x) - n_speech} silence cuts of the training noise recordings",
           "validated_on": f"held-out real calibration pool ({len(val_x)} clips, labels)", "distilled": []}
    for bits in args.bits:
        t0 = time.perf_counter()
        ptq, init = learned_ptq(teacher, bits, calib_x, keep)
        val_acc = quant.accuracy(ptq, val_x, val_y)
        ptq.convert()
        out[f"int{bits}_learned_rounding_ptq"] = {"seconds": round(time.perf_counter() - t0, 1), "val_acc": val_acc,
                                                  **score(ptq, f"{name}_int{bits}_ptq", test)}
        print(f"seed {seed}, int{bits} learned-rounding PTQ: {out[f'int{bits}_learned_rounding_ptq']}", flush=True)
        out["distilled"].append(distil(teacher, init, bits, views, (val_x, val_y), test, schedule,
                                       args.temperature, name, keep, args.requant))
    return out


def summary(runs: list[dict], bits: list[int]) -> dict:
    """Mean and minimum official-test accuracy over the seeds, PTQ start and distilled, per bit width."""
    out = {}
    for i, b in enumerate(bits):
        ptq = [r[f"int{b}_learned_rounding_ptq"]["onnx_real_test_accuracy"] for r in runs]
        dist = [r["distilled"][i]["onnx_real_test_accuracy"] for r in runs]
        out[f"int{b}"] = {"ptq_mean": float(np.mean(ptq)), "ptq_min": min(ptq),
                          "distilled_mean": float(np.mean(dist)), "distilled_min": min(dist)}
    return out


def main() -> None:
    """Distil the reference model into each bit width, once per seed, and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 2])
    # 3 epochs at lr 0.001: the best last validation epoch of int2 with conv1, fc6 and the depthwise layers
    # 8-bit, seed 0, among lr 0.0005 / 0.001 / 0.002 x 3 epochs and 0.0005 x 5 (held-out pool, not the test set)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.001, help="peak lr (TI's QAT lr is 0.5 / 100)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--synthetic", default="ci", help="profile whose synthetic views to use, or 'none' (real pool and noise only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-8bit", choices=sorted(KEEP_8BIT), default="none",
                        help="layers kept at 8 bits (TI's mixed_precision): none, the first and last (edges), "
                             "or those and the four depthwise layers (edges_dw)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[config.SEED],
                        help="one run per seed; a seed draws the pool's validation quarter, the silence cuts and "
                             "the noise crops")
    parser.add_argument("--calib-copies", type=int, default=0,
                        help="augmented copies of each calibration clip (config.CALIB_COPIES in notebook 05)")
    parser.add_argument("--requant", action="store_true",
                        help="train through the NPU's pool and requantization (quant.match_requantization)")
    parser.add_argument("--name", default="distill_reference", help="names this run's JSON and ONNX files")
    args = parser.parse_args()
    for name in ("bits", "seeds"):
        if not getattr(args, name):
            parser.error(f"--{name}: give at least one value")
    if args.calib_copies < 0:
        parser.error(f"--calib-copies {args.calib_copies}: give a whole number >= 0")
    torch.set_num_threads(args.threads)
    test = real_audio.test_set(download=False)
    if test is None:
        raise SystemExit("the official test set is unavailable: nothing to score on.")
    teacher = kws_model.reference_model()
    runs = [run_seed(args, seed, teacher, test) for seed in args.seeds]
    result = {"teacher": "MLPerf Tiny reference DS-CNN (float)", "profile": config.profile().name,
              "rounding_iters": config.profile().rounding_iters, "bias_steps": config.profile().bias_steps,
              "weights_8bit": list(KEEP_8BIT[args.keep_8bit]),
              "epochs": args.epochs, "lr": args.lr, "temperature": args.temperature, "calib_copies": args.calib_copies,
              "npu_requantization": args.requant,
              "float_real_test_accuracy": quant.accuracy(teacher, *test),
              "scored_on": real_audio.describe_test(), "test_clips": len(test[1]),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "summary": summary(runs, args.bits), "runs": runs}
    for key, row in result["summary"].items():
        print(f"{key}, {len(runs)} seeds: learned-rounding PTQ {row['ptq_mean']:.2%} mean / {row['ptq_min']:.2%} min; "
              f"distilled {row['distilled_mean']:.2%} / {row['distilled_min']:.2%} (official test, integer ONNX)")
    files.write_text(results_path(args.name), json.dumps(result, indent=1))
    print(f"wrote {results_path(args.name)}")


if __name__ == "__main__":
    main()
