# The course's two commands (see README):
#   make course   set up, then run every notebook headless, in order, into output/
#   make test     set up, then run the whole test suite (pytest + nbval on the notebooks)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# Notebooks that quantize: CI runs them a second time on TI's own package.
QUANT_NOTEBOOKS := $(wildcard notebooks/0[456]_*.ipynb)
# TI's tinyml_torchmodelopt 1.4.0: a wheel beside the repository (offline), else TI's GitHub at
# the commit the wheel was built from.
TI_WHEEL := $(firstword $(wildcard ../shared/vendor/tinyml_torchmodelopt-1.4.0-*.whl))
TI_REPO := https://github.com/TexasInstruments/tinyml-tensorlab.git
TI_COMMIT := ca0ef4793f56158d5e768ef58cd2dfda9f56499b
TI_GIT := tinyml_torchmodelopt @ git+$(TI_REPO)@$(TI_COMMIT)\#subdirectory=tinyml-modeloptimization/torchmodelopt
HAS_TI = $(BIN)/python -c "import tinyml_torchmodelopt" 2>/dev/null

.PHONY: setup data course test lab notebooks benchmarks clean

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

# Unit tests (TEST_WORKERS processes of one thread each: most tests are too small to use two
# threads, so two processes finish them in about two thirds of the time), then every notebook under
# nbval, one after the other (later notebooks load what earlier ones saved), on the small CI profile
# and the offline dataset (on TI's package where it is installed: KWS_QUANT_BACKEND=auto); then the
# quantization notebooks again on the course's stand-in kws_utils.quant, so both backends run them.
# The second pass skips the cells tagged both-backends, which run both packages anyway
# (notebooks/conftest.py).
TEST_WORKERS ?= 2
test: setup
	KWS_PROFILE=ci KWS_DATASET=$${KWS_DATASET:-synthetic} OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q \
	  --durations=15 -n $(TEST_WORKERS) --dist loadfile tests
	KWS_PROFILE=ci KWS_DATASET=$${KWS_DATASET:-synthetic} $(BIN)/python -m pytest -q --durations=15 \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 notebooks
	@if $(HAS_TI); then \
	  echo "== notebooks 04-06 again on the course's kws_utils.quant (KWS_QUANT_BACKEND=course)"; \
	  KWS_NBVAL_SECOND_PASS=1 KWS_QUANT_BACKEND=course KWS_PROFILE=ci KWS_DATASET=$${KWS_DATASET:-synthetic} $(BIN)/python -m pytest -q \
	    --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 $(QUANT_NOTEBOOKS); \
	else \
	  echo "TI's tinyml_torchmodelopt is not installed: notebooks 04-06 ran on kws_utils.quant only."; \
	fi

lab: setup
	$(BIN)/jupyter lab notebooks/

# Maintainers: re-execute the committed notebooks in place on the default profile, then write
# each notebook's measured time into its first cell and the README.
notebooks: setup
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$$nb" || exit 1; \
	done
	$(BIN)/python scripts/notebook_times.py   # the stated times are this run's

benchmarks: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf output
