"""Tests of kws_utils.quant: TI-style QAT/PTQ wrappers and the TI NPU integer model."""
from __future__ import annotations

import copy
import functools
import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from kws_utils import config, data, export, model, quant, real_audio

BITS = (8, 4, 2)
_HAS_TI = importlib.util.find_spec("tinyml_torchmodelopt") is not None
EXAMPLE = torch.zeros(1, *config.INPUT_SHAPE)


@pytest.fixture(params=["course", pytest.param("ti", marks=pytest.mark.skipif(
    not _HAS_TI, reason="TI's tinyml_torchmodelopt is not installed"))])
def backend(request):
    """The wrapper module under test: kws_utils.quant, and TI's package when installed."""
    return quant if request.param == "course" else importlib.import_module(
        "tinyml_torchmodelopt.quantization")


def _random_dscnn() -> model.DSCNN:
    """A seeded DS-CNN whose BatchNorm statistics are not the identity."""
    torch.manual_seed(0)
    net = model.DSCNN().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(64, *config.INPUT_SHAPE) * 8)
    return net.eval()


@functools.lru_cache(maxsize=None)
def _converted(bits: int) -> tuple[quant.TINPUTinyMLPTQFxModule, quant.IntegerModel, torch.Tensor]:
    """PTQ wrapper calibrated on random inputs, its integer model, and held-out inputs."""
    torch.manual_seed(1)
    x = torch.randn(384, *config.INPUT_SHAPE) * 8
    # the course's options: Dropout/Flatten share scales and the pool divides by its true area,
    # so the integer model follows the fake-quant model (TI's choices depart from it, see below)
    wrapper = quant.TINPUTinyMLPTQFxModule(_random_dscnn(), total_epochs=1,
                                           qconfig_type=quant.qconfig_for(bits),
                                           share_dropout_observer=True, exact_pool=True)
    wrapper.eval()
    with torch.no_grad():
        wrapper(x[:128])
        wrapper(x[128:256])
    return wrapper, wrapper.convert(output="float"), x[256:]


def _is_power2(values: np.ndarray) -> bool:
    """True when every value is an exact power of two."""
    mantissa, _ = np.frexp(np.asarray(values, dtype=np.float64))
    return bool(np.all(mantissa == 0.5))


