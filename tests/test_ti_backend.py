"""Both backends: notebook 04's visible loops equal the package's, and TI's own files deploy."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
import torch

from kws_utils import config, deploy, export, model, plots, quant, training

NB04 = Path(__file__).resolve().parents[1] / "notebooks" / "04_qat_vs_ptq.ipynb"


def _cell(marker: str) -> str:
    """The source of the one notebook-04 code cell containing ``marker``."""
    cells = [c.source for c in nbformat.read(NB04, 4).cells
             if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"{len(cells)} cells of {NB04.name} contain {marker!r}"
    return cells[0]


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """A small float DS-CNN and a few random 'clips', enough to run both loops quickly."""
    torch.manual_seed(0)
    net = model.DSCNN(filters=8).eval()
    x = torch.randn(96, *config.INPUT_SHAPE) * 8
    y = torch.randint(0, len(config.LABELS), (96,))
    feats = SimpleNamespace(train_views=[x[:64], x[:64] + 1], train_y=y[:64], val_x=x[64:80],
                            val_y=y[64:80], test_x=x[80:], test_y=y[80:], source="synthetic")
    prof = SimpleNamespace(qat_epochs=2, qat_lr=0.01, batch_size=16, calib_clips=16, epochs=4, lr=1.0,
                           qat_epochs_cap=2)   # the settings the QAT cell prints
    return SimpleNamespace(net=net, feats=feats, prof=prof, calib_x=x[64:80])


def _run_cell(marker: str, tiny: SimpleNamespace) -> dict:
    """Execute notebook 04's cell on the tiny model; its namespace afterwards."""
    ns = dict(copy=copy, torch=torch, time=time, np=np, config=config, quant=quant, training=training,
              model=model, plots=plots, tinpu=quant.quant_backend(), net=copy.deepcopy(tiny.net),
              feats=tiny.feats, prof=tiny.prof, calib_x=tiny.calib_x)
    exec(compile(_cell(marker), NB04.name, "exec"), ns)
    return ns


def _outputs(wrapper: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The converted integer model's outputs."""
    with torch.no_grad():
        return quant.integer_module(wrapper)(x).numpy()


def test_notebook_ptq_loop_equals_the_package(tiny: SimpleNamespace) -> None:
    ns = _run_cell("ptq = tinpu.TINPUTinyMLPTQFxModule(", tiny)
    wrapper = quant.quant_backend().TINPUTinyMLPTQFxModule(
        copy.deepcopy(tiny.net), total_epochs=1, qconfig_type=None, example_inputs=tiny.calib_x[:1])
    quant.calibrate(wrapper, tiny.calib_x)
    wrapper.convert()
    x = tiny.feats.test_x
    assert np.array_equal(_outputs(ns["ptq"], x), _outputs(wrapper, x))


def test_notebook_qat_loop_equals_the_package(tiny: SimpleNamespace) -> None:
    ns = _run_cell("qat = tinpu.TINPUTinyMLQATFxModule(", tiny)
    wrapper = quant.quant_backend().TINPUTinyMLQATFxModule(
        copy.deepcopy(tiny.net), total_epochs=tiny.prof.qat_epochs, qconfig_type=None,
        example_inputs=tiny.calib_x[:1])
    quant.stable_conv_bn(wrapper)
    history = quant.qat_fit(wrapper, tiny.feats, tiny.prof.qat_epochs, tiny.prof.qat_lr,
                            tiny.prof.batch_size, training.set_seed(config.SEED))
    wrapper.convert()
    assert ns["history"] == history        # losses, accuracies and learning rates, epoch by epoch
    x = tiny.feats.test_x
    assert np.array_equal(_outputs(ns["qat"], x), _outputs(wrapper, x))


@pytest.mark.parametrize("bits", (8, 4, 2))
def test_ti_export_reads_back_bit_exact(bits: int, tiny: SimpleNamespace, tmp_path: Path) -> None:
    ti = pytest.importorskip("tinyml_torchmodelopt.quantization")
    wrapper = ti.TINPUTinyMLPTQFxModule(copy.deepcopy(tiny.net), total_epochs=1, qconfig_type=quant.qconfig_for(bits),
                                        example_inputs=tiny.calib_x[:1])
    quant.calibrate(wrapper, tiny.calib_x)
    wrapper.convert()
    path = quant.export_integer(wrapper, tmp_path / f"ti_int{bits}.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no temporary or .data left
    x = tiny.feats.test_x
    ort_out = export.onnx_predict(path, x)
    assert np.array_equal(ort_out, _outputs(wrapper, x))                # TI's module == its file
    loaded = deploy.load_integer_onnx(path)
    assert all(l.bias is None for l in loaded.layers)                   # TI folds bias into offset
    assert np.array_equal(deploy.numpy_reference(loaded, x), ort_out)   # NumPy == onnxruntime
    rebuilt = deploy.model_from_header(deploy.write_header(path, tmp_path / "ti.h"))
    assert np.array_equal(deploy.numpy_reference(rebuilt, x), ort_out)  # header == file
