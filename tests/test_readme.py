"""The README's results table copies figures from the committed notebooks: each one must be printed there."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"\b\d{1,3}\.\d{2}\b")   # the tables' accuracies carry two decimals


def results_table_rows(readme: str) -> list[str]:
    """The table rows of the README's '## Results' section."""
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def printed_percentages() -> set[str]:
    """Every 'NN.NN%' that a committed notebook printed, as 'NN.NN'."""
    found: set[str] = set()
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for out in cell.get("outputs", []):
                text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
                found.update(re.findall(r"(\d{1,3}\.\d{2}) ?%", "".join(text)))
    return found


def unprinted(rows: list[str], printed: set[str]) -> list[tuple[str, str]]:
    """(row label, figure) for each figure of the table's body rows that is not in ``printed``."""
    return [(row.split("|")[1].strip(), n) for row in rows[1:] for n in ACCURACY.findall(row)
            if n not in printed]


def test_results_table_figures_are_printed_by_the_notebooks() -> None:
    rows = results_table_rows((ROOT / "README.md").read_text())
    assert len(rows) > 5, "the README's results table was not found under '## Results'"
    missing = unprinted(rows, printed_percentages())
    assert not missing, f"README figures no committed notebook prints (re-copy them): {missing}"


def test_the_check_catches_a_mistyped_figure() -> None:
    rows = ["| model | test |", "| float | 97.55 % |", "| int8 | 97.56 / 12.30 % |"]
    assert unprinted(rows, {"97.55", "97.56"}) == [("int8", "12.30")]
