# The course's two commands (see README):
#   make course   set up, then run every notebook headless, in order, into output/
#   make test     set up, then run the whole test suite (pytest + nbval on the notebooks)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# TI's tinyml_torchmodelopt 1.4.0: a wheel beside the repository (offline), else TI's GitHub at
# the commit the wheel was built from.
TI_WHEEL := $(firstword $(wildcard ../shared/vendor/tinyml_torchmodelopt-1.4.0-*.whl))
TI_REPO := https://github.com/TexasInstruments/tinyml-tensorlab.git
TI_COMMIT := ca0ef4793f56158d5e768ef58cd2dfda9f56499b
TI_GIT := tinyml_torchmodelopt @ git+$(TI_REPO)@$(TI_COMMIT)\#subdirectory=tinyml-modeloptimization/torchmodelopt

.PHONY: setup data course test lab notebooks inputs benchmarks clean

# Headless runs print Netron's command instead of starting its server (`make lab` embeds it).
course test notebooks: export KWS_NETRON ?= print

setup: $(STAMP)

# --no-compile: Python compiles each module on its first import, not all of torch up front (40 s).
$(STAMP): requirements.txt requirements-ti.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -r requirements.txt
	@if [ -n "$(TI_WHEEL)" ]; then \
	  echo "Installing TI's tinyml_torchmodelopt from $(TI_WHEEL)"; \
	  $(BIN)/pip install --quiet -r requirements-ti.txt && \
	  $(BIN)/pip install --quiet --no-deps "$(TI_WHEEL)"; \
	elif timeout 20 git ls-remote $(TI_REPO) HEAD >/dev/null 2>&1; then \
	  echo "Installing TI's tinyml_torchmodelopt from GitHub at $(TI_COMMIT)"; \
	  $(BIN)/pip install --quiet -r requirements-ti.txt && \
	  $(BIN)/pip install --quiet --no-deps "$(TI_GIT)"; \
	else \
	  echo "TI's tinyml_torchmodelopt is not available (no wheel in ../shared/vendor, GitHub unreachable): the course uses kws_utils.quant."; \
	fi
	touch $(STAMP)

# The dataset, feature caches and real-audio features of the active profile (KWS_PROFILE), made
# ahead of a session: `KWS_PROFILE=workshop make data` the evening before a workshop.
data: setup
	$(BIN)/python scripts/prepare_data.py

# The full course on the default profile; executed copies go to output/notebooks/.
course: setup
	mkdir -p output/notebooks
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --output-dir output/notebooks "$$nb" || exit 1; \
	done
	@echo "Executed notebooks in output/notebooks/, artifacts in output/artifacts/."

# The unit tests (two processes), every notebook in order under nbval on the small CI profile, then
# notebook 04 again on the course's kws_utils.quant; scripts/test_all.sh says why.
test: setup
	BIN=$(BIN) scripts/test_all.sh

lab: setup
	$(BIN)/jupyter lab notebooks/

# Maintainers: re-execute the committed notebooks in place on the default profile, then write
# each notebook's measured time into its first cell and the README. First check that the results
# files the notebooks print are there (scripts/notebook_inputs.py says how to make them).
notebooks: setup
	$(BIN)/python scripts/notebook_inputs.py
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$$nb" || exit 1; \
	done
	$(BIN)/python scripts/notebook_times.py   # the stated times are this run's

# Maintainers: make the results files `make notebooks` needs, in order, resumable (hours on 2 cores).
# Notebook 03 must have run on the default profile first (scripts/notebook_inputs.py says so).
inputs: setup
	$(BIN)/python scripts/notebook_inputs.py --run

benchmarks: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf output
