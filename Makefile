# The course's two commands (see README):
#   make course   set up, then run every notebook headless, in order, into output/
#   make test     set up, then run the whole test suite (pytest + nbval on the notebooks)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: setup course test lab notebooks benchmarks clean

# Headless runs print Netron's command instead of starting its server (`make lab` embeds it).
course test notebooks: export KWS_NETRON ?= print

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

# The full course on the default profile; executed copies go to output/notebooks/.
course: setup
	mkdir -p output/notebooks
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --output-dir output/notebooks "$$nb" || exit 1; \
	done
	@echo "Executed notebooks in output/notebooks/, artifacts in output/artifacts/."

# Unit tests, then every notebook under nbval on the small CI profile and the offline dataset.
test: setup
	KWS_PROFILE=ci KWS_DATASET=$${KWS_DATASET:-synthetic} $(BIN)/python -m pytest -q \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 tests notebooks

lab: setup
	$(BIN)/jupyter lab notebooks/

# Maintainers: re-execute the committed notebooks in place on the default profile.
notebooks: setup
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$$nb" || exit 1; \
	done

benchmarks: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf output
