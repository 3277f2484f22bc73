"""Run every course benchmark and write one results file (output/benchmarks/results.json)."""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from kws_utils import config, files  # noqa: E402

# Benchmark modules in course order; each has run() -> dict of figures.
MODULES = ["bench_features", "bench_data", "bench_training", "bench_deploy", "bench_streaming",
           "bench_calib_silence", "bench_ptq_real", "bench_int2_mixed"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")),
                platform.processor())


def machine() -> dict:
    """Where the figures were measured."""
    import torch
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    """Run each benchmark module that exists and save all figures in one JSON file."""
    results = {"machine": machine()}
    for name in MODULES:
        if not (Path(__file__).resolve().parent / f"{name}.py").exists():
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        results[name] = importlib.import_module(name).run()
        results[name]["benchmark_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[name], indent=2), flush=True)
    out = files.write_text(config.output_dir() / "benchmarks" / "results.json", json.dumps(results, indent=2))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
