#!/usr/bin/env bash
# The one prepared GPU run (sized for 8 to 9 minutes on one H100/H200, no network needed):
#   1. installs xformers, diffusers, torch-fidelity from a local wheel folder (default .whl/);
#   2. checks every autotuning candidate of the Triton kernel, pinned in turn, and both backward schemes,
#      on two mixed rows (python -m bench kernel-check: one CSV row per pair, a crash recorded and passed);
#      the configs found wrong are left out of the rest (INTERVAL_ATTENTION_EXCLUDE), and if some went
#      unchecked (out of time, or a try that made no progress), the TMA candidates too
#      (INTERVAL_ATTENTION_TMA=0);
#   3. checks every attention backend on CUDA, forward and backward, against a float64 reference
#      (pytest -m gpu, in parallel processes: compiles are CPU-bound); the log goes to gpu_tests.txt;
#   4. runs the GPU attention sweep into results/gpu/ (CSV, autotuning log, provenance, summary); once
#      the headline shape (L = 8192) is measured, the same process checks the Triton configs its
#      autotuner chose there, both schemes, against a float32 reference: what it timed is what is checked
#      (and again at L = 8192 for D = 64 and for float16, which the autotuner tunes apart);
#   5. profiles one forward+backward of triton (heaviest-first and natural launch order, at the sweep's
#      shape and on one row of 8 heads; split and atomic backward scheme), flex and xformers at L = 8192
#      per kernel (kernel_breakdown.csv).
# Plots are redrawn from the CSV afterwards (python -m bench plots results/gpu), so $OUT stays small.
# Prepare the wheel folder on a machine with PyPI access (see README, "GPU run").
# Set TRANSFUSION_COMMIT to the commit being measured when the tree travels without .git.
set -uo pipefail
WHEELS=${WHEELS:-.whl}
RESULTS=${RESULTS:-results/gpu}
# Phase limits (timeouts for the checks, the tests and the breakdown), sized so that with the install and
# the summary the run fits TOTAL_S, inside the device tool's 10-minute per-command limit. The sweep gets
# the time the phases before it left (SWEEP_MIN_S to SWEEP_MAX_S; SWEEP_BUDGET_S fixes it): its budget is
# when it stops starting configurations (at 964f110, 130 s measured 76 of the 140).
TOTAL_S=${TOTAL_S:-540}
SWEEP_MIN_S=${SWEEP_MIN_S:-120}
SWEEP_MAX_S=${SWEEP_MAX_S:-300}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-70}  # every candidate compiles once; a crashed pair costs a restart
BREAKDOWN_TIMEOUT_S=${BREAKDOWN_TIMEOUT_S:-70}
begin=$(date +%s)
TEST_WORKERS=${TEST_WORKERS:-8}
# Every backend through attend first (the issue's per-backend check), then the kernel's own long list.
GPU_TESTS=${GPU_TESTS:-tests/test_attention.py tests/test_xformers_decomposition.py tests/test_triton_kernel.py tests/test_work_order.py}
SEQ_LENS=${SEQ_LENS:-}  # e.g. 2048,8192,32768 to shorten the sweep
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target /tmp/tfb-site \
    xformers diffusers torch-fidelity importlib_metadata || { echo "wheel install failed"; exit 1; }
  # the project first: torch-fidelity's wheel ships a top-level `tests` package of its own (from the
  # repository root the working directory already comes first; this holds from anywhere)
  export PYTHONPATH=$PWD:/tmp/tfb-site
else
  echo "no wheels in $WHEELS: xformers/diffusers must already be installed"
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$(date +%s)
CHECK_CSV=$RESULTS/kernel_check.csv
# Checks of earlier runs must not be read beside this one's (the summary and plots read every
# kernel_check*.csv in the folder).
shopt -s nullglob
old_checks=("$RESULTS"/kernel_check*.csv "$RESULTS"/kernel_check*.running "$RESULTS"/kernel_check*_provenance.json)
shopt -u nullglob
if [ "${#old_checks[@]}" -gt 0 ]; then
  echo "removing an earlier run's checks from $RESULTS: ${old_checks[*]}"
  rm -f -- "${old_checks[@]}"
