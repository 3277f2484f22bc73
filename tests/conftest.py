"""Shared fixtures: a tiny real synthetic dataset, generated once per test session; a small random DS-CNN."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kws_utils import config, data, model, synthetic

TINY_SPEAKERS = 6     # 4 train, 1 validation, 1 test speaker
TINY_PER_CLASS = 4
# The course's recipe without its neural voices: a bank is minutes of rendering per seed, and the neural
# path has its own tests with banks of 2-3 voices (test_neural_voice.py).
FAST_RECIPE = synthetic.Recipe(tts_share=0.0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetInfo:
    """A few speakers of the offline dataset, in the Speech Commands layout."""
    root = tmp_path_factory.mktemp("tiny")
    train, test = synthetic.ensure_synthetic(root / "train", root / "test", TINY_SPEAKERS,
                                             TINY_PER_CLASS, seed=1, workers=1, recipe=FAST_RECIPE)
    return data.DatasetInfo("synthetic", Path(train), Path(test), "tiny synthetic dataset for tests")


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """A small random DS-CNN; 64 calibration and 96 scoring inputs (quantization tests; a module may define its own)."""
    torch.manual_seed(0)
    net = model.DSCNN(filters=8).eval()
    x = torch.randn(160, *config.INPUT_SHAPE) * 8
    return SimpleNamespace(net=net, calib=x[:64], x=x[64:])
