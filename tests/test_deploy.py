"""Deployment: ONNX read-back, the NumPy integer reference, packing, the C header, the budget."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kws_utils import config, data, deploy, export, model, quant, real_audio

BITS = (8, 4, 2)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """Per bit width: the converted wrapper, its exported integer ONNX file; held-out inputs."""
    torch.manual_seed(2)
    net = model.DSCNN().train()
    with torch.no_grad():
        net(torch.randn(64, *config.INPUT_SHAPE) * 8)   # BatchNorm statistics that are not 0/1
    net.eval()
    # Per-input offsets per coefficient: pooled features (and so the outputs) differ by input.
    x = (torch.randn(200, *config.INPUT_SHAPE) + torch.randn(200, 1, 1, config.N_MFCC)) * 8
    tmp = tmp_path_factory.mktemp("deploy_models")
    out = {"net": net, "x": x[100:], "tmp": tmp}
    for bits in BITS:
        wrapper = quant.ptq(net, bits, x[:100])
        out[bits] = (wrapper, quant.export_integer(wrapper, tmp / f"int{bits}.onnx"))
    return out


def _same_layers(a: deploy.NpuModel, b: deploy.NpuModel) -> None:
    """Assert that two integer models hold identical integers and layer geometry."""
    assert (a.input_stage.qmin, a.input_stage.qmax) == (b.input_stage.qmin, b.input_stage.qmax)
    assert [(op, None if c is None else c.tolist()) for op, c in a.input_stage.steps] == \
           [(op, None if c is None else c.tolist()) for op, c in b.input_stage.steps]
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert (la.op, la.stride, la.padding, la.groups, la.qmin, la.qmax, la.float32_product) == \
               (lb.op, lb.stride, lb.padding, lb.groups, lb.qmin, lb.qmax, lb.float32_product)
        for field in ("weight", "bias", "offset", "mult", "shift"):
            va, vb = getattr(la, field), getattr(lb, field)
            assert (va is None and vb is None) or np.array_equal(va, vb), (la.name, field)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [1, 7, 64, 2561])
def test_pack_unpack_roundtrip(bits: int, count: int) -> None:
    limit = 2 ** (bits - 1) - 1
    values = np.random.default_rng(count).integers(-limit, limit + 1, count)
    packed = deploy.pack(values, bits)
    assert packed.size == -(-count * bits // 8)        # two int4 / four int2 per byte
    assert np.array_equal(deploy.unpack(packed, bits, count), values)


def test_packing_layout_is_low_bits_first_twos_complement() -> None:
    assert deploy.pack([1, -1], 4).tolist() == [0xF1]
    assert deploy.pack([1, -1, 0, 1], 2).tolist() == [0b01_00_11_01]
    assert deploy.pack([-7, 7, 3], 4).tolist() == [0x79, 0x03]


# ----------------------------------------------------------------------------- ONNX read-back
@pytest.mark.parametrize("bits", BITS)
def test_onnx_file_reads_back_the_exported_integers(calibrated: dict, bits: int) -> None:
    wrapper, path = calibrated[bits]
    loaded = deploy.load_integer_onnx(path)
    assert all(l.weight_bits == bits for l in loaded.layers if l.weight is not None)
    assert [l.op for l in loaded.layers].count("conv") == 9
    # The integers read from the file compute what the converted PyTorch model computes.
    x = calibrated["x"]
    with torch.no_grad():
        torch_out = quant.integer_module(wrapper)(x).numpy()
    assert np.array_equal(deploy.numpy_reference(loaded, x), torch_out)


def test_float_onnx_is_not_an_integer_model(calibrated: dict) -> None:
    path = export.export_onnx(calibrated["net"], calibrated["tmp"] / "float.onnx")
    with pytest.raises(ValueError, match="not an integer model"):
        deploy.load_integer_onnx(path)


# ----------------------------------------------------------------------------- NumPy reference
@pytest.mark.parametrize("bits", BITS)
def test_numpy_reference_is_bit_exact_with_onnxruntime(calibrated: dict, bits: int) -> None:
    path = calibrated[bits][1]
    x = calibrated["x"]
    ort_out, np_out = export.onnx_predict(path, x), deploy.numpy_reference(path, x)
    assert np_out.dtype == ort_out.dtype
    assert np.array_equal(np_out, ort_out)
    assert len(np.unique(np_out, axis=0)) > 5     # inputs give different outputs


def test_numpy_reference_notices_a_changed_weight(calibrated: dict) -> None:
    int_model, path = calibrated[8]
    changed = deploy.load_integer_onnx(path)
    changed.layers[0].weight = changed.layers[0].weight.copy()
    changed.layers[0].weight[0, 0, 0, 0] += 40
    x = calibrated["x"]
    assert not np.array_equal(deploy.numpy_reference(changed, x), export.onnx_predict(path, x))


def test_numpy_reference_rejects_wrong_input_shape(calibrated: dict) -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 49, 10\)"):
        deploy.numpy_reference(calibrated[8][1], np.zeros((2, 49, 10)))


needs_mlperf = pytest.mark.skipif(not (config.mlperf_dir() / "kws01").is_dir()
                                  or not (config.mlperf_dir() / "kws_dscnn_pb2pth_checkpoint.pth").is_file()
                                  or not real_audio.pool_clips(),
                                  reason="MLPerf kws01 artifacts or the real calibration pool absent")


@needs_mlperf
def test_numpy_reference_bit_exact_on_real_mlperf_inputs(tmp_path: Path) -> None:
    x, y, _ = data.load_kws01()
    calib = real_audio.calibration_subsets(1, 200)[0]    # real non-test clips: kws01 is for scoring
    path = quant.export_integer(quant.ptq(model.reference_model(), 8, calib), tmp_path / "ref_int8.onnx")
    got, want = deploy.numpy_reference(path, x[:400]), export.onnx_predict(path, x[:400])
    assert np.array_equal(got, want)
    assert (got.argmax(1) == y[:400].numpy()).mean() > 0.85


# ----------------------------------------------------------------------------- C header
@pytest.mark.parametrize("bits", BITS)
def test_header_roundtrip_reproduces_the_onnx_integers(calibrated: dict, bits: int) -> None:
    path = calibrated[bits][1]
    loaded = deploy.load_integer_onnx(path)
    header = deploy.write_header(path, calibrated["tmp"] / f"kws_int{bits}.h")
    text = header.read_text()
    assert "#include <stdint.h>" in text and text.count("#ifndef") == 1
    parsed = deploy.read_header(header)
    assert parsed.defines["KWS_L0_WEIGHT_BITS"] == bits
    assert parsed.arrays["kws_l0_weight"].dtype == (np.int8 if bits == 8 else np.uint8)
    assert parsed.arrays["kws_l0_weight"].size == -(-loaded.layers[0].weight.size * bits // 8)
    rebuilt = deploy.model_from_header(header)
    _same_layers(rebuilt, loaded)
    x = calibrated["x"]
    assert np.array_equal(deploy.numpy_reference(rebuilt, x), export.onnx_predict(path, x))


def test_header_gives_input_scale_as_power_of_two(calibrated: dict) -> None:
    path = calibrated[8][1]
    defines = deploy.read_header(deploy.write_header(path, calibrated["tmp"] / "k.h")).defines
    assert 2.0 ** defines["KWS_INPUT_SCALE_LOG2"] == defines["KWS_INPUT_SCALE"]
    assert deploy.power2_exponent(0.125) == -3 and deploy.power2_exponent(0.3) is None


def test_truncated_header_array_is_reported(calibrated: dict) -> None:
    path = deploy.write_header(calibrated[2][1], calibrated["tmp"] / "bad.h")
    path.write_text(path.read_text().replace("static const int32_t kws_l0_offset[64] = {\n    ",
                                             "static const int32_t kws_l0_offset[64] = {\n    1, ", 1))
    with pytest.raises(ValueError, match="declares 64 values"):
        deploy.read_header(path)


# ----------------------------------------------------------------------------- refusing bad files
def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of an integer ONNX file with ``edit(initializers by name, proto)`` applied."""
    proto = onnx.load(str(src))
    edit({i.name: i for i in proto.graph.initializer}, proto)
    onnx.save(proto, str(dst))
    return dst


