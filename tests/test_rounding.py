"""Tests of kws_utils.quant.learn_rounding: learned rounding (AdaRound) for PTQ wrappers."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kws_utils import config, deploy, export, model, quant, real_audio
from kws_utils.mlperf import CHECKPOINT
from kws_utils.quant import rounding

ITERS = 40   # enough to move the rounding; the method, not the accuracy, is tested here
REAL_ITERS = 200   # fewer than the default 500: the real-speech tests stay short
# Measured on pool subset 0 (+ its augmented copies) with 200 steps: int2 nearest 8.4 %, learned
# 58.2 % (the method before 2026-12-01, gentle regulariser and no copies: 20.6 %; issue 18's goal,
# 75 %, is not reached yet); the floor fails if learned rounding falls back towards the old method.
# int4: learned rounding must beat round-to-nearest and stay within 1.5 points of float. Over five
# calibration subsets benchmarks/bench_ptq_real.py measured it 0.35-1.18 points below float at the
# default steps, so a 1-point bound sat inside the spread (one clip failed it after a thread change).
INT2_FLOOR, INT4_LOSS = 0.45, 0.015


def _net() -> model.DSCNN:
    """A seeded DS-CNN whose BatchNorm statistics and affine parameters are not the identity."""
    torch.manual_seed(0)
    net = model.DSCNN().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(64, *config.INPUT_SHAPE) * 8)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                sign = torch.where(torch.rand_like(m.weight) < 0.3, -1.0, 1.0)
                m.weight.copy_(sign * torch.empty_like(m.weight).uniform_(0.5, 1.5))  # gamma < 0 too
                m.bias.normal_(0, 0.2)
    return net.eval()


def _inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    """Random inputs on the scale of the course's MFCC features."""
    return torch.randn(n, *config.INPUT_SHAPE, generator=torch.Generator().manual_seed(seed)) * 8


def _calibrated(bits: int, qat: bool = False) -> quant.TINPUTinyMLQuantFxModule:
    """A course wrapper calibrated on the test inputs."""
    cls = quant.TINPUTinyMLQATFxModule if qat else quant.TINPUTinyMLPTQFxModule
    wrapper = cls(_net(), total_epochs=1, qconfig_type=quant.qconfig_for(bits))
    quant.calibrate(wrapper, _inputs())
    return wrapper


@functools.lru_cache(maxsize=None)
def _learned(bits: int) -> tuple[quant.TINPUTinyMLPTQFxModule, list, dict]:
    """A 2/4/8-bit wrapper after learned rounding, its report and the integers it learned."""
    wrapper = _calibrated(bits)
    report = quant.learn_rounding(wrapper, _inputs(), iters=ITERS, progress=False)
    learned = {n: rounding.integer_weight(m) for n, m in rounding.weighted_layers(wrapper.module)}
    return wrapper, report, learned


@pytest.mark.parametrize("bits", (8, 4, 2))
def test_convert_reproduces_the_learned_integers(bits: int) -> None:
    wrapper, report, learned = _learned(bits)
    assert [r.name for r in report] == list(learned)
    int_model = wrapper.convert()
    for layer in (l for l in int_model.layers if l.weight is not None):
        np.testing.assert_array_equal(layer.weight, learned[layer.name].numpy().astype(np.int8))
        assert np.abs(layer.weight).max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", (4, 2))
def test_learned_rounding_differs_from_nearest_and_lowers_the_error(bits: int) -> None:
    _, report, _ = _learned(bits)
    assert any(r.flipped > 0 for r in report)
    assert all(r.learned_error <= r.nearest_error for r in report)
    assert sum(r.learned_error for r in report) < sum(r.nearest_error for r in report)


@pytest.mark.parametrize("iters", (3, ITERS))   # 3 steps: some blocks keep round-to-nearest
def test_report_errors_are_those_of_the_final_network(iters: int) -> None:
    # learn_rounding reuses one forward pass for a block's result and the next block's input;
    # each reported error must still be that of the rounded network (the bias stage comes after).
    wrapper = _calibrated(2)
    reference = rounding.float_copy(wrapper.module)
    report = quant.learn_rounding(wrapper, _inputs(), iters=iters, progress=False, bias_steps=0)
    final = quant.layer_errors(wrapper, _inputs(), reference)
    blocks = rounding._blocks(wrapper.module)
    for block in blocks:
        last = block[-1][0]
        for name, _ in block:
            got = next(r for r in report if r.name == name)
            assert got.learned_error == pytest.approx(final[last], rel=1e-5), name


