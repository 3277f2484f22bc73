"""Every exercise in every notebook has a solution, and every solution runs.

Convention, for all notebooks:
* an exercise is a markdown heading ``### Exercise N.M · title`` (N: the notebook's number, M: the
  exercise's number in it), under a ``## Exercises`` section; each notebook has 2 to 4;
* its solution is a code cell whose first line is ``# Solution: Exercise N.M``, at the end of the
  notebook (under ``## Solutions``) or collapsed in the notebook;
* a solution is self-contained: it imports what it needs and uses no variable of earlier cells, so
  this test runs it on its own, in a fresh namespace, in a few seconds (CI profile settings).
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import nbformat
import pytest

matplotlib.use("Agg")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
HEADING = re.compile(r"^#{2,4}\s*Exercise\s+(\d+\.\d+)\b", re.MULTILINE)
SOLUTION = re.compile(r"^# Solution: Exercise (\d+\.\d+)\s*$")


def exercises(path: Path) -> list[str]:
    """Numbers of the exercise headings of a notebook, in order."""
    nb = nbformat.read(path, as_version=4)
    return [n for c in nb.cells if c.cell_type == "markdown" for n in HEADING.findall(c.source)]


def solutions(path: Path) -> dict[str, str]:
    """Exercise number -> source of its solution cell."""
    nb = nbformat.read(path, as_version=4)
    found: dict[str, str] = {}
    for cell in nb.cells:
        match = SOLUTION.match(cell.source.split("\n", 1)[0]) if cell.cell_type == "code" else None
        if match:
            assert match.group(1) not in found, f"{path.name}: two solutions to {match.group(1)}"
            found[match.group(1)] = cell.source
    return found


ALL_SOLUTIONS = [(p.name, n, src) for p in NOTEBOOKS for n, src in solutions(p).items()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_each_exercise_has_one_solution(path: Path) -> None:
    numbers = exercises(path)
    assert 2 <= len(numbers) <= 4, f"{path.name}: {len(numbers)} exercises; the course asks for 2 to 4"
    assert len(set(numbers)) == len(numbers), f"{path.name}: exercise numbers repeat: {numbers}"
    prefix = path.name[:2].lstrip("0")
    assert all(n.split(".")[0] == prefix for n in numbers), f"{path.name}: numbers {numbers}"
    assert sorted(solutions(path)) == sorted(numbers), f"{path.name}: exercises and solutions differ"


@pytest.mark.parametrize("notebook,number,source", ALL_SOLUTIONS,
                         ids=[f"{n}" for _, n, _ in ALL_SOLUTIONS])
def test_solution_runs(notebook: str, number: str, source: str, capsys: pytest.CaptureFixture) -> None:
    exec(compile(source, f"<{notebook} solution {number}>", "exec"), {"__name__": "__solution__"})
    assert capsys.readouterr().out.strip(), f"solution {number} printed nothing: it should show its answer"
