"""Shared fixtures: a tiny real synthetic dataset, generated once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from kws_utils import data, synthetic

TINY_SPEAKERS = 6     # 4 train, 1 validation, 1 test speaker
TINY_PER_CLASS = 4


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetInfo:
    """A few speakers of the offline dataset, in the Speech Commands layout."""
    root = tmp_path_factory.mktemp("tiny")
    train, test = synthetic.ensure_synthetic(root / "train", root / "test", TINY_SPEAKERS,
                                             TINY_PER_CLASS, seed=1, workers=1)
    return data.DatasetInfo("synthetic", Path(train), Path(test), "tiny synthetic dataset for tests")