def test_a_block_that_gets_worse_keeps_nearest_and_the_next_block_starts_from_it(monkeypatch) -> None:
    original, calls = rounding._learn_block, []

    def spoiled(*args, **kwargs):   # the second block learns a ruinous bias
        calls.append(1)
        out = original(*args, **kwargs)
        return [(q, s, b + 100.0) for q, s, b in out] if len(calls) == 2 else out

    monkeypatch.setattr(rounding, "_learn_block", spoiled)
    wrapper, fresh = _calibrated(2), _calibrated(2)
    reference = rounding.float_copy(wrapper.module)
    report = {r.name: r for r in quant.learn_rounding(wrapper, _inputs(), iters=ITERS, progress=False,
                                                      bias_steps=0)}   # the report precedes that stage
    blocks = rounding._blocks(wrapper.module)
    for name, _ in blocks[1]:
        assert report[name].flipped == 0 and report[name].learned_error == report[name].nearest_error
    # The next block's starting error, rebuilt: learned first block, round-to-nearest second one.
    fresh.module.apply(torch.ao.quantization.disable_observer)
    for name, _ in blocks[0] + blocks[1]:
        fresh.module.get_submodule(name).load_state_dict(wrapper.module.get_submodule(name).state_dict())
    start = quant.layer_errors(fresh, _inputs(), reference)[blocks[2][-1][0]]
    assert report[blocks[2][0][0]].nearest_error == pytest.approx(start, rel=1e-5)


def test_int8_keeps_power_of_two_scales() -> None:
    wrapper, _, _ = _learned(8)
    for _, mod in rounding.weighted_layers(wrapper.module):
        mantissa, _ = torch.frexp(mod.weight_fake_quant.scale)
        assert (mantissa == 0.5).all()


def test_onnx_and_numpy_reference_are_bit_exact(tmp_path) -> None:
    wrapper, _, _ = _learned(2)
    int_model = wrapper.integer_model or wrapper.convert()
    x = _inputs(32, seed=5)
    path = wrapper.export(x[:1], tmp_path / "lr_int2.onnx", input_names=["input"])
    onnx_out = export.onnx_predict(path, x)
    np.testing.assert_array_equal(onnx_out, int_model(x).numpy())
    np.testing.assert_array_equal(onnx_out, deploy.numpy_reference(path, x.numpy()))


def test_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        wrapper = _calibrated(2)
        quant.learn_rounding(wrapper, _inputs(), iters=15, progress=False, seed=seed)
        return [m.weight.detach().clone() for _, m in rounding.weighted_layers(wrapper.module)]
    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_layer_errors_against_the_float_reference() -> None:
    wrapper = _calibrated(2)
    reference = rounding.float_copy(wrapper.module)
    before = quant.layer_errors(wrapper, _inputs(), reference)
    quant.learn_rounding(wrapper, _inputs(), iters=ITERS, progress=False)
    after = quant.layer_errors(wrapper, _inputs(), reference)
    assert list(before) == list(after) and all(v >= 0 for v in before.values())
    assert after["fc6"] < before["fc6"]


def test_before_calibration_raises() -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(_net(), total_epochs=1, qconfig_type=quant.qconfig_for(2))
    with pytest.raises(RuntimeError, match="before calibration"):
        quant.learn_rounding(wrapper, _inputs(), iters=1, progress=False)


def test_after_convert_raises() -> None:
    wrapper = _calibrated(4)
    wrapper.convert()
    with pytest.raises(RuntimeError, match="after convert"):
        quant.learn_rounding(wrapper, _inputs(), iters=1, progress=False)


def test_qat_wrapper_raises() -> None:
    with pytest.raises(ValueError, match="QAT"):
        quant.learn_rounding(_calibrated(4, qat=True), _inputs(), iters=1, progress=False)


