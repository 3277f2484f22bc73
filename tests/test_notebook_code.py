"""The code taught in the notebooks and the package's code give the same results.

Each taught cell starts with a marker comment, ``# kws-code: <name>``. The test reads the cells with
nbformat, executes them on small inputs, and compares with kws_utils.features, .model, .training and the
quantization export (notebook 04: one layer converted to integers by hand).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

from kws_utils import config, features, model, training

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def marked_cells(notebook: str, marker: str) -> list[str]:
    """Sources of the code cells of ``notebook`` whose first line starts with ``# kws-code: marker``."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"
            and c.source.splitlines()[0].startswith(f"# kws-code: {marker}")]


def run_cells(sources: list[str], namespace: dict) -> dict:
    """Execute cell sources in order in one namespace (printing silenced) and return it."""
    namespace.setdefault("print", lambda *args, **kwargs: None)
    for source in sources:
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace


def speech_like(length: int, seed: int) -> np.ndarray:
    """An int16 test clip: a gliding tone in noise, ``length`` samples."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / config.SAMPLE_RATE
    wave = 0.4 * np.sin(2 * np.pi * (300 + 900 * t) * t) + 0.05 * rng.standard_normal(length)
    return (wave * 20000).astype(np.int16)


@pytest.mark.parametrize("length", [config.CLIP_SAMPLES, 9_000])
def test_notebook01_mfcc_steps_match_features(length: int) -> None:
    sources = marked_cells("01_dataset_and_balance.ipynb", "mfcc")
    assert len(sources) == 7, "notebook 01 should show normalise + the six MFCC steps, one cell each"
    wave = speech_like(length, seed=length)
    ns = run_cells(sources, {"torch": torch, "config": config, "features": features, "wave": wave})
    torch.testing.assert_close(ns["mel_weights"], features.mel_matrix(torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ns["dct"], features.dct_matrix(torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ns["mfcc_by_hand"], features.mfcc(wave), rtol=0, atol=1e-5)


def test_notebook02_dscnn_is_the_package_model() -> None:
    (source,) = marked_cells("02_dscnn_architecture.ipynb", "dscnn")
    ns = run_cells([source], {"torch": torch, "nn": nn, "config": config, "model": model})
    torch.manual_seed(5)
    taught = ns["DSCNN"]().eval()
    torch.manual_seed(5)
    package = model.DSCNN().eval()
    taught_state, package_state = taught.state_dict(), package.state_dict()
    assert list(taught_state) == list(package_state)
    for name in package_state:
        torch.testing.assert_close(taught_state[name], package_state[name], rtol=0, atol=0)
    x = torch.randn(6, *config.INPUT_SHAPE)
    torch.testing.assert_close(taught(x), package(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unsqueeze"):
        taught(torch.zeros(2, 49, 10))


def test_notebook03_recipe_is_make_optimizer() -> None:
    (source,) = marked_cells("03_float_training.ipynb", "recipe")
    prof = config.PROFILES["default"]
    feats = SimpleNamespace(train_y=torch.zeros(1234, dtype=torch.long))
    ns = run_cells([source], {"torch": torch, "nn": nn, "config": config, "model": model,
                              "training": training, "prof": prof, "feats": feats})
    steps = (1234 + prof.batch_size - 1) // prof.batch_size
    optimizer, scheduler = training.make_optimizer(model.DSCNN(), prof.lr, prof.epochs, steps,
                                                   prof.momentum, prof.per_batch_schedule)
    for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
        assert ns["optimizer"].defaults[key] == optimizer.defaults[key], key
    assert ns["scheduler"].T_max == scheduler.T_max == prof.epochs   # TI: T_max = epochs
    assert isinstance(ns["loss_fn"], nn.CrossEntropyLoss)


def _one_epoch(step, dropout_p: float, same_masks: bool) -> tuple[float, float, dict]:
    """Loss, accuracy and weights after one epoch of ``step`` on a fixed small batch set."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, *config.INPUT_SHAPE, generator=gen), torch.randint(0, 12, (120,), generator=gen)
    torch.manual_seed(1)
    net = model.DSCNN()
    net.dropout1.p, net.dropout2.p = dropout_p, dropout_p
    optimizer, _ = training.make_optimizer(net, 0.5, 3)
    batches = training.Batches(x, y, 32, shuffle=True, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)   # dropout masks
    if same_masks:   # the package draws masks with torch.rand: give the plain loop the same draws
        with training.faster_dropout(net):
            loss, acc = step(net, batches, optimizer, nn.CrossEntropyLoss())
    else:
        loss, acc = step(net, batches, optimizer, nn.CrossEntropyLoss())
    return loss, acc, net.state_dict()


