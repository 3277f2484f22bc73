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
