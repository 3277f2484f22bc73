#!/usr/bin/env bash
# `make test`: the unit tests, every notebook under nbval, then notebook 04 on the course's package.
#
# The unit tests run in TEST_WORKERS processes of one thread each: most tests are too small to use
# two threads, so two processes finish them in about two thirds of the time (302 s against 467 s
# on a 2-core machine). Then every notebook runs in order (later ones load what earlier ones saved)
# on the small CI profile and the offline dataset, on TI's package where it is installed
# (KWS_QUANT_BACKEND=auto). Then notebook 04, which drives the quantization package's classes
# step by step, runs again on the course's stand-in kws_utils.quant, skipping the cells tagged
# both-backends (notebooks/conftest.py). Notebook 05 needs no second pass: its cells that compare
# the packages run both side by side (tagged both-backends), and the unit tests run every
# quantization function on both backends. Notebook 06 uses no quantization package: it reads the
# exported integer ONNX files. The notebooks share no cores with the unit tests: beside them,
# notebooks 01-04 took three times as long. The CI profile's data (the offline dataset with its
# neural voices, the MFCC caches, the real-audio features) is made first, on both cores: otherwise
# the first unit test that needs it makes it in a one-thread worker (121 s on 2026-12-02).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export KWS_PROFILE=ci KWS_DATASET=${KWS_DATASET:-synthetic}
NBVAL=(--nbval-lax --nbval-current-env --nbval-cell-timeout=1800)

echo "== the CI profile's data"
"$BIN/python" scripts/prepare_data.py
data_rc=$?
echo "== unit tests"
OMP_NUM_THREADS=1 "$BIN/python" -m pytest -q --durations=15 -n "${TEST_WORKERS:-2}" --dist loadfile tests
unit_rc=$?
echo "== notebooks, in order"
"$BIN/python" -m pytest -q --durations=15 "${NBVAL[@]}" notebooks
notebooks_rc=$?
second_rc=0
if "$BIN/python" -c "import tinyml_torchmodelopt" 2>/dev/null; then
  echo "== notebook 04 again on the course's kws_utils.quant (KWS_QUANT_BACKEND=course)"
  KWS_NBVAL_SECOND_PASS=1 KWS_QUANT_BACKEND=course "$BIN/python" -m pytest -q "${NBVAL[@]}" \
    notebooks/04_*.ipynb
  second_rc=$?
else
  echo "TI's tinyml_torchmodelopt is not installed: the notebooks ran on kws_utils.quant only."
fi
echo "== exit codes: data $data_rc, unit tests $unit_rc, notebooks $notebooks_rc, second pass $second_rc"
[ "$data_rc" -eq 0 ] && [ "$unit_rc" -eq 0 ] && [ "$notebooks_rc" -eq 0 ] && [ "$second_rc" -eq 0 ]