fi
# shellcheck source=bench/gpu_check_loop.sh
source "$(dirname "$0")/gpu_check_loop.sh"
# Pinned candidates first (under CUDA_LAUNCH_BLOCKING=1 an illegal access surfaces at its own launch): the
# sweep's autotuner would pick a fast config even if it were wrong.
echo "== every candidate config, pinned, both backward schemes" | tee "$RESULTS/gpu_tests.txt"
CUDA_LAUNCH_BLOCKING=1 kernel_check_loop "$CHECK_CSV" "$CHECK_TIMEOUT_S" --layout mixed --heads 2 --tma auto \
  | tee -a "$RESULTS/gpu_tests.txt"
config_rc=${PIPESTATUS[0]}
# The configs found wrong (a failed pair's culprit; a crashed pair's configs that passed nowhere) are left
# out of everything that follows. Out of time, with candidates unchecked: the TMA ones go too.
if ! exclude=$(python3 -m bench kernel-check --exclusions-from "$RESULTS"); then
  echo "could not read the checks' exclusions: treating the candidates as unchecked" | tee -a "$RESULTS/gpu_tests.txt"
  exclude="" config_rc=124
fi
if [ -n "$exclude" ]; then
  echo "leaving out the configs found wrong: INTERVAL_ATTENTION_EXCLUDE='$exclude'" | tee -a "$RESULTS/gpu_tests.txt"
  export INTERVAL_ATTENTION_EXCLUDE=$exclude
fi
if [ "$config_rc" -eq 124 ]; then
  echo "some candidates went unchecked: the rest runs with INTERVAL_ATTENTION_TMA=0" \
    | tee -a "$RESULTS/gpu_tests.txt"
  export INTERVAL_ATTENTION_TMA=0
fi
echo "config checks: exit $config_rc after $(( $(date +%s) - start )) s"
# Everything else with the kernels' default configs pinned (no autotuning compiles in this phase), in
# parallel processes where pytest-xdist is installed.
echo "== every backend against the float64 reference" | tee -a "$RESULTS/gpu_tests.txt"
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n $TEST_WORKERS"
# shellcheck disable=SC2086
INTERVAL_ATTENTION_AUTOTUNE=0 timeout "$TEST_TIMEOUT_S" python3 -m pytest -m gpu -v -p no:cacheprovider \
  --timeout 120 -rfEs $workers -k "not every_candidate" $GPU_TESTS 2>&1 | tee -a "$RESULTS/gpu_tests.txt"
test_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $test_rc after $(( $(date +%s) - start )) s"

# What is left of TOTAL_S, less the breakdown and 60 s: the last configuration, a kernel check of its
# configs if it is one of the three shapes the sweep checks (bench attention --kernel-check), the summary
# and the copy.
left=$(( TOTAL_S - ($(date +%s) - begin) - BREAKDOWN_TIMEOUT_S - 60 ))
left=$(( left < SWEEP_MIN_S ? SWEEP_MIN_S : (left > SWEEP_MAX_S ? SWEEP_MAX_S : left) ))
echo "sweep budget: ${SWEEP_BUDGET_S:-$left} s"
python3 -m bench attention --profile gpu --out "$RESULTS" --budget-s "${SWEEP_BUDGET_S:-$left}" --kernel-check \
  ${SEQ_LENS:+--seq-lens "$SEQ_LENS"} 2>&1 \
  | grep -v "it/s\]$\|UserWarning\|run_backward" | tail -n 40
sweep_rc=${PIPESTATUS[0]}
echo "sweep: exit $sweep_rc after $(( $(date +%s) - start )) s"
timeout "$BREAKDOWN_TIMEOUT_S" python3 -m bench breakdown \
  --backends triton,triton-split,triton-atomic,triton-natural,triton-1row,triton-natural-1row,flex,xformers \
  --out "$RESULTS" 2>&1 \
  | grep -v "^USDT\|gpuGetDeviceCount"
echo "breakdown: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
python3 -m bench summary "$RESULTS" || true

if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files from $OUT
  # The summary is rebuilt from the CSVs afterwards (python -m bench summary), so it stays behind.
  cp "$RESULTS"/attention.csv "$RESULTS"/attention_provenance.json "$RESULTS"/gpu_tests.txt \
     "$RESULTS"/kernel_tuning.csv "$RESULTS"/kernel_breakdown.csv "$RESULTS"/kernel_breakdown_provenance.json \
     "$CHECK_CSV" "$OUT"/ 2>/dev/null  # 7 files, and the caller's tee'd log
fi
exit $(( config_rc != 0 || test_rc != 0 || sweep_rc != 0 ))