@pytest.mark.parametrize("bits", BITS)
def test_integer_model_tracks_fake_quant_model(bits: int) -> None:
    wrapper, int_model, x = _converted(bits)
    with torch.no_grad():
        fake, integer = wrapper(x), int_model(x)
    lsb = int_model.output_scale
    assert (fake - integer).abs().max().item() <= 3 * lsb
    assert (fake.argmax(1) == integer.argmax(1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("bits", BITS)
def test_integer_weights_fit_the_bitwidth(bits: int) -> None:
    _, int_model, _ = _converted(bits)
    limit = 2 ** (bits - 1) - 1   # symmetric: int8 [-127, 127], int4 [-7, 7], int2 [-1, 1]
    weighted = [l for l in int_model.layers if l.weight is not None]
    assert len(weighted) == 10
    for layer in weighted:
        assert layer.weight.dtype == np.int8 and layer.bias.dtype == np.int32
        assert np.abs(layer.weight).max() <= limit
        assert layer.weight_bits == bits
    if bits == 2:
        assert set(np.unique(np.concatenate([l.weight.ravel() for l in weighted]))) <= {-1, 0, 1}


def test_int8_scales_are_powers_of_two() -> None:
    _, int_model, _ = _converted(8)
    assert _is_power2([int_model.input_scale])
    for layer in int_model.layers:
        assert _is_power2([layer.output_scale])
        if layer.weight is not None:
            assert _is_power2(layer.weight_scale)
            assert np.all(layer.mult == 1)   # power-of-2 everywhere: requantization is a shift


@pytest.mark.parametrize("bits", BITS)
def test_requantization_constants_in_hardware_range(bits: int) -> None:
    _, int_model, _ = _converted(bits)
    for layer in int_model.layers:
        assert np.all((layer.mult >= 1) & (layer.mult < 2 ** quant.MULT_BITS))
        assert np.all((layer.shift >= 0) & (layer.shift <= 31))
        assert layer.offset.dtype == np.int32


def test_batchnorm_and_relu_are_folded() -> None:
    _, int_model, _ = _converted(8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int_model.modules())
    assert [l.op for l in int_model.layers] == ["conv"] * 9 + ["avgpool", "linear"]
    assert all(l.qmin == 0 and l.qmax == 255 for l in int_model.layers[:-1])  # ReLU in the clamp
    assert (int_model.layers[-1].qmin, int_model.layers[-1].qmax) == (-128, 127)


def test_int8_output_mode_gives_int8_logits() -> None:
    _, int_model, x = _converted(8)
    float_out = int_model(x)
    int_model.output = "int8"
    try:
        codes = int_model(x)
    finally:
        int_model.output = "float"
    assert codes.dtype == torch.int8
    assert torch.equal(codes.float() * int_model.output_scale, float_out)


def test_requant_params_approximate_the_real_multiplier() -> None:
    offset, mult, shift = quant.requant_params(np.array([2.0 ** -7, 0.0123, 1 / 125]))
    assert mult[0] == 128 and shift[0] == 14   # 8 bits: the largest shift that keeps mult < 256
    assert offset[0] == 64                     # half an output step: 2**13 / 128
    approx = mult * 2.0 ** -shift.astype(np.float64)
    assert np.allclose(approx, [2.0 ** -7, 0.0123, 1 / 125], rtol=1 / 128)
    _, mult, shift = quant.requant_params(np.array([2.0 ** -7, 1 / 125]), mult_bits=1)
    assert mult.tolist() == [1, 1] and shift.tolist() == [7, 6]   # 1 bit: 1/125 becomes 1/64
    with pytest.raises(ValueError, match="out of range"):
        quant.requant_params(np.array([1000.0]))


def test_pool_divisor_is_tis_unless_exact_pool() -> None:
    net = _random_dscnn()
    x = torch.randn(64, *config.INPUT_SHAPE) * 8
    pools = {}
    for exact in (False, True):
        wrapper = quant.TINPUTinyMLPTQFxModule(net, total_epochs=1, exact_pool=exact)
        quant.calibrate(wrapper, x)
        pools[exact] = wrapper.convert().layers[9]
    # 125 positions: TI's 1-bit multiplier divides by 64, the course's option by ~125
    assert (pools[False].mult[0], pools[False].shift[0]) == (1, 6)
    assert abs(pools[True].mult[0] * 2.0 ** -pools[True].shift[0] - 1 / 125) < 1e-4


def test_qconfig_helpers() -> None:
    assert quant.normalize_qconfig_type(None) == quant.normalize_qconfig_type(quant.qconfig_for(8))
    assert quant.qconfig_for(4)["weight"]["power2_scale"] is False
    assert quant.normalize_qconfig_type(quant.qconfig_for(2))["weight"]["quant_min"] == -1


@pytest.mark.parametrize("change, message", [
    ({"weight": {"bitwidth": 3}}, "weight bitwidth"),
    ({"activation": {"bitwidth": 4}}, "activation bitwidth"),
    ({"weight": {"bitwidth": 8, "power2_scale": False}}, "power2_scale=True"),
    ({"weight": {"qscheme": torch.per_tensor_affine}}, "weight qscheme"),
    ({"activation": {"qscheme": torch.per_channel_symmetric}}, "activation qscheme"),
    ({"weight": {"soft_quant": "wobbly"}}, "soft_quant"),
    ({"weight": {"mixed_precision": ["conv1"]}}, "mixed_precision"),
    ({"weight": {"bitwidth": 4, "quant_min": -9}}, "does not fit"),
    ({"weight": {"colour": 1}}, "unknown keys"),
])
def test_unsupported_settings_raise(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=1, qconfig_type=change)


@pytest.mark.parametrize("change", [{"weight": {"bitwidth": 4, "mixed_precision": {4: ["conv1"]}}},
                                    {"auto_quantization": True},
                                    {"activation": {"observer": "entropy"}}])
def test_ti_features_not_implemented_say_so(change: dict) -> None:
    with pytest.raises(NotImplementedError, match="KWS_QUANT_BACKEND=ti|supports 8 only"):
        quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=1, qconfig_type=change)


def test_ti_example_settings_are_accepted_and_mixed_layers_keep_8_bits() -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(_random_dscnn(), total_epochs=1,
                                           qconfig_type=quant.ti_example_qconfig(4))
    x = torch.randn(64, *config.INPUT_SHAPE) * 8
    wrapper.train()
    with torch.no_grad():
        wrapper(x)
    wrapper.eval()
    bits = {l.name: l.weight_bits for l in wrapper.convert().layers if l.weight is not None}
    assert {n for n, b in bits.items() if b == 8} == {"depthwise2", "pointwise2", "depthwise3",
                                                     "pointwise3"}
    assert {b for n, b in bits.items() if n not in ("depthwise2", "pointwise2", "depthwise3",
                                                    "pointwise3")} == {4}


def test_affine_activations_change_only_the_activation_scheme_and_give_zero_points() -> None:
    course = quant.qconfig_for(2, keep_8bit=model.EDGE_LAYERS)
    qt = quant.with_affine_activations(course)
    assert course["activation"]["power2_scale"] and course["activation"]["qscheme"] == torch.per_tensor_symmetric
    assert qt["weight"] == course["weight"]
    assert qt["activation"] == {**course["activation"], "power2_scale": False, "qscheme": torch.per_tensor_affine}



def test_ptq_learned_with_affine_activations_exports_another_integer_model(tmp_path) -> None:
    x = torch.randn(32, *config.INPUT_SHAPE) * 8
    net = _random_dscnn()
    logits = {}
    for affine in (False, True):
        wrapper = quant.ptq_learned(copy.deepcopy(net), 2, x, iters=2, progress=False,
                                    keep_8bit=model.EDGE_LAYERS, affine_activations=affine)
        path = quant.export_integer(wrapper, tmp_path / f"affine_{affine}.onnx")
        logits[affine] = export.onnx_predict(path, x[:16])
        assert np.isfinite(logits[affine]).all()
    assert not np.array_equal(logits[False], logits[True])    # the setting reaches the integer model


@pytest.mark.parametrize("bits", [4, 2])
def test_keep_8bit_edges_learned_rounding_keeps_their_width(bits: int, tmp_path) -> None:
    qt = quant.qconfig_for(bits, keep_8bit=model.EDGE_LAYERS)
    assert qt["weight"]["mixed_precision"] == {8: list(model.EDGE_LAYERS)}
    x = torch.randn(64, *config.INPUT_SHAPE) * 8
    wrapper = quant.calibrate(quant.TINPUTinyMLPTQFxModule(_random_dscnn(), total_epochs=1, qconfig_type=qt), x)
    quant.learn_rounding(wrapper, x, iters=5, progress=False)
    layers = [l for l in wrapper.convert().layers if l.weight is not None]
    assert {l.name for l in layers if l.weight_bits == 8} == set(model.EDGE_LAYERS)
    assert {l.weight_bits for l in layers if l.name not in model.EDGE_LAYERS} == {bits}
    limit = 2 ** (bits - 1) - 1
    assert all(np.abs(l.weight).max() <= limit for l in layers if l.name not in model.EDGE_LAYERS)
    full = quant.packed_weight_bytes(quant.export_integer(wrapper, tmp_path / "edges.onnx"))
    assert full > sum(l.weight.size for l in layers) * bits // 8   # the edge layers cost 8 bits each


def test_keep_8bit_is_checked_and_ignored_at_8_bits() -> None:
    assert "mixed_precision" not in quant.qconfig_for(8, keep_8bit=model.EDGE_LAYERS)["weight"]
    for bad in ("conv1", 5, ("conv1", 2)):
        with pytest.raises(TypeError, match="keep_8bit"):
            quant.qconfig_for(2, keep_8bit=bad)


def test_mixed_precision_names_unknown_layer() -> None:
    qt = {"weight": {"bitwidth": 4, "power2_scale": False, "mixed_precision": {8: ["conv9"]}}}
    with pytest.raises(ValueError, match="conv9"):
        quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1, qconfig_type=qt)


