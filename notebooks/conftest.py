"""nbval settings for the notebooks (CI only; learners never need this file).

`make test` runs notebook 04 twice, once per quantization package (scripts/test_all.sh). Cells tagged
``both-backends`` run TI's package and the course's side by side whatever KWS_QUANT_BACKEND says, so
their output is the same in both passes: the second pass (KWS_NBVAL_SECOND_PASS=1) skips them.
"""
from __future__ import annotations

import os

import pytest

TAG = "both-backends"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the second pass, deselect the cells whose output does not depend on the backend."""
    if os.environ.get("KWS_NBVAL_SECOND_PASS") != "1":
        return
    keep, drop = [], []
    for item in items:
        cell = getattr(item, "cell", None)
        tags = cell.metadata.get("tags", []) if cell is not None else []
        (drop if TAG in tags else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
