"""match_requantization: the fake-quant model computes the NPU's integer bias and 8-bit multipliers."""
from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import disable_observer

from kws_utils import model, quant


def _backends() -> list[tuple[str, ModuleType]]:
    """The course's wrappers, and TI's where the package is installed."""
    found = [("course", quant)]
    if quant.ti_installed():
        import tinyml_torchmodelopt.quantization as ti
        found.append(("ti", ti))
    return found


def _fake_and_integer(backend: ModuleType, tiny: SimpleNamespace, bits: int, exact: bool,
                      tmp_path: Path) -> tuple[nn.Module, quant.IntegerModel]:
    """A calibrated PTQ wrapper (fake-quant copy) and its integer model read back from ONNX."""
    wrapper = backend.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1,
                                             qconfig_type=quant.qconfig_for(bits),
                                             example_inputs=tiny.calib[:1])
    quant.match_integer_model(wrapper)
    if exact:
        quant.match_requantization(wrapper)
    quant.calibrate(wrapper, tiny.calib)
    fake = copy.deepcopy(wrapper).eval()
    fake.apply(disable_observer)   # scoring must not move the ranges the integer model was given
    quant.plain_layers(wrapper)
    wrapper.convert()
    path = quant.export_integer(wrapper, tmp_path / f"{backend.__name__}_{bits}_{exact}.onnx")
    return fake, quant.read_integer_onnx(path)


@pytest.mark.parametrize("bits", [4, 2])
def test_match_requantization_makes_fake_quant_the_integer_model(tiny: SimpleNamespace, bits: int,
                                                                 tmp_path: Path) -> None:
    for name, backend in _backends():
        plain = quant.layer_gap(*_fake_and_integer(backend, tiny, bits, False, tmp_path), tiny.x)
        exact = quant.layer_gap(*_fake_and_integer(backend, tiny, bits, True, tmp_path), tiny.x)
        convs = [i for i, r in enumerate(exact) if r.op == "conv"]
        # without it the layers part from the first one on; with it the convolutions agree exactly
        assert max(plain[i].differ for i in convs) > 0.01, name
        assert all(exact[i].differ == 0 for i in convs), (name, [exact[i].differ for i in convs])
        assert all(r.max_abs <= 1 and r.differ < 0.05 for r in exact), name   # pool and logits: ties


def test_match_requantization_changes_only_the_fake_quant_model(tiny: SimpleNamespace, tmp_path: Path) -> None:
    plain_fake, plain = _fake_and_integer(quant, tiny, 2, False, tmp_path)
    exact_fake, exact = _fake_and_integer(quant, tiny, 2, True, tmp_path)
    for a, b in zip(plain.layers, exact.layers):
        for field in ("weight", "bias", "offset", "mult", "shift"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (a.name, field)
    with torch.no_grad():
        assert not torch.equal(plain_fake(tiny.x), exact_fake(tiny.x))


def test_bias_still_learns_through_the_integer_bias(tiny: SimpleNamespace) -> None:
    wrapper = quant.TINPUTinyMLQATFxModule(copy.deepcopy(tiny.net), total_epochs=2,
                                           qconfig_type=quant.qconfig_for(2),
                                           example_inputs=tiny.calib[:1])
    quant.match_requantization(wrapper)
    wrapper.train()
    wrapper.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    wrapper(tiny.calib).sum().backward()
    biases = [m.bn.bias for m in wrapper.modules() if hasattr(m, "bn") and hasattr(m, "weight_fake_quant")]
    assert biases and all(b.grad is not None and b.grad.abs().sum() > 0 for b in biases)


def test_match_requantization_bad_input(tiny: SimpleNamespace) -> None:
    with pytest.raises(TypeError, match="prepared fake-quant graph"):
        quant.match_requantization(model.DSCNN())
    affine = quant.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1,
                                          qconfig_type=quant.with_affine_activations(quant.qconfig_for(2)),
                                          example_inputs=tiny.calib[:1])
    with pytest.raises(ValueError, match="power_2_scale|power2_scale"):
        quant.match_requantization(affine)


def test_layers_keep_their_class(tiny: SimpleNamespace) -> None:
    # torch.ao's freeze_bn_stats and convert() match layer types exactly: a subclass would escape both
    wrapper = quant.TINPUTinyMLQATFxModule(copy.deepcopy(tiny.net), total_epochs=2,
                                           qconfig_type=quant.qconfig_for(2), example_inputs=tiny.calib[:1])
    types_before = [type(m) for m in wrapper.modules()]
    quant.match_requantization(wrapper)
    assert [type(m) for m in wrapper.modules()] == types_before
    wrapper.train()
    wrapper.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    assert not any(m.bn.training for m in wrapper.modules() if hasattr(m, "bn"))
    quant.plain_layers(wrapper)
    assert not any("forward" in m.__dict__ or "_forward" in m.__dict__ for m in wrapper.modules())