@pytest.mark.parametrize("dropout_p", [0.0, None], ids=["no dropout", "model dropout, same masks"])
def test_notebook03_plain_loop_matches_train_epoch(dropout_p: float | None) -> None:
    (source,) = marked_cells("03_float_training.ipynb", "train_one_epoch")
    assert "channels_last" not in source and "faster_dropout" not in source, "the taught loop is the plain one"
    train_one_epoch = run_cells([source], {"torch": torch, "training": training})["train_one_epoch"]
    p = model.DSCNN().dropout2.p if dropout_p is None else dropout_p
    loss_a, acc_a, state_a = _one_epoch(train_one_epoch, p, same_masks=dropout_p is None)
    loss_b, acc_b, state_b = _one_epoch(training.train_epoch, p, same_masks=False)
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and acc_a == acc_b
    torch.manual_seed(1)
    start = model.DSCNN().state_dict()
    moved = max((state_b[n] - start[n]).abs().max().item() for n in state_b if n.endswith("weight"))
    assert moved > 1e-3, "the epoch should change the weights, or the comparison proves nothing"
    for name in state_b:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["course", "ti"])
def test_notebook04_one_layer_by_hand_is_the_export(backend: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from kws_utils import deploy, quant

    if backend == "ti" and not quant.ti_installed():
        pytest.skip("TI's tinyml_torchmodelopt is not installed")
    monkeypatch.setenv("KWS_QUANT_BACKEND", backend)
    (source,) = marked_cells("04_qat_vs_ptq.ipynb", "int_layer")
    torch.manual_seed(0)
    net = model.DSCNN().train()
    with torch.no_grad():   # BatchNorm statistics that are not the identity
        for _ in range(3):
            net(torch.randn(64, *config.INPUT_SHAPE))
    x = torch.randn(200, *config.INPUT_SHAPE)
    ptq = quant.quant_backend().TINPUTinyMLPTQFxModule(net.eval(), total_epochs=1, qconfig_type=None,
                                                       example_inputs=x[:1])
    with torch.no_grad():
        ptq.train()
        ptq(x)
    ptq.eval()
    ptq_fq = copy.deepcopy(ptq)
    ptq.convert()
    path = quant.export_integer(ptq, tmp_path / "ptq.onnx", x)
    ns = run_cells([source], {"torch": torch, "ptq_fq": ptq_fq})
    layer = next(l for l in deploy.load_integer_onnx(path).layers if l.name == "pointwise2")
    np.testing.assert_array_equal(ns["w_int"].numpy(), layer.weight)
    np.testing.assert_array_equal(ns["mult"].numpy(), layer.mult)
    np.testing.assert_array_equal(ns["shift"].numpy(), layer.shift)
    file_offset = layer.offset + (0 if layer.bias is None else layer.bias)
    np.testing.assert_array_equal(ns["offset"].numpy(), file_offset)
    assert np.abs(ns["b_int"].numpy()).max() > 2 * (2.0 ** (layer.shift - 1)).max(), "the bias should matter"


def test_notebook05_learned_rounding_loop_is_the_package_loop() -> None:
    from kws_utils.quant import rounding

    (source,) = marked_cells("05_int8_int4_int2_export.ipynb", "learned_rounding")
    ns = run_cells([source], {})
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 16, generator=gen) * 0.3)
    x = torch.randn(64, 16, generator=gen)
    target = layer(x).detach() + 0.01 * torch.randn(64, 4, generator=gen)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    minmax = weight.abs().amax(1, keepdim=True) / 1.0   # ternary: qmax = 1
    layer.weight_fake_quant = SimpleNamespace(scale=minmax.reshape(-1).clone(), quant_min=-1, quant_max=1)
    start = ns["mse_scale"](weight, minmax, -1, 1)
    torch.testing.assert_close(start, rounding._weight_mse_scale(weight, minmax, -1, 1), rtol=0, atol=0)
    q, scale, new_bias = ns["learn_layer_rounding"](weight, bias, start, -1, 1, x, target, iters=60, seed=3)
    bar = SimpleNamespace(update=lambda n: None)
    ((q_pkg, scale_pkg, bias_pkg),) = rounding._learn_block([layer], [None], x, None, target, 60, 32,
                                                            rounding.LR, rounding.REG,
                                                            torch.Generator().manual_seed(3), bar)
    assert torch.equal(q, q_pkg)
    torch.testing.assert_close(scale.reshape(-1), scale_pkg.reshape(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(new_bias, bias_pkg, rtol=1e-6, atol=1e-7)
    assert not torch.equal(q, torch.clamp(torch.round(weight / start), -1, 1)), "nothing was learned"


def test_notebook03_realism_filter_is_the_package_filter() -> None:
    (source,) = marked_cells("03_float_training.ipynb", "realism_filter")
    ns = run_cells([source], {"training": training})
    torch.manual_seed(0)
    judge, x = model.DSCNN().eval(), torch.randn(40, *config.INPUT_SHAPE)
    y = judge(x).argmax(1).detach()
    y[::3] = (y[::3] + 1) % 12   # a third of the labels disagree with the judge
    mask = ns["recognised_by"](judge, x, y)
    assert torch.equal(mask, training.recognised_by(judge, x, y))
    assert 0 < mask.sum() < len(mask)


def test_notebook03_prior_correction_is_the_package_correction() -> None:
    (source,) = marked_cells("03_float_training.ipynb", "prior_correction")
    ns = run_cells([source], {"torch": torch, "config": config, "model": model})
    net = model.DSCNN().eval()
    train_y = torch.cat([torch.arange(12), torch.full((30,), config.UNKNOWN_INDEX), torch.zeros(5, dtype=torch.long)])
    mine, package = ns["prior_corrected"](net, train_y), model.prior_corrected(net, train_y)
    torch.testing.assert_close(mine.fc6.bias, package.fc6.bias, rtol=0, atol=1e-6)
    assert not torch.allclose(mine.fc6.bias, net.fc6.bias)


def test_notebook04_prior_adjusted_loss_is_the_package_loss() -> None:
    (source,) = marked_cells("04_qat_vs_ptq.ipynb", "prior_adjusted_loss")
    ns = run_cells([source], {"torch": torch})
    train_y = torch.cat([torch.arange(12), torch.full((30,), config.UNKNOWN_INDEX)])
    ratio = model.prior_log_ratio(train_y, len(config.LABELS))
    logits, labels = torch.randn(20, 12, generator=torch.Generator().manual_seed(3)), torch.arange(20) % 12
    mine, package = ns["PriorAdjustedLoss"](ratio)(logits, labels), training.PriorAdjustedLoss(ratio)(logits, labels)
    torch.testing.assert_close(mine, package, rtol=0, atol=0)
    assert not torch.isclose(mine, nn.functional.cross_entropy(logits, labels))


def test_notebook05_bias_tuning_loop_is_the_package_loop() -> None:
    import copy

    from kws_utils import quant

    (source,) = marked_cells("05_int8_int4_int2_export.ipynb", "tune_biases")
    ns = run_cells([source], {})
    torch.manual_seed(0)
    net = model.DSCNN(filters=8).eval()
    x = torch.randn(64, *config.INPUT_SHAPE) * 8
    wrapper = quant.TINPUTinyMLPTQFxModule(net, total_epochs=1, qconfig_type=quant.qconfig_for(2),
                                           example_inputs=x[:1])
    quant.match_integer_model(wrapper)
    quant.calibrate(wrapper, x)
    with torch.no_grad():
        teacher = net(x)
    by_hand, package = copy.deepcopy(wrapper), copy.deepcopy(wrapper)
    biases = ns["tune_biases_by_hand"](by_hand, x, teacher, steps=30, seed=2)
    kl_before, kl_after = quant.tune_biases(package, x, teacher, steps=30, seed=2)
    assert kl_after < kl_before, "the package kept its start: nothing to compare"
    expected = quant.requant._bias_holders(package.module)
    assert len(biases) == len(expected)
    for got, want in zip(biases, expected):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
