"""Per-notebook run times from the committed outputs' cell timestamps, written where they are stated.

Each notebook's first cell and the README's "Open it anywhere" table state how long the notebook
takes. Those times are measured, never typed: after `make notebooks` (a clean top-to-bottom run on
the default profile), this script reads the execution timestamps nbconvert stored in every code cell
and rewrites both places; `--check` only reports a disagreement (tests/test_notebooks_setup.py runs
the same comparison).

    python scripts/notebook_times.py            # rewrite the time lines and the README table
    python scripts/notebook_times.py --check    # exit 1 if a stated time differs from the outputs
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kws_utils import files  # noqa: E402

# Where a first run does more than the timed run did (the timed run had both already built).
FIRST_RUN = {
    "01": (" A first run also generates the offline dataset (minutes on 2 cores: about eight on the default "
           "profile, most of it rendering the neural voices once)."),
    "03": " A first run also computes the MFCC feature cache.",
}
TIME_LINE = re.compile(r"\*\*Time:\*\*[^\n]*")


def _stamp(text: str) -> dt.datetime:
    """Parse one of Jupyter's ISO timestamps ('...Z')."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def run_seconds(nb: nbformat.NotebookNode) -> float | None:
    """Seconds from the first code cell's start to the last one's reply; None without timestamps."""
    runs = [c.metadata.get("execution", {}) for c in nb.cells if c.cell_type == "code"]
    if not runs or not all("iopub.execute_input" in r and "shell.execute_reply" in r for r in runs):
        return None
    return (_stamp(runs[-1]["shell.execute_reply"]) - _stamp(runs[0]["iopub.execute_input"])).total_seconds()


def exact(seconds: float) -> str:
    """'42 s' or '4 min 58 s'."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


def rounded(seconds: float) -> str:
    """What a learner plans with: 'under 1 minute (42 s)' or 'about 5 minutes (4 min 58 s)'."""
    if seconds < 60:
        return f"under 1 minute ({exact(seconds)})"
    minutes = max(1, round(seconds / 60))
    return f"about {minutes} minute{'s' if minutes > 1 else ''} ({exact(seconds)})"


def time_line(key: str, seconds: float) -> str:
    """The '**Time:**' sentence of notebook ``key`` ('01'...)."""
    return (f"**Time:** {rounded(seconds)} on a 2-core CPU with the default profile, the dataset and the "
            f"feature cache already built.{FIRST_RUN.get(key, '')} GPU times are not measured yet.")


def readme_row(line: str, seconds: float) -> str:
    """A README table row '| 0N | badge | time | gpu |' with its CPU time replaced."""
    cells = line.split(" | ")
    cells[2] = exact(seconds)
    return " | ".join(cells)


def main() -> int:
    """Rewrite (or with --check, compare) every stated notebook time; 1 if --check finds a mismatch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report mismatches, change nothing")
    args = parser.parse_args()
    readme_path = REPO / "README.md"
    old_readme = readme_path.read_text()
    readme = old_readme.splitlines(keepends=True)
    mismatches, total = [], 0.0
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        key, nb = path.name[:2], nbformat.read(path, as_version=4)
        seconds = run_seconds(nb)
        if seconds is None:
            mismatches.append(f"{path.name}: a code cell has no execution timestamps; run `make notebooks`")
            continue
        total += seconds
        first = nb.cells[0]
        wanted = time_line(key, seconds)
        stated = TIME_LINE.search(first.source).group(0)
        if stated != wanted:
            mismatches.append(f"{path.name}: first cell said {stated!r}, the run took {exact(seconds)}")
            first.source = TIME_LINE.sub(lambda _: wanted, first.source)
            if not args.check:
                with files.atomic_path(path) as tmp:
                    nbformat.write(nb, str(tmp))
        for i, line in enumerate(readme):
            if line.startswith(f"| {key} | [![Open In Colab]"):
                readme[i] = readme_row(line, seconds)
    print(f"the notebooks add up to {exact(total)}")
    new_readme = "".join(readme)
    if new_readme != old_readme:
        mismatches.append("README.md: the time table differs from the notebooks' timestamps")
        if not args.check:
            files.write_text(readme_path, new_readme)
    for m in mismatches:
        print(("MISMATCH " if args.check else "updated ") + m)
    return 1 if args.check and mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
