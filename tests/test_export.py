"""Tests of kws_utils.export: float ONNX export, integer/QDQ ONNX export, inference helpers."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch

from kws_utils import config, export, model, quant

# TI's TINPU integer form: no Div, no Cast, no Flatten, no bias inputs
STANDARD_INTEGER_OPS = {"Round", "Clip", "Conv", "Add", "Mul", "Floor", "ReduceSum", "Gemm"}


@functools.lru_cache(maxsize=None)
def _calibrated(bits: int) -> tuple[quant.TINPUTinyMLPTQFxModule, torch.Tensor]:
    """A random DS-CNN, PTQ-calibrated and converted, plus held-out inputs."""
    torch.manual_seed(2)
    net = model.DSCNN().train()
    with torch.no_grad():
        net(torch.randn(64, *config.INPUT_SHAPE) * 8)
    x = torch.randn(300, *config.INPUT_SHAPE) * 8
    wrapper = quant.TINPUTinyMLPTQFxModule(net.eval(), total_epochs=1,
                                           qconfig_type=quant.qconfig_for(bits))
    wrapper.eval()
    with torch.no_grad():
        wrapper(x[:150])
    wrapper.convert()
    return wrapper, x[150:]


def test_float_export_matches_torch_with_dynamic_batch(tmp_path) -> None:
    torch.manual_seed(0)
    net = model.DSCNN().eval()
    path = export.export_onnx(net, tmp_path / "float.onnx")
    x = torch.randn(70, *config.INPUT_SHAPE)
    got = export.onnx_predict(path, x, batch_size=32)   # batches 32, 32, 6: dynamic batch axis
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4)
    assert not net.training   # export leaves the model's mode as it was
    labels = torch.as_tensor(got.argmax(1))
    labels[:7] = (labels[:7] + 1) % len(config.LABELS)   # 7 of 70 wrong
    assert export.onnx_accuracy(path, x, labels) == pytest.approx(0.9)


def test_graph_summary_lists_nodes_and_shapes(tmp_path) -> None:
    path = export.export_onnx(model.DSCNN(), tmp_path / "float.onnx")
    text = export.graph_summary(path)
    assert "Conv" in text and "Gemm" in text and "64x1x10x4" in text
    assert "input batchx1x49x10" in text and text.count("\n") > 20


@pytest.mark.parametrize("bad", [torch.zeros(2, 49, 10), torch.zeros(2, 1, 10, 49)])
def test_wrong_input_shape_raises_clear_message(bad: torch.Tensor, tmp_path) -> None:
    path = export.export_onnx(model.DSCNN(), tmp_path / "float.onnx")
    with pytest.raises(ValueError, match=r"\(N, 1, 49, 10\)"):
        export.onnx_predict(path, bad)
    with pytest.raises(ValueError, match=r"\(N, 1, 49, 10\)"):
        export.export_onnx(model.DSCNN(), tmp_path / "bad.onnx", example=bad)
    wrapper, _ = _calibrated(8)
    with pytest.raises(ValueError, match=r"\(N, 1, 49, 10\)"):
        wrapper.export(bad, tmp_path / "bad_int.onnx")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("output", ["int8", "float"])
def test_integer_onnx_is_bit_exact(bits: int, output: str, tmp_path) -> None:
    wrapper, x = _calibrated(bits)
    int_model = wrapper.integer_model
    int_model.output = output
    path = wrapper.export(x[:1], tmp_path / f"int{bits}.onnx", input_names=["input"])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.op_type for n in proto.graph.node} <= STANDARD_INTEGER_OPS
    got = export.onnx_predict(path, x, batch_size=64)
    want = int_model(x).numpy()
    # the file carries integer codes in float32 as TI's does; the PyTorch model gives int8 codes
    assert got.dtype == np.float32 and want.dtype == (np.int8 if output == "int8" else np.float32)
    assert np.array_equal(got, want.astype(np.float32))


def test_integer_onnx_has_no_batchnorm_or_float_weights(tmp_path) -> None:
    wrapper, x = _calibrated(4)
    proto = onnx.load(str(wrapper.export(x[:1], tmp_path / "int4.onnx")))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    weights = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
               if i.name.endswith(".weight")]
    assert len(weights) == 10
    assert all(np.array_equal(w, np.round(w)) and np.abs(w).max() <= 7 for w in weights)


def test_accumulators_stay_exact_in_float32() -> None:
    wrapper, _ = _calibrated(8)
    int_model = wrapper.integer_model
    x_max = max(-int_model.input_qmin, int_model.input_qmax)
    for layer in int_model.layers:
        if layer.weight is not None:
            per_out = np.abs(layer.weight.astype(np.int64)).reshape(len(layer.weight), -1).sum(1)
            assert (per_out * x_max + np.abs(layer.bias)).max() < 2 ** 24
        x_max = max(-layer.qmin, layer.qmax)


def test_qdq_export_matches_fake_quant_model(tmp_path) -> None:
    wrapper, x = _calibrated(8)
    path = wrapper.export(x[:1], tmp_path / "qdq.onnx",
                          model_qconfig_format=quant.TinyMLModelQConfigFormat.QDQ_MODEL)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    with torch.no_grad():
        fake = wrapper(x).numpy()
    lsb = wrapper.integer_model.output_scale
    assert np.abs(export.onnx_predict(path, x) - fake).max() <= 3 * lsb


def test_unknown_export_format_raises(tmp_path) -> None:
    wrapper, x = _calibrated(8)
    with pytest.raises(ValueError, match="model_qconfig_format"):
        wrapper.export(x[:1], tmp_path / "m.onnx", model_qconfig_format="SOMETHING")


def test_predict_on_missing_file_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="export the model first"):
        export.onnx_predict(tmp_path / "none.onnx", torch.zeros(1, *config.INPUT_SHAPE))
