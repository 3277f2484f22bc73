"""kws_utils.quant against TI's tinyml_torchmodelopt on the real MLPerf artifacts (issue 9, item 3).

PTQ of the MLPerf reference DS-CNN at w8/w4/w2, with a plain qconfig and with TI's example
settings, calibrated identically on kws01 files 0-199; each backend's exported integer ONNX
scored with onnxruntime on files 200-999. Also a short QAT run in both backends. Writes
output/benchmarks/ti_agreement.json and prints the table.

Run: PYTHONPATH=. KWS_OUTPUT=output python benchmarks/bench_ti_agreement.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":   # run as a script: make kws_utils importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kws_utils import config  # noqa: E402
from kws_utils.files import write_text  # noqa: E402
from kws_utils.quant import agreement  # noqa: E402


def run() -> dict:
    """The agreement table (PTQ rows) and the short QAT comparison."""
    return {"ptq": agreement.ptq_agreement(), "qat": agreement.qat_agreement()}


def table(results: dict) -> str:
    """The PTQ rows as a Markdown table."""
    lines = ["| qconfig | weights | identical outputs | argmax agreement | course acc | TI acc | same ONNX ops |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['qconfig']} | w{r['weight_bits']} | {r['identical_pct']:.2f} % | "
              f"{r['argmax_agreement_pct']:.2f} % | {r['course_acc_pct']:.2f} % | "
              f"{r['ti_acc_pct']:.2f} % | {r['same_onnx_operators']} |" for r in results["ptq"]]
    return "\n".join(lines)


if __name__ == "__main__":
    results = run()
    path = write_text(config.output_dir() / "benchmarks" / "ti_agreement.json",
                      json.dumps(results, indent=2))
    print(table(results))
    print("QAT:", json.dumps(results["qat"]))
    print(f"written: {path}")
