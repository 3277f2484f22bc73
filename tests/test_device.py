"""The compute device: one setting (KWS_DEVICE), honoured by training, evaluation and calibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kws_utils import config, model, quant, training

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_DEVICE", "auto")
    expected = "cuda" if HAS_CUDA else "mps" if HAS_MPS else "cpu"
    assert config.device().type == expected
    monkeypatch.delenv("KWS_DEVICE")
    assert config.device().type == expected


def test_unknown_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_DEVICE", "gpu")
    with pytest.raises(ValueError, match="KWS_DEVICE='gpu'.*auto"):
        config.device()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_unavailable_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no cuda device"):
        config.device()


def _fit_once_recording_devices(monkeypatch: pytest.MonkeyPatch, device: str) -> tuple[set, nn.Module]:
    """One short weighted-loss fit on KWS_DEVICE=device; the devices the model's inputs were on."""
    monkeypatch.setenv("KWS_DEVICE", device)
    torch.manual_seed(0)
    x = torch.randn(120, *config.INPUT_SHAPE)
    y = torch.arange(120) % len(config.LABELS)
    net, seen = model.DSCNN(), set()
    net.register_forward_pre_hook(lambda _m, args: seen.add(args[0].device.type))
    loss_fn = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 1.5, len(config.LABELS)))
    before = net.fc6.weight.detach().clone()
    training.fit(net, [x], y, x, y, epochs=1, lr=0.05, batch_size=40,
                 generator=training.set_seed(0), loss_fn=loss_fn)
    assert not torch.equal(before, net.fc6.weight.detach())   # it did train
    return seen, net


def test_training_runs_on_the_cpu_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, net = _fit_once_recording_devices(monkeypatch, "cpu")
    assert seen == {"cpu"} and training.model_device(net).type == "cpu"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_training_and_calibration_run_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, net = _fit_once_recording_devices(monkeypatch, "cuda")
    # Trained on the GPU, handed back on the CPU for integer conversion and export.
    assert seen == {"cuda"} and training.model_device(net).type == "cpu"
    wrapper = quant.ptq(net, 8, torch.randn(50, *config.INPUT_SHAPE))
    assert training.model_device(wrapper).type == "cpu"
    assert wrapper.integer_model(torch.randn(2, *config.INPUT_SHAPE)).shape == (2, 12)