def _first_weight(inits: dict) -> onnx.TensorProto:
    """The first conv weight initializer (4-D)."""
    return next(t for n, t in inits.items() if n.endswith("weight") and len(t.dims) == 4)


def _set_value(tensor: onnx.TensorProto, value: float) -> None:
    """Overwrite the first element of an initializer."""
    arr = numpy_helper.to_array(tensor).copy()
    arr.flat[0] = value
    tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))


def test_non_integer_weight_is_refused_naming_file_and_tensor(calibrated: dict) -> None:
    bad = _edited(calibrated[8][1], calibrated["tmp"] / "frac.onnx",
                  lambda inits, _: _set_value(_first_weight(inits), 0.5))
    name = _first_weight({i.name: i for i in onnx.load(str(bad)).graph.initializer}).name
    with pytest.raises(ValueError, match=rf"frac\.onnx.*'{name}'.*non-integer"):
        deploy.load_integer_onnx(bad)


def test_weight_outside_the_bit_width_is_refused(calibrated: dict) -> None:
    with pytest.raises(ValueError, match=r"outside its declared 2-bit range"):
        deploy.load_integer_onnx(calibrated[4][1], weight_bits=2)
    bad = _edited(calibrated[8][1], calibrated["tmp"] / "big.onnx",
                  lambda inits, _: _set_value(_first_weight(inits), 300))
    with pytest.raises(ValueError, match=r"big\.onnx.*reaches 300, beyond int8"):
        deploy.load_integer_onnx(bad)