def _ptq_int2(tiny: SimpleNamespace, backend: ModuleType = quant, qconfig_type: dict | None = None) -> nn.Module:
    """A calibrated int2 PTQ wrapper of the tiny DS-CNN (not converted)."""
    wrapper = backend.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1,
                                             qconfig_type=qconfig_type or quant.qconfig_for(2),
                                             example_inputs=tiny.calib[:1])
    quant.match_integer_model(wrapper)
    return quant.calibrate(wrapper, tiny.calib)


def _teacher(tiny: SimpleNamespace) -> torch.Tensor:
    """The float model's logits on the calibration inputs."""
    with torch.no_grad():
        return tiny.net.eval()(tiny.calib)


@pytest.mark.parametrize("backend", [b for _, b in _backends()], ids=[n for n, _ in _backends()])
def test_tune_biases_lowers_the_kl_and_moves_only_biases(tiny: SimpleNamespace, backend: ModuleType) -> None:
    wrapper = _ptq_int2(tiny, backend)
    before_state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    ints = [quant.rounding.integer_weight(m) for _, m in quant.rounding.weighted_layers(wrapper.module)]
    flags = [p.requires_grad for p in wrapper.parameters()]
    kl_before, kl_after = quant.tune_biases(wrapper, tiny.calib, _teacher(tiny), steps=60)
    assert kl_after < kl_before
    with torch.no_grad():   # the figure it returns is the KL of the wrapper it leaves
        assert quant.match_requantization(wrapper) is wrapper
        got = float(quant.requant._kl(wrapper(tiny.calib), _teacher(tiny)))
        quant.plain_layers(wrapper)
    assert got == pytest.approx(kl_after, rel=1e-5)
    moved = {k for k, v in wrapper.state_dict().items() if not torch.equal(v, before_state[k])}
    assert moved and all(k.endswith("bias") for k in moved), moved
    assert all(torch.equal(quant.rounding.integer_weight(m), q)
               for (_, m), q in zip(quant.rounding.weighted_layers(wrapper.module), ints))
    assert not any(quant.requant._KEY in m.__dict__ for m in wrapper.modules())   # undone
    assert [p.requires_grad for p in wrapper.parameters()] == flags


def test_tune_biases_keeps_what_it_cannot_improve(tiny: SimpleNamespace) -> None:
    wrapper = _ptq_int2(tiny)
    state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    kl_before, kl_after = quant.tune_biases(wrapper, tiny.calib, _teacher(tiny), steps=5, lr=1e3)
    assert kl_after == kl_before
    assert all(torch.equal(v, state[k]) for k, v in wrapper.state_dict().items())


def test_tune_biases_keeps_the_callers_matching(tiny: SimpleNamespace) -> None:
    wrapper = quant.match_requantization(_ptq_int2(tiny))
    quant.tune_biases(wrapper, tiny.calib, _teacher(tiny), steps=5)
    assert any(quant.requant._KEY in m.__dict__ for m in wrapper.modules())


def test_tune_biases_skips_and_refuses(tiny: SimpleNamespace) -> None:
    affine = _ptq_int2(tiny, qconfig_type=quant.with_affine_activations(quant.qconfig_for(2)))
    state = {k: v.clone() for k, v in affine.state_dict().items()}
    assert quant.tune_biases(affine, tiny.calib, _teacher(tiny), steps=20) is None   # no exact integer model
    assert all(torch.equal(v, state[k]) for k, v in affine.state_dict().items())
    fresh = quant.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1,
                                         qconfig_type=quant.qconfig_for(2), example_inputs=tiny.calib[:1])
    with pytest.raises(RuntimeError, match="calibrat"):
        quant.tune_biases(fresh, tiny.calib, _teacher(tiny), steps=1)
    wrapper = _ptq_int2(tiny)
    with pytest.raises(ValueError, match="steps"):
        quant.tune_biases(wrapper, tiny.calib, _teacher(tiny), steps=-1)
    with pytest.raises(ValueError, match="teacher_logits"):
        quant.tune_biases(wrapper, tiny.calib, _teacher(tiny)[:3], steps=1)
    with pytest.raises(ValueError, match="bias_steps"):
        quant.learn_rounding(wrapper, tiny.calib, iters=2, bias_steps=-1, progress=False)


def test_learn_rounding_ends_with_bias_tuning(tiny: SimpleNamespace) -> None:
    runs = {}
    for steps in (0, 40):
        wrapper = _ptq_int2(tiny)
        quant.learn_rounding(wrapper, tiny.calib, iters=20, bias_steps=steps, progress=False)
        runs[steps] = wrapper
    pairs = list(zip(quant.rounding.weighted_layers(runs[0].module), quant.rounding.weighted_layers(runs[40].module)))
    # the same integers (the block stage is seeded), other biases, and a lower KL to the float logits
    assert all(torch.equal(quant.rounding.integer_weight(a), quant.rounding.integer_weight(b)) for (_, a), (_, b) in pairs)
    assert any(not torch.equal(a.bn.bias, b.bn.bias) for (_, a), (_, b) in pairs if hasattr(a, "bn"))
    kls = {}
    for steps, wrapper in runs.items():
        with torch.no_grad():
            quant.match_requantization(wrapper)
            kls[steps] = float(quant.requant._kl(wrapper(tiny.calib), _teacher(tiny)))
    assert kls[40] < kls[0]