def test_convert_before_calibration_raises() -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1)
    with pytest.raises(RuntimeError, match="calibration"):
        wrapper.convert()


def test_convert_after_diverged_training_says_so() -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1)
    quant.calibrate(wrapper, torch.randn(8, *config.INPUT_SHAPE))
    wrapper.module.conv1.weight_fake_quant.activation_post_process.min_val.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        wrapper.convert()


def test_export_before_convert_raises(tmp_path) -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1)
    with pytest.raises(RuntimeError, match=r"convert\(\) first"):
        wrapper.export(torch.zeros(1, *config.INPUT_SHAPE), tmp_path / "m.onnx")


class _Untraceable(nn.Module):
    """Python control flow on a tensor value: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branch on the data."""
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


class _UnsupportedOp(nn.Module):
    """A conv followed by a multiplication the NPU export does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, then times two."""
        return self.conv(x) * 2


def test_untraceable_model_raises_with_advice() -> None:
    with pytest.raises(TypeError, match="could not trace"):
        quant.TINPUTinyMLQATFxModule(_Untraceable(), total_epochs=1)


def test_unsupported_layer_raises_at_convert() -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(_UnsupportedOp(), total_epochs=1,
                                           example_inputs=torch.randn(2, 1, 8, 8))
    wrapper.eval()
    with torch.no_grad():
        wrapper(torch.randn(4, 1, 8, 8))
    with pytest.raises(NotImplementedError, match="no TI NPU integer form"):
        wrapper.convert()