def test_missing_initializer_is_refused_naming_it(calibrated: dict) -> None:
    def drop_weight(inits: dict, proto: onnx.ModelProto) -> None:
        proto.graph.initializer.remove(_first_weight(inits))
    bad = _edited(calibrated[8][1], calibrated["tmp"] / "missing.onnx", drop_weight)
    with pytest.raises(ValueError, match=r"missing\.onnx: Conv node .*required tensor '.*weight' is missing"):
        deploy.load_integer_onnx(bad)


# ----------------------------------------------------------------------------- budget
def test_budget_packs_weights_and_counts_the_model(calibrated: dict) -> None:
    net, tmp = calibrated["net"], calibrated["tmp"]
    float_onnx = export.export_onnx(net, tmp / "float_budget.onnx")
    rows = deploy.budget(net, float_onnx, {b: calibrated[b][1] for b in BITS}, runs=5)
    by_name = {r.variant: r for r in rows}
    n_weights = sum(l.weight.size for l in deploy.load_integer_onnx(calibrated[8][1]).layers
                    if l.weight is not None)
    assert by_name["int8 weights"].weight_bytes == n_weights
    assert by_name["float32"].weight_bytes == 4 * n_weights
    assert by_name["int4 weights"].weight_bytes == pytest.approx(n_weights / 2, abs=10)
    assert by_name["int2 weights"].weight_bytes == pytest.approx(n_weights / 4, abs=20)
    # 64 x 25 x 5 int8 activations in and out of a depthwise layer; float is 4 bytes each
    assert by_name["int8 weights"].peak_activation_bytes == 2 * 64 * 25 * 5
    assert by_name["float32"].peak_activation_bytes == 4 * 2 * 64 * 25 * 5
    assert all(r.macs == sum(s.macs for s in model.layer_stats(net)) for r in rows)
    assert all(r.latency_ms > 0 for r in rows)
    assert len(rows[0].row(100)) == len(deploy.BUDGET_HEADERS)
