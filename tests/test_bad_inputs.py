"""Every case of the bad-input sweep (tests/bad_input_sweep.py): a clear error or a correct result."""
from __future__ import annotations

from pathlib import Path

import pytest

from bad_input_sweep import Case, Ctx, cases, run_case

CASES = cases()


@pytest.fixture(scope="module", autouse=True)
def course_backend() -> None:
    """The sweep checks the course's own functions: kws_utils.quant, whatever KWS_QUANT_BACKEND says."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KWS_QUANT_BACKEND", "course")
        yield


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    """One scratch root (and shared ONNX files) for the whole table."""
    return Ctx(Path(tmp_path_factory.mktemp("bad_inputs")))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, ctx: Ctx) -> None:
    category, detail = run_case(case, ctx)
    assert category == "handled", f"{category}: {detail}"


def test_table_is_broad() -> None:
    assert len(CASES) >= 374
    assert sum(c.id.startswith("r2/") for c in CASES) >= 60, "round two (issue 19) must stay broad"
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
