"""PTQ of the reference weights on real speech: round-to-nearest vs learned rounding, per bit width.

Protocol (issue 18): the MLPerf reference DS-CNN, calibrated on ``SUBSETS`` seeded draws of
``SIZE`` real non-test clips (``real_audio.calibration_subsets``, from the calibration pool),
each with ``config.CALIB_COPIES`` augmented copies (time shift + real noise) and a twelfth of
silence cuts of the training noise recordings (``config.CALIB_SILENCE_SHARE``), converted, exported
to the TI integer ONNX and scored under onnxruntime on the official Speech Commands test set (4,890 clips, scoring only). Learned rounding is the one call
``quant.learn_rounding(wrapper, calib)`` with its defaults. At 4 and 2 bits learned rounding also
runs with the first and last layer kept 8-bit (``model.EDGE_LAYERS``, TI's ``mixed_precision``),
a common choice in low-bit quantization, and with the four depthwise layers 8-bit as well
(``model.DEPTHWISE_LAYERS``, chosen on held-out pool clips by ``bench_int2_mixed.py``); each row gives
its packed weight bytes. int4 also runs with TI's own example settings (``quant.ti_example_qconfig(4)``:
no power-of-2 scales, per-tensor affine activations, depthwise2/3 and pointwise2/3 kept 8-bit), and
with those settings but every layer 4-bit, which separates what the scales give from what the 8-bit
layers give. int2 also runs with TI's example *activation* settings alone (per-tensor affine, scales
not powers of two) over the course's int2 weights, every layer 2-bit or with the edge / edge + depthwise
layers 8-bit (``int2_affine_act*``). Times are wall seconds per
calibration subset (calibration + learned rounding) with ``KWS_BENCH_THREADS`` torch threads
(default 1); on a shared machine they vary with the load.
Writes output/bench_ptq_real.json (atomically); ``--missing`` runs only the variants that file lacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from kws_utils import config, export, files, model, quant, real_audio
from timing import check_resumable  # noqa: E402  (benchmarks/, the script's folder)

SUBSETS = int(os.environ.get("KWS_BENCH_SUBSETS", "5"))
SIZE = int(os.environ.get("KWS_BENCH_CALIB_SIZE", "200"))
BITS = tuple(int(b) for b in os.environ.get("KWS_BENCH_BITS", "8,4,2").split(","))


SETTINGS = {"ti_example": "TI's example (quant.ti_example_qconfig)",
            "affine_act": "the course's weights; activations per-tensor affine, scales not powers of 2"}


def qconfig(bits: int, keep_8bit: tuple[str, ...], settings: str = "course") -> dict:
    """The course's qconfig, TI's example settings or affine activations; ``keep_8bit`` layers at 8 bits."""
    if settings in ("course", "affine_act"):
        qt = quant.qconfig_for(bits, keep_8bit=keep_8bit)
        # affine_act: TI's example activations, without its weight quantizers
        return quant.with_affine_activations(qt) if settings == "affine_act" else qt
    qt = quant.ti_example_qconfig(bits)
    qt["weight"].pop("mixed_precision", None)
    if keep_8bit:
        qt["weight"]["mixed_precision"] = {8: list(keep_8bit)}
    return qt


def score(bits: int, calib: torch.Tensor, learn: bool, x: torch.Tensor, y: torch.Tensor,
          folder: Path, keep_8bit: tuple[str, ...] = (), settings: str = "course") -> tuple[float, float, int]:
    """(integer-ONNX accuracy on x, seconds of calibration + learned rounding, packed weight bytes)."""
    wrapper = quant.TINPUTinyMLPTQFxModule(model.reference_model(), total_epochs=1,
                                           qconfig_type=qconfig(bits, keep_8bit, settings))
    quant.match_integer_model(wrapper)   # learn on the network the integer model computes
    start = time.perf_counter()
    quant.calibrate(wrapper, calib)
    if learn:
        quant.learn_rounding(wrapper, calib, progress=False)
    seconds = time.perf_counter() - start
    wrapper.convert()
    path = quant.export_integer(wrapper, folder / f"int{bits}_{'learned' if learn else 'nearest'}.onnx")
    return export.onnx_accuracy(path, x, y), seconds, quant.packed_weight_bytes(path)


def variants() -> list[tuple[str, int, bool, tuple[str, ...], str]]:
    """(key, bits, learned rounding?, 8-bit layers, settings) of every measured variant."""
    edges, edges_dw = model.EDGE_LAYERS, model.EDGE_LAYERS + model.DEPTHWISE_LAYERS
    out = [(f"int{b}_{'learned' if learn else 'nearest'}", b, learn, (), "course")
           for b in BITS for learn in (False, True)]
    out += [(f"int{b}_edges8_learned", b, True, edges, "course") for b in BITS if b < 8]
    out += [(f"int{b}_edges_dw8_learned", b, True, edges_dw, "course") for b in BITS if b < 8]
    if 4 in BITS:
        kept = tuple(quant.ti_example_qconfig(4)["weight"]["mixed_precision"][8])
        out += [(f"int4_ti_example_{'learned' if learn else 'nearest'}", 4, learn, kept, "ti_example")
                for learn in (False, True)]
        out += [("int4_ti_example_all4_nearest", 4, False, (), "ti_example")]   # every layer 4-bit
    if 2 in BITS:   # TI's example settings gave 1.55 points at int4; its activations alone, at int2:
        out += [(f"int2_affine_act{name}_learned", 2, True, keep, "affine_act")
                for name, keep in (("", ()), ("_edges8", edges), ("_edges_dw8", edges_dw))]
    return out


def run(done: dict | None = None) -> dict:
    """Float accuracy, then mean/min integer-ONNX accuracy over the subsets per bit width and method.

    ``done``: an earlier results file's contents; its variants are kept, not run again.
    """
    test = real_audio.test_set(download=False)
    subsets = real_audio.calibration_subsets(SUBSETS, SIZE, copies=config.CALIB_COPIES) \
        if real_audio.noise_dir() is not None else []
    if test is None or len(subsets) < SUBSETS:
        return {"skipped": "official test set, real calibration pool or real noise recordings absent"}
    torch.set_num_threads(int(os.environ.get("KWS_BENCH_THREADS", "1")))
    x, y = test
    with torch.no_grad():
        float_acc = quant.accuracy(model.reference_model(), x, y)
    out = {"trained_on": "MLPerf reference DS-CNN (Speech Commands v0.02 train split)",
           "calibrated_on": f"{SUBSETS} seeded subsets of the real calibration pool, each "
                            f"{real_audio.describe_calibration(SIZE, config.CALIB_COPIES)}",
           "scored_on": f"{real_audio.describe_test()}, {len(y)} clips, integer ONNX (onnxruntime)",
           "threads": torch.get_num_threads(), "float_acc": round(float_acc, 4), "results": {}}
    if done is not None:
        check_resumable(done, out, ("calibrated_on", "scored_on", "float_acc", "threads"))
        out = {**done, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, bits, learn, keep, settings in variants():
            if done is not None and key in done["results"]:
                out["results"][key] = done["results"][key]
                continue
            runs = [score(bits, calib, learn, x, y, Path(tmp), keep, settings) for calib in subsets]
            accs = [a for a, _, _ in runs]
            out["results"][key] = {"accs": [round(a, 4) for a in accs],
                                   "mean": round(sum(accs) / len(accs), 4),
                                   "min": round(min(accs), 4),
                                   "seconds_per_subset": round(sum(s for _, s, _ in runs) / len(runs), 1),
                                   "weights_8bit": list(keep), "packed_weight_bytes": runs[0][2],
                                   "date": time.strftime("%Y-%m-%d", time.gmtime())}
            if settings != "course":
                out["results"][key]["settings"] = SETTINGS[settings]
            print(f"{key}: {out['results'][key]}", flush=True)
    return out


def table(out: dict) -> str:
    """The results as a plain-text table."""
    width = max([len("weights / PTQ"), *map(len, out["results"])]) + 2
    lines = [f"float: {out['float_acc']:.2%}  ({out['scored_on']})",
             f"{'weights / PTQ':<{width}}{'mean':>9}{'min':>9}{'s/subset':>10}{'bytes':>8}"]
    for key, r in out["results"].items():
        lines.append(f"{key:<{width}}{r['mean']:>9.2%}{r['min']:>9.2%}{r['seconds_per_subset']:>10.1f}"
                     f"{r.get('packed_weight_bytes', 0):>8,}")
    return "\n".join(lines)


def main(missing: bool = False) -> None:
    """Run, print the table and write output/bench_ptq_real.json."""
    target = config.output_dir() / "bench_ptq_real.json"
    out = run(json.loads(target.read_text()) if missing and target.is_file() else None)
    print(table(out) if "results" in out else out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(target) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    print(f"written to {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing", action="store_true",
                        help="keep the variants already in output/bench_ptq_real.json; run only the others")
    main(parser.parse_args().missing)
