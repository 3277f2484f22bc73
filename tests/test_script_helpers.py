"""Helpers of the results scripts: which settings a benchmark row runs, which earlier runs are reused."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from kws_utils import quant

REPO = Path(__file__).resolve().parent.parent


def _load(path: str):
    """Import a script of the repository as a module (scripts and benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((REPO / path).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_bench_rows_with_tis_example_settings() -> None:
    bench = _load("benchmarks/bench_ptq_real.py")
    rows = {key: (bits, learn, keep, example) for key, bits, learn, keep, example in bench.variants()}
    ti = quant.ti_example_qconfig(4)
    kept = tuple(ti["weight"]["mixed_precision"][8])
    assert rows["int4_ti_example_nearest"] == (4, False, kept, True)
    assert bench.qconfig(4, kept, True) == ti
    every_layer = bench.qconfig(4, (), True)
    assert "mixed_precision" not in every_layer["weight"]
    assert every_layer["activation"] == ti["activation"]        # the same settings, every layer 4-bit
    assert bench.qconfig(4, ("conv1",), False) == quant.qconfig_for(4, keep_8bit=("conv1",))


def test_choose_reuses_only_runs_of_the_same_recipe_and_seeds(tmp_path: Path) -> None:
    choose = _load("scripts/choose_offline_data.py")
    recipe = {"aux_repeats": 1, "speed_min": 0.85, "speed_max": 1.15, "reverb_share": 0.0, "tts_share": 0.25,
              "tts_voices": 20}
    runs = [{"seed": s, "pool_keywords": 0.5} for s in choose.SEEDS]
    path = tmp_path / "levers.json"
    path.write_text(json.dumps({"candidates": {"a": {"recipe": recipe, "runs": runs}}}))
    assert choose.earlier_runs(path, "a", recipe) == runs
    assert choose.earlier_runs(path, "a", {**recipe, "tts_voices": 10}) is None
    assert choose.earlier_runs(path, "b", recipe) is None
    assert choose.earlier_runs(tmp_path / "absent.json", "a", recipe) is None
    path.write_text(json.dumps({"candidates": {"a": {"recipe": recipe, "runs": runs[:1]}}}))
    assert choose.earlier_runs(path, "a", recipe) is None
