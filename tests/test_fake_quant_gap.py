"""The fake-quant model computes what the integer model computes (match_integer_model); layer_gap
finds where the two differ."""
from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kws_utils import config, export, model, quant


def _ptq(backend: ModuleType, tiny: SimpleNamespace, npu_pool: bool) -> nn.Module:
    """A calibrated (not converted) int8 PTQ wrapper of ``backend``."""
    wrapper = backend.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1,
                                             qconfig_type=quant.qconfig_for(8),
                                             example_inputs=tiny.calib[:1])
    if npu_pool:
        quant.match_integer_model(wrapper)
    return quant.calibrate(wrapper, tiny.calib)


def test_pool_gain_is_the_integer_pools_mult_and_shift(tiny: SimpleNamespace) -> None:
    wrapper = _ptq(quant, tiny, npu_pool=False)
    pool = next(l for l in wrapper.convert().layers if l.op == "avgpool")
    assert (int(pool.mult[0]), int(pool.shift[0])) == (1, 6)     # 1/125 with a 1-bit multiplier
    assert quant.pool_gain(125, 1) == 125 * 1 * 2.0 ** -6 == 125 / 64
    assert quant.pool_gain(64, 1) == 1.0
    assert quant.pool_gain(125, 8) == 125 * 131 * 2.0 ** -14     # 8-bit: close to the mean


def test_plain_fake_quant_pool_is_where_the_models_part(tiny: SimpleNamespace) -> None:
    wrapper = _ptq(quant, tiny, npu_pool=False)
    rows = quant.layer_gap(wrapper, wrapper.convert(), tiny.x)
    assert [r.op for r in rows][-2:] == ["avgpool", "linear"]
    assert all(r.mean_abs < 0.1 for r in rows[:-2])      # the convolutions agree
    assert rows[-2].mean_abs > 10                        # the pool: 125/64 of the mean, not the mean


def test_npu_pool_makes_fake_quant_predict_the_integer_model(tiny: SimpleNamespace) -> None:
    wrapper = _ptq(quant, tiny, npu_pool=True)
    integer = wrapper.convert()
    rows = quant.layer_gap(wrapper, integer, tiny.x)
    assert all(r.max_abs <= 3 and r.differ < 0.05 for r in rows)   # rounding ties only
    assert rows[-2].differ < 0.01 and rows[-1].differ < 0.01          # the pool and the logits
    with torch.no_grad():
        agree = (wrapper(tiny.x).argmax(1) == integer(tiny.x).argmax(1)).float().mean().item()
    assert agree >= 0.99


def test_npu_pool_changes_only_the_fake_quant_model(tiny: SimpleNamespace) -> None:
    plain, matched = _ptq(quant, tiny, npu_pool=False), _ptq(quant, tiny, npu_pool=True)
    with torch.no_grad():
        assert not torch.equal(plain(tiny.x), matched(tiny.x))
    a, b = plain.convert(), matched.convert()
    pools = [[(l.op, l.mult.tolist(), l.shift.tolist()) for l in m.layers if l.op == "avgpool"] for m in (a, b)]
    assert [l.op for l in a.layers] == [l.op for l in b.layers] and pools[0] == pools[1]
    assert b.layers[-1].output_scale > a.layers[-1].output_scale   # the classifier's range fits