def _frozen(wrapper: quant.TINPUTinyMLQuantFxModule) -> tuple[bool, bool]:
    """(BatchNorm frozen, observers frozen) as seen on the first conv and its quantizer."""
    conv1 = wrapper.module.conv1
    return bool(conv1.freeze_bn), not bool(conv1.weight_fake_quant.observer_enabled[0])


def test_qat_schedule_freezes_bn_then_observers(backend) -> None:
    wrapper = backend.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=4, example_inputs=EXAMPLE)
    seen = []
    for _ in range(4):
        wrapper.train()
        seen.append(_frozen(wrapper))
        wrapper.eval()
    # TI's rule: BN frozen from epoch total//2 - 1, observers from epoch total//2 + 1
    assert seen == [(False, False), (True, False), (True, False), (True, True)]


@pytest.mark.parametrize("bn_at, obs_at, expected", [
    (0, None, [(False, False), (True, False), (True, False), (True, True)]),   # TI: 0 = default
    (None, 0, [(False, False), (True, False), (True, False), (True, True)]),
    (False, False, [(False, False)] * 4),
    (2, 1, [(False, False), (False, True), (True, True), (True, True)]),
])
def test_qat_schedule_takes_explicit_epochs(backend, bn_at, obs_at, expected) -> None:
    wrapper = backend.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=4, example_inputs=EXAMPLE,
                                             num_batch_norm_update_epochs=bn_at,
                                             num_observer_update_epochs=obs_at)
    seen = []
    for _ in range(4):
        wrapper.train()
        seen.append(_frozen(wrapper))
        wrapper.eval()
    assert seen == expected


def test_course_option_freezes_bn_from_the_first_epoch() -> None:
    wrapper = quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=4, freeze_bn_from_start=True)
    seen = []
    for _ in range(4):
        wrapper.train()
        seen.append(_frozen(wrapper))
        wrapper.eval()
    assert seen == [(True, False), (True, False), (True, False), (True, True)]


def test_schedule_rejects_negative_epochs() -> None:
    with pytest.raises(ValueError, match="num_batch_norm_update_epochs"):
        quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=4, num_batch_norm_update_epochs=-1)


def test_qat_step_trains_and_converts(backend, tmp_path) -> None:
    torch.manual_seed(0)
    wrapper = backend.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=1, example_inputs=EXAMPLE,
                                             qconfig_type=quant.qconfig_for(4))
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = wrapper.module.fc6.weight.detach().clone()
    wrapper.train()
    x, y = torch.randn(32, *config.INPUT_SHAPE), torch.randint(0, 12, (32,))
    nn.functional.cross_entropy(wrapper(x), y).backward()
    optimizer.step()
    assert not torch.equal(before, wrapper.module.fc6.weight)
    wrapper.eval()
    wrapper.convert()
    path = tmp_path / "qat.onnx"
    wrapper.export(EXAMPLE, str(path), input_names=["input"])
    assert export.onnx_predict(path, torch.randn(1, *config.INPUT_SHAPE)).shape == (1, 12)


