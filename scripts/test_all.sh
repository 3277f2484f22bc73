#!/usr/bin/env bash
# `make test`: the unit tests beside the first notebook pass, then the second notebook pass.
#
# A notebook kernel keeps about 1.3 of 2 cores busy, so the unit tests run beside the notebooks
# (TEST_WORKERS processes of one thread each) instead of before them. They get their own data and
# output folders, so they never write a file a notebook reads. The notebooks run one after the
# other (later ones load what earlier ones saved) on the small CI profile and the offline dataset,
# on TI's package where it is installed (KWS_QUANT_BACKEND=auto); then the quantization notebooks
# run again on the course's stand-in kws_utils.quant, so both backends run them. The second pass
# skips the cells tagged both-backends, which run both packages anyway (notebooks/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export KWS_PROFILE=ci KWS_DATASET=${KWS_DATASET:-synthetic}
NBVAL=(--nbval-lax --nbval-current-env --nbval-cell-timeout=1800)
QUANT_NOTEBOOKS=(notebooks/0[456]_*.ipynb)
scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$scratch"' EXIT

KWS_DATA_ROOT="$scratch/data" KWS_OUTPUT="$scratch/output" OMP_NUM_THREADS=1 \
  "$BIN/python" -m pytest -q --durations=15 -n "${TEST_WORKERS:-1}" --dist loadfile \
  --basetemp="$scratch/pytest" tests > "$scratch/unit.log" 2>&1 &
unit_pid=$!
echo "== unit tests started in the background (log printed when they end)"
echo "== notebooks, in order"
"$BIN/python" -m pytest -q --durations=15 "${NBVAL[@]}" notebooks
notebooks_rc=$?
wait "$unit_pid"
unit_rc=$?
echo "== unit tests"
cat "$scratch/unit.log"
second_rc=0
if "$BIN/python" -c "import tinyml_torchmodelopt" 2>/dev/null; then
  echo "== notebooks 04-06 again on the course's kws_utils.quant (KWS_QUANT_BACKEND=course)"
  KWS_NBVAL_SECOND_PASS=1 KWS_QUANT_BACKEND=course "$BIN/python" -m pytest -q "${NBVAL[@]}" \
    "${QUANT_NOTEBOOKS[@]}"
  second_rc=$?
else
  echo "TI's tinyml_torchmodelopt is not installed: notebooks 04-06 ran on kws_utils.quant only."
fi
echo "== exit codes: unit tests $unit_rc, notebooks $notebooks_rc, second pass $second_rc"
[ "$unit_rc" -eq 0 ] && [ "$notebooks_rc" -eq 0 ] && [ "$second_rc" -eq 0 ]