def test_course_helpers_use_the_npu_pool(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_QUANT_BACKEND", "course")   # TI's convert() rebuilds the module, hooks and all
    wrapper = quant.ptq(tiny.net, 8, tiny.calib)
    assert any(isinstance(h, quant.NpuPoolGain) for m in wrapper.modules()
               for h in m._forward_hooks.values())
    assert any(isinstance(h, quant.PassThrough) for m in wrapper.modules()
               for h in m._forward_hooks.values())
    plain = quant.ptq(tiny.net, 8, tiny.calib, match_integer=False)
    assert not any(m._forward_hooks for m in plain.modules())


def test_match_npu_pool_bad_input() -> None:
    with pytest.raises(TypeError, match="prepared fake-quant graph"):
        quant.match_npu_pool(model.DSCNN())
    flat = nn.Sequential(nn.Flatten(), nn.Linear(config.INPUT_SHAPE[1] * config.INPUT_SHAPE[2], 4))
    wrapper = quant.TINPUTinyMLPTQFxModule(flat, total_epochs=1,
                                           example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    with pytest.raises(ValueError, match="no global AdaptiveAvgPool2d"):
        quant.match_npu_pool(wrapper)


def test_both_backends_identical_with_the_npu_pool(tiny: SimpleNamespace, tmp_path: Path) -> None:
    ti = pytest.importorskip("tinyml_torchmodelopt.quantization")
    outputs = {}
    for name, backend in (("course", quant), ("ti", ti)):
        wrapper = _ptq(backend, tiny, npu_pool=True)
        before = copy.deepcopy(wrapper)          # TI's convert() turns the wrapper itself integer
        wrapper.convert()
        path = quant.export_integer(wrapper, tmp_path / f"{name}.onnx")
        outputs[name] = export.onnx_predict(path, tiny.x)
        rows = quant.layer_gap(before, quant.read_integer_onnx(path), tiny.x)
        assert rows[-2].max_abs <= 1
    assert np.array_equal(outputs["course"], outputs["ti"])


def test_prediction_flips_add_up_to_the_accuracy_gap(tiny: SimpleNamespace) -> None:
    torch.manual_seed(1)
    fake = nn.Sequential(nn.Flatten(), nn.Linear(tiny.x[0].numel(), 12)).eval()
    with torch.no_grad():
        fake_logits = fake(tiny.x).numpy()
    y = fake_logits.argmax(1).copy()
    logits = fake_logits.copy()
    other = (y + 1) % 12
    logits[np.arange(10), other[:10]] = logits[:10].max(1) + 0.5       # 10 clips: integer now wrong
    y[10:15] = other[10:15]                                           # 5 clips the fake model gets wrong ...
    logits[np.arange(10, 15), other[10:15]] = logits[10:15].max(1) + 0.5   # ... and the integer one right
    flips = quant.prediction_flips(fake, logits, tiny.x, torch.as_tensor(y))
    assert (flips.clips, flips.differ, flips.fake_only_right, flips.integer_only_right) == (96, 15, 10, 5)
    fake_acc, int_acc = (fake_logits.argmax(1) == y).mean(), (logits.argmax(1) == y).mean()
    assert flips.gap_points == pytest.approx(100 * (fake_acc - int_acc))
    assert flips.margin_flipped == pytest.approx(0.5)


def test_prediction_flips_none_and_bad_shapes(tiny: SimpleNamespace) -> None:
    net = tiny.net.eval()
    with torch.no_grad():
        logits = net(tiny.x).numpy()
    y = torch.as_tensor(logits.argmax(1))
    flips = quant.prediction_flips(net, logits, tiny.x, y)
    assert (flips.differ, flips.gap_points) == (0, 0.0) and np.isnan(flips.margin_flipped)
    assert quant.top2_margin(np.array([[1.0, 3.0, 3.0], [0.0, 5.0, 1.0]])).tolist() == [0.0, 4.0]
    with pytest.raises(ValueError, match="integer_logits has 3 rows"):
        quant.prediction_flips(net, logits[:3], tiny.x, y)


def _ranges(wrapper: nn.Module) -> list[torch.Tensor]:
    """Every quantizer's scale, copied."""
    return [m.scale.clone() for m in wrapper.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)]


@pytest.mark.parametrize("backend_name", ["course", "ti"])
def test_calibration_ends_with_calibrate(tiny: SimpleNamespace, backend_name: str) -> None:
    backend = quant if backend_name == "course" else pytest.importorskip("tinyml_torchmodelopt.quantization")
    wrapper = _ptq(backend, tiny, npu_pool=True)
    before = _ranges(wrapper)
    quant.accuracy(wrapper, tiny.x * 50, torch.zeros(len(tiny.x), dtype=torch.long))   # far wider inputs
    assert all(torch.equal(a, b) for a, b in zip(before, _ranges(wrapper)))


def test_measuring_the_gap_moves_no_range(tiny: SimpleNamespace) -> None:
    wrapper = quant.TINPUTinyMLQATFxModule(copy.deepcopy(tiny.net), total_epochs=4,
                                           qconfig_type=quant.qconfig_for(8), example_inputs=tiny.calib[:1])
    wrapper.train()
    with torch.no_grad():
        wrapper(tiny.calib)   # QAT observers stay on: the measurements must not use them
    wrapper.eval()
    integer = copy.deepcopy(wrapper).convert()
    before = _ranges(wrapper)
    quant.layer_gap(wrapper, integer, tiny.x * 50)
    with torch.no_grad():
        logits = integer(tiny.x * 50).numpy()
    quant.prediction_flips(wrapper, logits, tiny.x * 50, torch.zeros(len(tiny.x), dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(before, _ranges(wrapper)))