def test_export_after_more_training_converts_again(tmp_path) -> None:
    torch.manual_seed(0)
    wrapper = quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=2)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    x, y = torch.randn(32, *config.INPUT_SHAPE) * 8, torch.randint(0, 12, (32,))

    def step() -> None:
        wrapper.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapper(x), y).backward()
        optimizer.step()
        wrapper.eval()

    step()
    first = wrapper.convert()
    step()   # more QAT after convert(): export must not write the stale model
    path = wrapper.export(x[:1], tmp_path / "m.onnx")
    assert wrapper.integer_model is not first
    assert np.array_equal(export.onnx_predict(path, x), wrapper.integer_model(x).numpy())
    assert not np.array_equal(export.onnx_predict(path, x), first(x).numpy())


@pytest.mark.parametrize("shape", [(2, 1, 49, 20), (2, 49, 10)])
def test_wrapper_keeps_the_input_shape_check(shape) -> None:
    wrapper = quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1)
    with pytest.raises(ValueError, match="49"):
        wrapper(torch.zeros(shape))


def test_example_inputs_of_wrong_shape_are_named() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        quant.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1,
                                     example_inputs=torch.zeros(1, 49, 10))


def test_ptq_keeps_bn_frozen_and_weights_fixed(backend) -> None:
    wrapper = backend.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=2, example_inputs=EXAMPLE)
    wrapper.train()
    assert _frozen(wrapper) == (True, False)
    if backend is quant:   # the course also freezes the weights (TI stops gradients otherwise)
        assert not any(p.requires_grad for p in wrapper.parameters())


def test_quant_backend_switch(monkeypatch) -> None:
    monkeypatch.setenv("KWS_QUANT_BACKEND", "course")
    assert quant.quant_backend() is quant
    monkeypatch.delenv("KWS_QUANT_BACKEND", raising=False)   # auto: TI's package when installed
    expected = "tinyml_torchmodelopt.quantization" if quant.ti_installed() else "kws_utils.quant"
    assert quant.quant_backend().__name__ == expected
    monkeypatch.setattr(quant.wrappers, "ti_installed", lambda: False)
    assert quant.quant_backend() is quant
    monkeypatch.setenv("KWS_QUANT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KWS_QUANT_BACKEND"):
        quant.quant_backend()


def test_ti_backend_when_installed(monkeypatch) -> None:
    pytest.importorskip("tinyml_torchmodelopt")
    monkeypatch.setenv("KWS_QUANT_BACKEND", "ti")
    backend = quant.quant_backend()
    assert hasattr(backend, "TINPUTinyMLQATFxModule") and hasattr(backend, "TINPUTinyMLPTQFxModule")


# ----------------------------------------------------------------------------------------------
# Real data: the MLPerf reference DS-CNN, PTQ on 200 real non-test clips, ONNX on all of kws01
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _real_data() -> tuple[torch.Tensor, torch.Tensor, model.DSCNN, float]:
    """kws01 inputs, labels, the reference model and its float accuracy on them."""
    x, y, _ = data.load_kws01()
    ref = model.reference_model()
    with torch.no_grad():
        float_acc = (ref(x).argmax(1) == y).float().mean().item()
    return x, y, ref, float_acc


def _ptq_onnx_accuracy(bits: int, tmp_path) -> float:
    """Accuracy on kws01 of the exported integer ONNX model after PTQ on real non-test clips."""
    x, y, ref, _ = _real_data()
    calib = real_audio.calibration_subsets(1, 200)[0]
    wrapper = quant.TINPUTinyMLPTQFxModule(ref, total_epochs=1, qconfig_type=quant.qconfig_for(bits))
    wrapper.eval()
    with torch.no_grad():
        for i in range(0, 200, 50):
            wrapper(calib[i:i + 50])
    int_model = wrapper.convert()
    path = int_model.export(x[:1], tmp_path / f"kws_int{bits}.onnx", input_names=["input"])
    logits = export.onnx_predict(path, x)
    assert np.array_equal(logits, int_model(x).numpy())
    return float((logits.argmax(1) == y.numpy()).mean())


needs_mlperf = pytest.mark.skipif(not (config.mlperf_dir() / "kws01").is_dir() or not real_audio.pool_clips(),
                                  reason="MLPerf kws01 artifacts or the real calibration pool absent")


