"""Prose and outputs agree: no number that a cell computes is typed into a notebook's markdown.

How it decides, for every markdown cell of every notebook in ``notebooks/``:

1. Text that is not prose is removed first: fenced code blocks, inline code (`...`), LaTeX math
   ($...$ and $$...$$), link targets ``](...)``, bare URLs, arXiv identifiers (``arXiv:1804.03209``)
   HTML comments and names such as ``Exercise 4.2``. Formulas and settings are not results.
   Exercise statements (cells whose first line is an ``Exercise N.M`` heading or the ``## Exercises``
   heading) are skipped: their numbers are the exercise's given data, not results.
2. What remains is scanned for **result-like numbers**: percentages (``97.8 %``, ``43.6%``),
   decimals (``0.25``, ``2.7``) and counts with thousands separators (``4,896``). Plain integers
   (layer sizes, epochs, years) are not checked: they are almost always fixed facts.
3. A number passes when
   a. it is in ``FIXED_FACTS`` below: constants of the task, of the recipe or of the papers, each
      with the reason it is fixed; or
   b. it appears in the outputs of the **same notebook** (stream text and ``text/plain`` results),
      compared as numbers with the same digits: ``4,896`` matches ``4896`` or ``4,896``. A
      percentage must match a printed percentage: ``97.81 %`` matches ``97.81%``, but ``1 %`` does
      not match a bare ``1`` printed somewhere. A rounded figure (``43.6 %`` for an output
      ``43.59%``) does not match: let the cell print the rounded sentence instead.
4. A notebook whose code cells have no outputs at all fails: the check needs executed notebooks
   (the committed ones are; ``make notebooks`` re-executes them).

A failure names the notebook, the markdown cell (index and first heading/line) and each number.
The fix is to let a code cell print the sentence with the number, or, for a true constant, to
add it to ``FIXED_FACTS`` with its reason.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# number text (as written, without the % sign) -> why it is a fixed fact, not a computed result
FIXED_FACTS: dict[str, str] = {
    "105,829": "clips in Speech Commands v2 (Warden 2018)",
    "1.0": "a relative error of 1.0 is, by definition, an error as large as the signal",
    "4,890": "clips in the official Speech Commands v2 test set that MLPerf Tiny scores on",
    "92": "MLPerf Tiny's reported top-1 accuracy of the reference DS-CNN (Banbury et al. 2021)",
    "2,618": "speakers in Speech Commands v2 (Warden 2018)",
    "80": "MLPerf's training recipe mixes background noise into 80 % of the training clips",
    "0.1": "MLPerf's training recipe draws the background-noise volume from [0, 0.1]",
    "0.01": "PyTorch's MovingAverageMinMaxObserver default averaging constant",
    "0.9": "SGD momentum of the course's named departure from TI's recipe (scripts/recipe_compare.py)",
    "1,000": "the number of MLPerf kws01 inputs shipped with the reference artifacts",
}

_STRIP = [
    re.compile(r"```.*?```", re.S),                   # fenced code
    re.compile(r"\$\$.*?\$\$", re.S),                 # display math
    re.compile(r"\$[^$\n]+\$"),                       # inline math
    re.compile(r"`[^`\n]+`"),                         # inline code
    re.compile(r"<!--.*?-->", re.S),                  # HTML comments
    re.compile(r"\]\([^)]*\)"),                       # link targets
    re.compile(r"https?://\S+"),                      # bare URLs
    re.compile(r"arXiv[: ]\s*\d{4}\.\d{4,5}(v\d+)?", re.I),
    re.compile(r"\b(exercises?|sections?|notebooks?)\s+\d+(\.\d+)*", re.I),   # 'Exercise 4.2' is a name
]
# percentages, decimals, thousands-separated counts; not part of a longer token (e.g. 'v0.02', 'int8')
_EXERCISE = re.compile(r"\s*(#{2,4}\s*Exercise\s+\d+\.\d+|##\s*Exercises\b)")
_NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+)(\s?%)?(?![\w.]*\d)(?!\w)")


def result_numbers(markdown: str) -> list[str]:
    """The result-like numbers of one markdown text, as written (without a trailing %)."""
    text = markdown
    for pattern in _STRIP:
        text = pattern.sub(" ", text)
    found = []
    for m in _NUMBER.finditer(text):
        number, percent = m.group(1), m.group(2)
        if percent or "." in number or "," in number:
            found.append(number + "%" if percent else number)
    return found


def _canonical(number: str) -> str:
    """The digits of a number without thousands separators or spaces ('4,896' -> '4896', '9 %' -> '9%')."""
    return number.replace(",", "").replace(" ", "")


def output_numbers(nb: dict) -> set[str]:
    """Every number printed in the notebook's code-cell outputs, canonical form ('97.81%' kept with its %)."""
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if out.get("output_type") == "stream":
                texts.append(_text(out.get("text", "")))
            elif "data" in out:
                texts.append(_text(out["data"].get("text/plain", "")))
    numbers = re.findall(r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(\s?%)?", "\n".join(texts))
    return {_canonical(n) for n, _ in numbers} | {_canonical(n) + "%" for n, pct in numbers if pct}


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def _cell_name(source: str) -> str:
    first = next((line for line in source.splitlines() if line.strip()), "")
    return first.strip()[:70]


def _fixed(number: str) -> bool:
    return _canonical(number).rstrip("%") in {_canonical(k) for k in FIXED_FACTS}


def check_notebook(path: Path) -> list[str]:
    """Messages for every markdown number of one notebook that is neither a fixed fact nor an output."""
    nb = json.loads(path.read_text(encoding="utf-8"))  # plain JSON: no schema validation, fast
    if not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"):
        return [f"{path.name}: no code cell has outputs; execute the notebook before checking its prose"]
    printed = output_numbers(nb)
    problems = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        source = _text(cell["source"])
        if _EXERCISE.match(source):
            continue
        missing = [n for n in result_numbers(source) if not _fixed(n) and _canonical(n) not in printed]
        if missing:
            problems.append(f"{path.name}, cell {index} ({_cell_name(source)!r}): "
                            f"{', '.join(dict.fromkeys(missing))} typed in markdown but printed by no cell")
    return problems


def test_result_numbers_are_found_and_code_is_ignored() -> None:
    text = ("Accuracy 97.81 % on 4,896 clips, 43.6% zeros, 2.7 M MACs, 12 classes, int8, v0.02, Exercise 4.2, "
            "`lr=0.1`, $s/2 = 0.0625$, [paper](https://arxiv.org/abs/1804.03209) arXiv:1804.03209.")
    assert result_numbers(text) == ["97.81%", "4,896", "43.6%", "2.7"]


def test_a_typed_number_fails_and_a_printed_one_passes(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print(...)")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="test accuracy 97.81% on 4896 clips\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("## Results\nWe reach 97.81 % on 4,896 clips, about 96.1 %."), code]
    path = tmp_path / "99_demo.ipynb"
    nbformat.write(nb, path)
    problems = check_notebook(path)
    assert len(problems) == 1 and "cell 0" in problems[0] and "96.1%" in problems[0] and "97.81" not in problems[0]


def test_a_percentage_needs_a_printed_percentage(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print(...)")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1 layer, error 1.233 %\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("The error stays under 1 %; the worst layer has 1.233 %."), code]
    path = tmp_path / "98_demo.ipynb"
    nbformat.write(nb, path)
    problems = check_notebook(path)
    assert len(problems) == 1 and problems[0].endswith("): 1% typed in markdown but printed by no cell")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_numbers_come_from_outputs(path: Path) -> None:
    problems = check_notebook(path)
    assert not problems, ("numbers typed into markdown that no cell prints (let a cell print the sentence, "
                          "or add a true constant to FIXED_FACTS with its reason):\n" + "\n".join(problems))


def test_exercise_statements_are_given_data(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print(...)")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="done\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("### Exercise 6.1 · Scoring\n\nThe detector fires at 1.8 s and 5.5 s."),
                nbformat.v4.new_markdown_cell("As exercise 6.1 shows, 2.5 s is enough."), code]
    path = tmp_path / "97_demo.ipynb"
    nbformat.write(nb, path)
    problems = check_notebook(path)
    assert len(problems) == 1 and "cell 1" in problems[0] and problems[0].endswith("2.5 typed in markdown but printed by no cell")