@pytest.mark.parametrize("bad, what", [(torch.zeros(0, 1, 49, 10), "inputs"),
                                       (torch.zeros(4, 1, 49, 10, dtype=torch.long), "inputs"),
                                       (torch.full((4, 1, 49, 10), float("nan")), "NaN")])
def test_bad_inputs_raise(bad: torch.Tensor, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        quant.learn_rounding(_calibrated(4), bad, iters=1, progress=False)


def test_not_a_wrapper_raises() -> None:
    with pytest.raises(TypeError, match="wrapper"):
        quant.learn_rounding(_net(), _inputs(), iters=1, progress=False)


def test_ti_wrapper_gets_the_learned_integers() -> None:
    ti = pytest.importorskip("tinyml_torchmodelopt.quantization")
    wrapper = ti.TINPUTinyMLPTQFxModule(_net(), total_epochs=1, qconfig_type=quant.qconfig_for(4),
                                        example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    quant.calibrate(wrapper, _inputs())
    report = quant.learn_rounding(wrapper, _inputs(), iters=ITERS, progress=False)
    assert any(r.flipped > 0 for r in report)
    learned = {n: rounding.integer_weight(m) for n, m in rounding.weighted_layers(wrapper.module)}
    with torch.no_grad():   # the fake-quant forward uses exactly the learned integers
        for name, mod in rounding.weighted_layers(wrapper.module):
            fq = mod.weight_fake_quant
            scale = fq.scale.reshape([-1] + [1] * (mod.weight.dim() - 1))
            folded, _ = rounding._folded(mod)
            torch.testing.assert_close(fq(folded), learned[name] * scale, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Real speech: reference DS-CNN calibrated on real non-test clips of the calibration pool, scored
# through the integer ONNX on the official test set (4,890 clips); benchmarks/bench_ptq_real.py
# runs the full protocol (5 subsets, default steps).
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _real() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(one seeded 200-clip subset of the pool with its augmented copies, test inputs, labels), or None."""
    test = real_audio.test_set(download=False)
    calib = real_audio.calibration_subsets(1, 200, copies=config.CALIB_COPIES) \
        if test is not None and real_audio.noise_dir() is not None else []
    if test is None or not calib or not (config.mlperf_dir() / CHECKPOINT).is_file():
        return None
    return calib[0], *test


def _onnx_accuracy(bits: int, iters: int, tmp_path) -> float:
    """Integer-ONNX test accuracy of the reference weights after PTQ (learned rounding if iters)."""
    calib, x, y = _real()
    wrapper = quant.TINPUTinyMLPTQFxModule(model.reference_model(), total_epochs=1,
                                           qconfig_type=quant.qconfig_for(bits))
    quant.calibrate(wrapper, calib)
    if iters:
        quant.learn_rounding(wrapper, calib, iters=iters, progress=False)
    int_model = wrapper.convert()
    path = quant.export_integer(wrapper, tmp_path / f"int{bits}_{iters}.onnx")
    acc, identical = quant.onnx_check(int_model, path, x, y)
    assert identical
    return acc


needs_real = pytest.mark.skipif(_real() is None, reason="official test set, real calibration pool "
                                "or MLPerf checkpoint absent")


@needs_real
def test_real_speech_int2_learned_rounding_beats_nearest(tmp_path) -> None:
    nearest, learned = _onnx_accuracy(2, 0, tmp_path), _onnx_accuracy(2, REAL_ITERS, tmp_path)
    print(f"\nint2 integer ONNX on the official test set: nearest {nearest:.2%}, learned {learned:.2%}")
    assert nearest < 0.3 and learned > INT2_FLOOR


@needs_real
def test_real_speech_int4_learned_rounding_near_float(tmp_path) -> None:
    _, x, y = _real()
    with torch.no_grad():
        float_acc = quant.accuracy(model.reference_model(), x, y)
    nearest, learned = _onnx_accuracy(4, 0, tmp_path), _onnx_accuracy(4, REAL_ITERS, tmp_path)
    print(f"\nint4 integer ONNX on the official test set: nearest {nearest:.2%}, learned {learned:.2%}, "
          f"float {float_acc:.2%}")
    assert learned > nearest and learned >= float_acc - INT4_LOSS