@needs_mlperf
@pytest.mark.parametrize("bits, allowed_drop", [(8, 0.005), (4, 0.015), (2, math.inf)])
def test_real_data_ptq_accuracy_through_onnx(bits: int, allowed_drop: float, tmp_path) -> None:
    float_acc = _real_data()[3]
    acc = _ptq_onnx_accuracy(bits, tmp_path)
    print(f"\nPTQ int{bits} via ONNX on kws01: {acc:.2%} (float {float_acc:.2%})")
    assert abs(float_acc - 0.904) < 0.002
    assert 0.0 <= acc <= 1.0 and acc >= float_acc - allowed_drop


@pytest.mark.parametrize("bits", BITS)
def test_integer_onnx_reads_back_bit_exact(bits: int, tmp_path) -> None:
    wrapper, _, x = _converted(bits)
    wrapper.integer_model.output = "int8"
    try:
        path = wrapper.export(x[:1], tmp_path / "m.onnx")
    finally:
        wrapper.integer_model.output = "float"
    back = quant.read_integer_onnx(path)
    assert [l.op for l in back.layers] == [l.op for l in wrapper.integer_model.layers]
    assert np.array_equal(back(x).numpy().astype(np.float32), export.onnx_predict(path, x))


def test_reading_a_float_onnx_says_it_is_not_integer(tmp_path) -> None:
    path = export.export_onnx(model.DSCNN().eval(), tmp_path / "float.onnx")
    with pytest.raises(ValueError, match="not a TINPU integer model"):
        quant.read_integer_onnx(path)


def test_diverging_qat_stops_with_a_clear_error() -> None:
    from types import SimpleNamespace
    from kws_utils import training
    from kws_utils.errors import TrainingDiverged
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, *config.INPUT_SHAPE, generator=g) * 1e3
    feats = SimpleNamespace(train_views=[x], train_y=torch.arange(40) % 12, val_x=x[:8], val_y=torch.arange(8))
    wrapper = quant.TINPUTinyMLQATFxModule(model.DSCNN(), total_epochs=1, qconfig_type=quant.qconfig_for(2),
                                           example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
    with pytest.raises(TrainingDiverged, match="int2_qat_lr"):   # not a NaN model handed to convert()
        quant.qat_fit(wrapper, feats, epochs=1, lr=1e12, batch_size=10, generator=training.set_seed(0))


@pytest.mark.skipif(importlib.util.find_spec("tinyml_torchmodelopt") is None,
                    reason="TI's tinyml_torchmodelopt is not installed")
def test_ti_convert_shows_no_torch_quantized_tensor_deprecation() -> None:
    # A fresh interpreter, as a notebook kernel: pytest replaces the warning filters of a module.
    import subprocess
    import sys
    code = ("import torch\n"
            "from kws_utils import config, model, quant\n"
            "from tinyml_torchmodelopt import quantization as ti\n"
            "w = ti.TINPUTinyMLPTQFxModule(model.DSCNN(), total_epochs=1, qconfig_type=quant.qconfig_for(8),\n"
            "                              example_inputs=torch.zeros(1, *config.INPUT_SHAPE))\n"
            "quant.calibrate(w, torch.randn(64, *config.INPUT_SHAPE) * 8)\n"
            "w.convert()\n"
            "print('converted')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "converted" in done.stdout, done.stderr[-2000:]
    assert "torch.quantize_per_tensor" not in done.stderr


@pytest.mark.parametrize("source, expected", [("synthetic", "PriorAdjustedLoss"), ("real", "CrossEntropyLoss")])
def test_qat_variant_trains_with_the_course_loss(monkeypatch: pytest.MonkeyPatch, source: str,
                                                  expected: str) -> None:
    # Notebook 05's QAT must keep notebook 03's prior correction where the course made one.
    from types import SimpleNamespace
    from kws_utils.quant import course
    seen = {}

    def stop(wrapper, feats, epochs, lr, batch_size, generator, loss_fn=None):
        seen["loss"] = loss_fn
        raise KeyboardInterrupt   # the loss is all this test needs; skip the training

    monkeypatch.setattr(course, "qat_fit", stop)
    feats = SimpleNamespace(source=source, train_y=torch.arange(60) % 12)
    with pytest.raises(KeyboardInterrupt):
        quant.quantize_variant(model.DSCNN(), feats, 8, "qat")
    assert type(seen["loss"]).__name__ == expected
