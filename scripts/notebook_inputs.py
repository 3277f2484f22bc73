"""The results files that the committed notebooks print, and the command that makes each.

Notebooks 03 and 05 print tables written by scripts that take too long to run inside a notebook
(minutes to an hour on 2 cores). Re-executed without those files, a notebook prints "not run yet"
where the table was, and committing it would lose the table. `make notebooks` runs this check first.
Order matters: int2_recipes.py starts from notebook 03's model, so for a fresh machine run notebooks
01-03 (default profile), then the commands this script prints, then `make notebooks`.

    python scripts/notebook_inputs.py        # list what is missing; exit 1 if anything is
    python scripts/notebook_inputs.py --run  # make what is missing, in order (hours on 2 cores); resumable

``--run`` runs the missing commands one after the other, each alone on the machine (their results
record times and thread counts), and stops at the first that fails. Files already there are kept, so
an interrupted run goes on where it stopped. It refuses to start the rows that train from notebook
03's model before that model exists: they would start from a short stand-in.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kws_utils import config  # noqa: E402

# The distillation trains on the CI profile's cached synthetic views: prepare_data.py makes them (once).
DISTILL = ("KWS_PROFILE=ci python scripts/prepare_data.py && "
           "python scripts/distill_reference.py --bits 2 --seeds 0 1 2 3 4 --threads 2")   # 5 seeds, 1-2 min each
# (results file under config.output_dir() for the default profile and the offline dataset,
#  the notebook that prints it, the command that writes it)
INPUTS = (
    ("offline_data_choice.json", "03", "python scripts/choose_offline_data.py"),
    ("offline_data_levers.json", "03", "python scripts/choose_offline_data.py --levers"),
    ("recipe_compare/default_synthetic.json", "03", "KWS_PROFILE=default python scripts/recipe_compare.py"),
    ("int2_qat_lr/default_synthetic.json", "05", "KWS_PROFILE=default python scripts/choose_int2_qat_lr.py --threads 1"),
    ("int2_recipes/default_synthetic.json", "05", "KWS_PROFILE=default python scripts/int2_recipes.py --threads 2"),
    ("bench_ptq_real.json", "05", "KWS_BENCH_THREADS=2 python benchmarks/bench_ptq_real.py"),
    ("distill_reference_int2_edges_dw.json", "05",
     f"{DISTILL} --keep-8bit edges_dw --name distill_reference_int2_edges_dw"),
    *((f"distill_reference_int2_copies_lr5e-4_e{n}.json", "05",
       f"{DISTILL} --calib-copies 4 --lr 0.0005 --epochs {n} --name distill_reference_int2_copies_lr5e-4_e{n}")
      for n in (3, 5, 10)),
    ("distill_reference_int2_copies_lr5e-4_e5_requant.json", "05",
     f"{DISTILL} --calib-copies 4 --lr 0.0005 --epochs 5 --requant "
     "--name distill_reference_int2_copies_lr5e-4_e5_requant"),
)


def missing(root: Path | None = None) -> list[tuple[str, str, str]]:
    """The (file, notebook, command) rows of INPUTS whose file is not under ``root`` (the output folder)."""
    root = config.output_dir() if root is None else root
    return [row for row in INPUTS if not (root / row[0]).is_file()]


# Results files that start from notebook 03's saved model (default profile, offline dataset).
FROM_NOTEBOOK_03 = ("int2_qat_lr/default_synthetic.json", "int2_recipes/default_synthetic.json")


def notebook03_model(root: Path | None = None) -> Path:
    """Notebook 03's checkpoint on the default profile and the offline dataset, under ``root``."""
    root = config.output_dir() if root is None else root
    return root / "artifacts" / "default" / "synthetic" / "kws_float_synthetic.pth"


def run_missing(root: Path | None = None) -> int:
    """Run the commands of the missing files in INPUTS' order; the first failing exit code, else 0."""
    root = config.output_dir() if root is None else root
    todo = missing(root)
    if any(name in FROM_NOTEBOOK_03 for name, _, _ in todo) and not notebook03_model(root).is_file():
        print(f"{notebook03_model(root)} is missing: run notebooks 01-03 on the default profile first "
              "(KWS_PROFILE=default make notebooks stops here, so execute 03 on its own), then --run again.")
        return 1
    # `python` in a command is this interpreter (the course's .venv when run through make).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for i, (name, _, command) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: {command}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(["bash", "-c", command], cwd=REPO, env=env).returncode
        print(f"[{i}/{len(todo)}] exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            return code
        if not (root / name).is_file():
            print(f"{command} ended without writing {root / name}")
            return 1
    return 0


def main() -> int:
    """Print the missing results files with their commands (or run them); 1 if any is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the missing commands in order")
    if parser.parse_args().run:
        return run_missing()
    absent = missing()
    for name, notebook, command in absent:
        print(f"missing {config.output_dir() / name} (notebook {notebook} prints it): {command}")
    if absent:
        print("Re-executing the notebooks now would commit 'not run yet' in place of those tables. Order: "
              "notebooks 01-03 on the default profile first (int2_recipes.py starts from notebook 03's model), "
              "then the commands above, then make notebooks.")
    return 1 if absent else 0


if __name__ == "__main__":
    sys.exit(main())
