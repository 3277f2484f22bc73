"""Distillation QAT (kws_utils.quant.distill) and the int2 recipe comparison's core function."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kws_utils import config, holdout, model, tinpu_onnx, training
from kws_utils.errors import InputError
from kws_utils.quant import distill, qconfig, rounding, wrappers
from kws_utils.quant import course

_HAS_TI = importlib.util.find_spec("tinyml_torchmodelopt") is not None
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _teacher() -> model.DSCNN:
    """A random DS-CNN with non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    net = model.DSCNN()
    net.train()
    with torch.no_grad():
        net(torch.randn(64, *config.INPUT_SHAPE))
        net.fc6.weight.mul_(30.0)   # confident logits, so that the student has something to learn
    return net.eval()


def _kl(wrapper: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    """The distillation loss of ``wrapper`` (eval mode) on ``x``."""
    wrapper.eval()
    with torch.no_grad():
        return distill.KDLoss()(wrapper(x), distill.teacher_logits(teacher, x)).item()


def test_kd_loss_is_zero_for_identical_logits_and_adds_cross_entropy() -> None:
    logits = torch.randn(8, 12)
    labels = logits.argmax(1)
    assert distill.KDLoss()(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    mixed = distill.KDLoss(ce_weight=1.0)(logits, logits, labels).item()
    assert mixed == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_kd_loss_cross_entropy_term_can_keep_the_prior_correction() -> None:
    from kws_utils import training
    logits = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    ratio = torch.linspace(-1.0, 1.0, 12)
    adjusted = distill.KDLoss(ce_weight=0.5, ce_loss=training.PriorAdjustedLoss(ratio))(logits, logits, labels)
    assert adjusted.item() == pytest.approx(0.5 * training.PriorAdjustedLoss(ratio)(logits, labels).item(), rel=1e-5)
    assert adjusted.item() != pytest.approx(distill.KDLoss(ce_weight=0.5)(logits, logits, labels).item(), rel=1e-3)


def test_schedule_warms_up_then_follows_cosine_per_epoch() -> None:
    s = distill.Schedule(epochs=4, lr=1.0, warmup_epochs=1.0)
    assert s.lr_at(0, 0, 10) == pytest.approx(0.1)
    assert s.lr_at(0, 9, 10) == pytest.approx(1.0)
    assert s.lr_at(2, 0, 10) == pytest.approx(0.5)


def test_schedule_per_step_decays_inside_an_epoch() -> None:
    per_epoch, per_step = distill.Schedule(epochs=2, lr=1.0), distill.Schedule(epochs=2, lr=1.0, per_step=True)
    assert per_epoch.lr_at(0, 5, 10) == per_epoch.lr_at(0, 0, 10) == pytest.approx(1.0)
    assert per_step.lr_at(0, 0, 10) == pytest.approx(1.0)
    assert per_step.lr_at(0, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert per_step.lr_at(1, 0, 10) == pytest.approx(per_epoch.lr_at(1, 0, 10)) == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["course", pytest.param("ti", marks=pytest.mark.skipif(
    not _HAS_TI, reason="TI's tinyml_torchmodelopt is not installed"))])
def test_distillation_lowers_kl_and_keeps_the_tinpu_form(backend, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KWS_QUANT_BACKEND", backend)
    teacher = _teacher()
    x = torch.randn(64, *config.INPUT_SHAPE)
    wrapper = distill.qat_wrapper(teacher, 2, epochs=4)
    assert course.is_ti(wrapper) == (backend == "ti")
    before = _kl(wrapper, teacher, x)
    history = distill.distill_fit(wrapper, teacher, [x], distill.Schedule(4, 0.05, 32, 0.5, 0),
                                  val=(x, torch.zeros(64, dtype=torch.long)))
    assert len(history.val_acc) == 4
    assert _kl(wrapper, teacher, x) < 0.8 * before
    wrapper.convert()
    path = course.export_integer(wrapper, tmp_path / "int2.onnx")
    npu = tinpu_onnx.load_integer_onnx(path, weight_bits=2)
    weights = [layer.weight for layer in npu.layers if layer.weight is not None]
    assert len(weights) == 10 and all(np.abs(w).max() <= 1 for w in weights)


@pytest.mark.parametrize("backend", ["course", pytest.param("ti", marks=pytest.mark.skipif(
    not _HAS_TI, reason="TI's tinyml_torchmodelopt is not installed"))])
def test_mixed_precision_start_and_distillation_keep_the_8bit_layers(backend, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KWS_QUANT_BACKEND", backend)
    keep = model.EDGE_LAYERS + model.DEPTHWISE_LAYERS
    teacher, x = _teacher(), torch.randn(64, *config.INPUT_SHAPE)
    start = distill.rounded_start(teacher, 2, x, iters=5, keep_8bit=keep)
    wrapper = distill.qat_wrapper(start, 2, epochs=1, keep_8bit=keep)
    distill.distill_fit(wrapper, teacher, [x], distill.Schedule(1, 0.01, 32, 0, 0))
    wrapper.convert()
    npu = tinpu_onnx.load_integer_onnx(course.export_integer(wrapper, tmp_path / "mixed.onnx"))
    bits = {layer.name: layer.weight_bits for layer in npu.layers if layer.weight is not None}
    assert {n for n, b in bits.items() if b == 8} == set(keep)
    assert {b for n, b in bits.items() if n not in keep} == {2}
    assert all(np.abs(layer.weight).max() <= 1 for layer in npu.layers if layer.name in bits and bits[layer.name] == 2)


def test_distillation_refuses_test_inputs() -> None:
    x = torch.randn(4, *config.INPUT_SHAPE) + 123.0
    holdout.register_test_inputs(x, "test_distill fake test set")
    wrapper = distill.qat_wrapper(model.DSCNN().eval(), 2, epochs=1)
    with pytest.raises(InputError, match="test inputs"):
        distill.distill_fit(wrapper, model.DSCNN(), [x], distill.Schedule(1, 0.01))


def test_float_from_wrapper_restores_the_model_it_wrapped() -> None:
    teacher = _teacher()
    wrapper = wrappers.TINPUTinyMLPTQFxModule(teacher, total_epochs=1, qconfig_type=qconfig.qconfig_for(2),
                                              example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    back = distill.float_from_wrapper(wrapper, model.DSCNN())
    for key, value in teacher.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_rounded_start_rounds_to_the_learned_integers() -> None:
    teacher = _teacher()
    calib = torch.randn(64, *config.INPUT_SHAPE)
    start = distill.rounded_start(teacher, 2, calib, iters=5)
    wrapper = wrappers.TINPUTinyMLPTQFxModule(start, total_epochs=1, qconfig_type=qconfig.qconfig_for(2),
                                              example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    course.calibrate(wrapper, calib)
    for name, mod in rounding.weighted_layers(wrapper.module):
        folded = rounding._folded(mod)[0]
        scale = mod.weight_fake_quant.scale.reshape([-1] + [1] * (folded.dim() - 1))
        q = rounding.integer_weight(mod)
        # on the 2-bit grid: the start's float weights are the learned integers times the scale
        assert q.abs().max() <= 1 and (q != 0).any(), name
        torch.testing.assert_close(folded, q.float() * scale, rtol=1e-4, atol=1e-6, msg=name)


def _ci_script(name: str, monkeypatch, tmp_path: Path):
    """A script module of scripts/, imported to write under ``tmp_path`` with the CI profile and the course backend."""
    monkeypatch.setenv("KWS_OUTPUT", str(tmp_path))
    monkeypatch.setenv("KWS_QUANT_BACKEND", "course")
    monkeypatch.setenv("KWS_PROFILE", "ci")   # 100 learned-rounding steps per layer
    sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def test_int2_recipe_runs_end_to_end(monkeypatch, tmp_path) -> None:
    recipes = _ci_script("int2_recipes", monkeypatch, tmp_path)
    torch.manual_seed(1)
    x = [torch.randn(60, *config.INPUT_SHAPE)]
    y = torch.randint(0, 12, (60,))
    feats = training.FeatureSets("synthetic", x, y, torch.randn(20, *config.INPUT_SHAPE),
                                 torch.randint(0, 12, (20,)), torch.randn(20, *config.INPUT_SHAPE),
                                 torch.randint(0, 12, (20,)))
    recipe = recipes.Recipe("tiny", kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0, epochs=3)
    out = recipes.run_recipe(recipe, _teacher(), feats, None, {"validation": feats.val_x}, 2, 0.01, 20)   # 3 epochs win
    assert len(out["val_acc"]) == out["epochs"] == 3 and isinstance(out["converged"], bool)
    flips = out["flips"]   # the gap record: the flips add up to fake-quant minus ONNX accuracy
    assert flips["clips"] == 20 and flips["fake_only_right"] + flips["integer_only_right"] <= flips["differ"]
    assert flips["fake_only_right"] - flips["integer_only_right"] == \
        round(20 * (out["fake_quant_test_accuracy"] - out["onnx_test_accuracy"]))
    assert [g["op"] for g in out["layer_gap"]][-2:] == ["avgpool", "linear"]
    assert out["onnx_identical_to_torch"] and 0 <= out["onnx_test_accuracy"] <= 1
    assert (tmp_path / "int2_recipes" / "onnx" / out["onnx"]).is_file()
    assert recipes.converged([0.5, 0.9, 0.905, 0.899]) and not recipes.converged([0.9, 0.8, 0.9])
    assert 0 <= out["fake_quant_test_accuracy"] <= 1


def test_int2_recipe_calibrates_on_training_clips_and_distils_on_every_clip(monkeypatch, tmp_path) -> None:
    recipes = _ci_script("int2_recipes", monkeypatch, tmp_path)
    torch.manual_seed(4)
    views, y = [torch.randn(40, *config.INPUT_SHAPE) for _ in range(2)], torch.randint(0, 12, (40,))
    every = training.FeatureSets("synthetic", views, y, torch.randn(20, *config.INPUT_SHAPE),
                                 torch.randint(0, 12, (20,)), torch.randn(20, *config.INPUT_SHAPE),
                                 torch.randint(0, 12, (20,)))
    feats = dataclasses.replace(every, train_views=[v[:25] for v in views], train_y=y[:25])   # "filtered"
    calib = recipes.training_calibration(feats, 30)
    pool = torch.cat(feats.train_views)
    assert len(calib) == 30 and all(bool((pool == row).all(dim=(1, 2, 3)).any()) for row in calib)
    recipe = recipes.Recipe("tiny", kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0,
                            start_calib="training", distil_clips="all", per_step=True)
    with pytest.raises(ValueError, match="every_clip"):
        recipes.run_recipe(recipe, _teacher(), feats, None, {"training": calib}, 1, 0.01, 20)
    with pytest.raises(ValueError, match="start_calib"):
        recipes.run_recipe(recipe, _teacher(), feats, None, {"validation": feats.val_x}, 1, 0.01, 20, (), every)
    out = recipes.run_recipe(recipe, _teacher(), feats, None, {"training": calib}, 1, 0.01, 20, (), every)
    assert out["start_calib"] == "training" and out["distil_clips"] == "all" and out["per_step"]
    assert len(out["val_acc"]) == 1 and (tmp_path / "int2_recipes" / "onnx" / out["onnx"]).is_file()


def test_int2_recipe_keeps_the_chosen_layers_8bit(monkeypatch, tmp_path) -> None:
    recipes = _ci_script("int2_recipes", monkeypatch, tmp_path)
    torch.manual_seed(3)
    x, y = torch.randn(40, *config.INPUT_SHAPE), torch.randint(0, 12, (40,))
    feats = training.FeatureSets("synthetic", [x], y, x[:20], y[:20], x[20:], y[20:])
    recipe = recipes.Recipe("tiny", kd_temperature=4.0, rounded_start=True, freeze_bn_epoch=0)
    keep = model.KEEP_8BIT["edges"]
    out = recipes.run_recipe(recipe, _teacher(), feats, None, {"validation": feats.val_x}, 1, 0.01, 20, keep)
    npu = tinpu_onnx.load_integer_onnx(tmp_path / "int2_recipes" / "onnx" / out["onnx"])
    bits = {layer.name: layer.weight_bits for layer in npu.layers if layer.weight is not None}
    assert {name for name, b in bits.items() if b == 8} == set(keep) and set(bits.values()) == {2, 8}
    assert out["onnx"] != recipes.onnx_path("tiny").name   # never overwrites the all-int2 file
    assert recipes.results_path("ci", "synthetic", "edges").name == "ci_synthetic_8bit_edges.json"
    assert recipes.results_path("ci", "synthetic").name == "ci_synthetic.json"


def test_distill_reference_mixed_precision_runs_end_to_end(monkeypatch, tmp_path) -> None:
    script = _ci_script("distill_reference", monkeypatch, tmp_path)
    keep = script.KEEP_8BIT["edges_dw"]
    assert set(keep) == set(model.EDGE_LAYERS + model.DEPTHWISE_LAYERS)
    torch.manual_seed(2)
    x, y = torch.randn(40, *config.INPUT_SHAPE), torch.randint(0, 12, (40,))
    teacher = _teacher()
    ptq, init = script.learned_ptq(teacher, 2, x, keep)
    out = script.distil(teacher, init, 2, [x], (x[:20], y[:20]), (x[20:], y[20:]),
                        distill.Schedule(2, 0.01, 20, 0, 0), 4.0, "tiny", keep)
    assert out["weights_8bit"] == list(keep) and len(out["val_acc"]) == 2 and out["onnx_identical_to_torch"]
    npu = tinpu_onnx.load_integer_onnx(tmp_path / "distill_reference" / out["onnx"])
    assert {layer.name for layer in npu.layers if layer.weight is not None and layer.weight_bits == 8} == set(keep)
    runs = [{"int2_learned_rounding_ptq": {"onnx_real_test_accuracy": p}, "distilled": [{"onnx_real_test_accuracy": d}]}
            for p, d in ((0.6, 0.8), (0.7, 0.75))]
    assert script.summary(runs, [2])["int2"] == pytest.approx(
        {"ptq_mean": 0.65, "ptq_min": 0.6, "distilled_mean": 0.775, "distilled_min": 0.75})


def _fc6_integers_past_a_frozen_scale(backend: str, monkeypatch, tmp_path: Path) -> np.ndarray:
    """fc6's exported integers after its int2 weight scales were frozen and its weights then grew."""
    monkeypatch.setenv("KWS_QUANT_BACKEND", backend)
    wrapper = distill.qat_wrapper(_teacher(), 2, 1)
    wrapper.train()
    x = torch.randn(8, *config.INPUT_SHAPE)
    with torch.no_grad():
        wrapper(x)
        distill.freeze_weight_scales(wrapper)
        fc = wrapper.module.get_submodule("fc6")
        scale = fc.weight_fake_quant.scale.clone()
        fc.weight.mul_(1.5)   # past the last grid point of its frozen scale
        wrapper(x)
    assert torch.equal(fc.weight_fake_quant.scale, scale), "the frozen weight scale moved"
    wrapper.eval()
    wrapper.convert()
    return tinpu_onnx.load_integer_onnx(course.export_integer(wrapper, tmp_path / "frozen.onnx")).layers[-1].weight


def test_frozen_weight_scales_clamp_to_the_ternary_grid_in_the_course_backend(monkeypatch, tmp_path) -> None:
    assert set(np.unique(_fc6_integers_past_a_frozen_scale("course", monkeypatch, tmp_path)).tolist()) <= {-1, 0, 1}


@pytest.mark.skipif(not _HAS_TI, reason="needs TI's tinyml_torchmodelopt")
def test_ti_convert_does_not_clamp_weights_past_a_frozen_scale(monkeypatch, tmp_path) -> None:
    # Notebook 05 explains the frozen-scale recipes' fake-quant / ONNX gap with this behaviour of
    # TI's convert(): weights beyond the last grid point become +-2 in its "int2" integer model.
    assert np.abs(_fc6_integers_past_a_frozen_scale("ti", monkeypatch, tmp_path)).max() == 2


def test_int2_recipes_keep_rows_of_the_same_model_only(tmp_path) -> None:
    sys.path.insert(0, str(SCRIPTS))
    recipes = importlib.import_module("int2_recipes")
    names = [r.name for r in recipes.RECIPES]
    base = {"profile": "ci", "dataset": "synthetic", "seed": 1, "bits": 2, "float_test_accuracy": 0.9,
            "learned_rounding_ptq": {"onnx_test_accuracy": 0.7, "seconds": 3.0}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**base, "recipes": [{"name": names[0]}, {"name": names[1]},
                                                                  {"name": "gone"}]}))
    now = {**base, "learned_rounding_ptq": {"onnx_test_accuracy": 0.7, "seconds": 9.0}}
    assert list(recipes.kept_rows(path, now, {names[1]})) == [names[0]]
    other = {**base, "float_test_accuracy": 0.8}
    assert recipes.kept_rows(path, other, set()) == {}
    assert recipes.kept_rows(tmp_path / "none.json", now, set()) == {}
    path.write_text("{not json")
    assert recipes.kept_rows(path, now, set()) == {}
    path.write_text("[1, 2]")
    assert recipes.kept_rows(path, now, set()) == {}


def test_int2_recipes_mark_rows_from_an_earlier_learned_rounding_start(tmp_path) -> None:
    sys.path.insert(0, str(SCRIPTS))
    recipes = importlib.import_module("int2_recipes")
    plain, rounded = recipes.RECIPES[0], next(r for r in recipes.RECIPES if r.rounded_start)
    base = {"profile": "ci", "dataset": "synthetic", "seed": 1, "bits": 2, "float_test_accuracy": 0.9,
            "learned_rounding_ptq": {"onnx_test_accuracy": 0.7}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**base, "recipes": [{"name": plain.name, "rounded_start": False},
                                                    {"name": rounded.name, "rounded_start": True}]}))
    same = recipes.kept_rows(path, base, set())
    assert not any("earlier_start" in row for row in same.values())
    moved = recipes.kept_rows(path, {**base, "learned_rounding_ptq": {"onnx_test_accuracy": 0.9}}, set())
    assert "earlier_start" not in moved[plain.name]      # its start does not use learned rounding
    assert moved[rounded.name]["earlier_start"] == {"learned_rounding_ptq_onnx_test_accuracy": 0.7}
