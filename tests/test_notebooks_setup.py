"""Every notebook opens anywhere: Colab badge and time first, then the set-up cell; no .venv paths."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import nbformat
import pytest

from kws_utils import config

# KWS_NOTEBOOKS_DIR checks another copy (e.g. one patched by a script) instead of the repository's.
NOTEBOOKS = Path(os.environ.get("KWS_NOTEBOOKS_DIR", config.REPO_ROOT / "notebooks"))
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
INSTALL = f"kws_utils @ git+{config.COURSE_REPO_URL}.git@{config.COURSE_BRANCH}"


def test_all_seven_notebooks_are_there() -> None:
    assert [p.name[:2] for p in PATHS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_badge_and_time_come_first(path: Path) -> None:
    first = nbformat.read(path, as_version=4).cells[0]
    repo = config.COURSE_REPO_URL.removeprefix("https://github.com/")
    colab = (f"https://colab.research.google.com/github/{repo}/blob/{config.COURSE_BRANCH}/"
             f"notebooks/{path.name}")
    assert first.cell_type == "markdown" and "[![Open In Colab]" in first.source
    assert f"]({colab})" in first.source
    assert re.search(r"\*\*Time:\*\* .*\d.* 2-core CPU", first.source)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_setup_cell_installs_only_when_missing_and_prints_the_device(path: Path) -> None:
    cell = nbformat.read(path, as_version=4).cells[1]
    assert cell.cell_type == "code"
    assert 'find_spec("kws_utils") is None' in cell.source and INSTALL in cell.source
    out = io.StringIO()
    with contextlib.redirect_stdout(out):   # kws_utils is installed here: nothing is installed
        exec(compile(cell.source, f"{path.name}[1]", "exec"), {})
    assert out.getvalue().startswith(f"device: {config.device()} ")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_no_virtualenv_paths_and_real_data_can_download(path: Path) -> None:
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        assert ".venv/bin" not in cell.source, f"{path.name} cell {i} names a .venv/bin path"
        if cell.cell_type == "code":
            # A check of the local folder alone would skip where a download could have worked.
            assert not re.search(r"mlperf_dir\(\)[^\n]*\.is_(dir|file)\(\)", cell.source), \
                f"{path.name} cell {i}: use mlperf.available() for the real-data cells"


def _times_script():
    """scripts/notebook_times.py, imported as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("notebook_times",
                                                  config.REPO_ROOT / "scripts" / "notebook_times.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_stated_time_is_the_committed_run_time(path: Path) -> None:
    times = _times_script()
    nb = nbformat.read(path, as_version=4)
    seconds = times.run_seconds(nb)
    assert seconds is not None, f"{path.name}: committed without execution timestamps (run make notebooks)"
    assert times.time_line(path.name[:2], seconds) in nb.cells[0].source, \
        f"{path.name}: the stated time is not the run's; python scripts/notebook_times.py rewrites it"
    if NOTEBOOKS == config.REPO_ROOT / "notebooks":
        readme = (config.REPO_ROOT / "README.md").read_text()
        row = next(line for line in readme.splitlines() if line.startswith(f"| {path.name[:2]} | [![Open"))
        assert f" | {times.exact(seconds)} | " in row, f"README's time for {path.name} is not the run's"


def test_time_formatting() -> None:
    times = _times_script()
    assert times.rounded(4.4) == "under 1 minute (4 s)"
    assert times.rounded(298) == "about 5 minutes (4 min 58 s)"
    assert times.rounded(61) == "about 1 minute (1 min 1 s)"


def _stores_names(source: str) -> list[str]:
    """Names a cell assigns, defines or imports: what later cells could depend on."""
    import ast
    stored = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            stored.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stored.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            stored += [a.asname or a.name for a in node.names]
    return stored


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_cells_skipped_in_the_second_ci_pass_leave_no_state(path: Path) -> None:
    # make test's second pass deselects these cells (notebooks/conftest.py): later cells must not need them.
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if "both-backends" in cell.metadata.get("tags", []):
            assert cell.cell_type == "code", f"{path.name} cell {i}"
            assert not _stores_names(cell.source), f"{path.name} cell {i} defines {_stores_names(cell.source)}"


def test_the_state_check_sees_an_assignment() -> None:
    assert _stores_names("x = 1\nprint(x)") == ["x"] and not _stores_names("print(f(1))")


def test_notebook_inputs_names_files_the_notebooks_read(tmp_path: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(config.REPO_ROOT / "scripts"))
    inputs = importlib.import_module("notebook_inputs")
    for name, number, command in inputs.INPUTS:
        notebook = nbformat.read(next(NOTEBOOKS.glob(f"{number}_*.ipynb")), as_version=4)
        assert Path(name).parts[0] in "".join(c.source for c in notebook.cells), (name, number)
        for script in command.split("python ")[1:]:   # every script the command runs
            assert (config.REPO_ROOT / script.split()[0]).is_file(), command
    assert inputs.missing(tmp_path) == list(inputs.INPUTS)
    for name, _, _ in inputs.INPUTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert inputs.missing(tmp_path) == []


def test_notebook_inputs_run_makes_what_is_missing_in_order_and_stops_at_a_failure(monkeypatch, tmp_path: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(config.REPO_ROOT / "scripts"))
    inputs = importlib.import_module("notebook_inputs")
    log = tmp_path / "order.txt"
    write = "python -c \"import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, " \
            f"exist_ok=True); p.write_text('{{}}'); open(r'{log}', 'a').write(sys.argv[1] + ' ')\" {tmp_path}/"
    rows = (("a.json", "03", write + "a.json"), (inputs.FROM_NOTEBOOK_03[0], "05", write + inputs.FROM_NOTEBOOK_03[0]),
            ("c.json", "05", "exit 3"), ("d.json", "05", write + "d.json"))
    monkeypatch.setattr(inputs, "INPUTS", rows)
    assert inputs.run_missing(tmp_path) == 1 and not log.exists()   # notebook 03's model first
    model = inputs.notebook03_model(tmp_path)
    model.parent.mkdir(parents=True)
    model.write_text("")
    assert inputs.run_missing(tmp_path) == 3   # the failing command's exit code; d.json never ran
    assert log.read_text().split() == [str(tmp_path / "a.json"), str(tmp_path / inputs.FROM_NOTEBOOK_03[0])]
    assert not (tmp_path / "d.json").exists()
    monkeypatch.setattr(inputs, "INPUTS", rows[:2] + rows[3:])
    assert inputs.run_missing(tmp_path) == 0   # resumes: only d.json is made this time
    assert log.read_text().split()[2:] == [str(tmp_path / "d.json")]
    monkeypatch.setattr(inputs, "INPUTS", (("e.json", "03", "true"),))
    assert inputs.run_missing(tmp_path) == 1   # a command that writes nothing is a failure
