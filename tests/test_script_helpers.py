"""Helpers of the results scripts: which settings a benchmark row runs, which earlier runs are reused."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from kws_utils import config, model, quant, synthetic

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
    rows = {key: (bits, learn, keep, settings) for key, bits, learn, keep, settings in bench.variants()}
    ti = quant.ti_example_qconfig(4)
    kept = tuple(ti["weight"]["mixed_precision"][8])
    assert rows["int4_ti_example_nearest"] == (4, False, kept, "ti_example")
    assert bench.qconfig(4, kept, "ti_example") == ti
    every_layer = bench.qconfig(4, (), "ti_example")
    assert "mixed_precision" not in every_layer["weight"]
    assert every_layer["activation"] == ti["activation"]        # the same settings, every layer 4-bit
    assert bench.qconfig(4, ("conv1",)) == quant.qconfig_for(4, keep_8bit=("conv1",))


def test_bench_rows_with_affine_activations_keep_the_course_weights() -> None:
    bench = _load("benchmarks/bench_ptq_real.py")
    rows = {key: (bits, learn, keep, settings) for key, bits, learn, keep, settings in bench.variants()}
    assert rows["int2_affine_act_edges8_learned"] == (2, True, model.EDGE_LAYERS, "affine_act")
    qt = bench.qconfig(2, model.EDGE_LAYERS, "affine_act")
    course = quant.qconfig_for(2, keep_8bit=model.EDGE_LAYERS)
    assert qt["weight"] == course["weight"]
    assert qt["activation"] == {**course["activation"], "power2_scale": False,
                                "qscheme": torch.per_tensor_affine}


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


def test_a_lever_names_only_the_fields_it_sets() -> None:
    choose = _load("scripts/choose_offline_data.py")
    recipe, fields, masks = choose.candidate((1, 0.85, 1.15, 0.5, 0.25, choose.BANK_20))
    assert (recipe.tts_share, recipe.tts_voices, recipe.tts_other_words, masks) == (0.25, 20, 25, 0)
    assert fields == {"aux_repeats": 1, "speed_min": 0.85, "speed_max": 1.15, "reverb_share": 0.5,
                      "tts_share": 0.25, "tts_voices": 20}
    recipe, fields, masks = choose.candidate((1, 0.85, 1.15, 0.5, 0.25,
                                              {"tts_voices": 50, "tts_other_words": 4, "time_masks": 2}))
    assert (recipe.tts_voices, recipe.tts_other_words, masks) == (50, 4, 2)
    assert fields["tts_other_words"] == 4 and fields["time_masks"] == 2
    with pytest.raises(ValueError, match="tts_voices and tts_other_words"):
        choose.candidate((1, 0.85, 1.15, 0.5, 0.25))
    recipe, fields, _ = choose.candidate((1, 0.85, 1.15, 0.5, 0.25,
                                          {"tts_voices": 50, "tts_other_words": 4, "aux_words": 12}))
    assert recipe.aux_words == 12 and fields["aux_words"] == 12


def test_a_candidate_without_levers_is_espeak_only_whatever_the_course_uses() -> None:
    choose = _load("scripts/choose_offline_data.py")
    assert config.SYNTH_TTS_SHARE and config.SYNTH_REVERB_SHARE   # the course's recipe has both levers
    recipe, fields, _ = choose.candidate((2, 1.0, 1.0))
    assert (recipe.reverb_share, recipe.tts_share, recipe.aux_words) == (0.0, 0.0, len(synthetic.AUX_WORDS))
    assert fields == {"aux_repeats": 2, "speed_min": 1.0, "speed_max": 1.0}


def test_a_benchmark_resumes_only_results_measured_alike() -> None:
    timing = _load("benchmarks/timing.py")
    timing.check_resumable({"threads": 2, "scored_on": "x"}, {"threads": 2, "scored_on": "x"}, ("threads", "scored_on"))
    with pytest.raises(SystemExit, match="threads.*KWS_BENCH_THREADS"):
        timing.check_resumable({"threads": 1, "scored_on": "x"}, {"threads": 2, "scored_on": "x"}, ("threads", "scored_on"))


def test_the_int2_qat_rate_is_chosen_on_validation_among_runs_that_finished() -> None:
    choose = _load("scripts/choose_int2_qat_lr.py")
    runs = [{"lr": 0.005, "diverged": "nan"}, {"lr": 0.0025, "val_acc": [0.5, 0.9, 0.7]},
            {"lr": 0.001, "val_acc": [0.4, 0.6, 0.8]}]
    assert choose.chosen(runs)["lr"] == 0.001       # the last epoch counts, not the best one
    assert choose.chosen(runs[:1]) is None
    assert choose.results_path("default", "synthetic").parts[-2:] == ("int2_qat_lr", "default_synthetic.json")
