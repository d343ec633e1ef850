#!/usr/bin/env bash
# The one prepared GPU run (about 8 minutes on one H100/H200, no network needed):
#   1. installs xformers, diffusers, torch-fidelity from a local wheel folder (default .whl/);
#   2. checks every attention backend on CUDA, forward and backward, against a float64 reference
#      (pytest -m gpu), log in results/gpu/gpu_tests.txt;
#   3. runs the GPU attention sweep into results/gpu/ (CSV, provenance, plots).
# Prepare the wheel folder on a machine with PyPI access (see README, "GPU run").
# Set TRANSFUSION_COMMIT to the commit being measured when the tree travels without .git.
set -uo pipefail
WHEELS=${WHEELS:-.whl}
RESULTS=${RESULTS:-results/gpu}
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-240}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-200}
GPU_TESTS=${GPU_TESTS:-tests/test_attention.py tests/test_xformers_decomposition.py tests/test_triton_kernel.py}
SEQ_LENS=${SEQ_LENS:-}  # e.g. 2048,8192,32768 to shorten the sweep
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target /tmp/tfb-site \
    xformers diffusers torch-fidelity importlib_metadata || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/tfb-site:$PWD
else
  echo "no wheels in $WHEELS: xformers/diffusers must already be installed"
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$(date +%s)
# shellcheck disable=SC2086
# Correctness needs no autotuning (every candidate config was checked once, see kernels/): pin the
# kernels' default configs so the test phase does not compile each candidate.
INTERVAL_ATTENTION_AUTOTUNE=0 timeout "$TEST_TIMEOUT_S" python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 -rfEs $GPU_TESTS 2>&1 \
  | tee "$RESULTS/gpu_tests.txt"
test_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $test_rc after $(( $(date +%s) - start )) s"

python3 -m bench attention --profile gpu --out "$RESULTS" --budget-s "$SWEEP_BUDGET_S" \
  ${SEQ_LENS:+--seq-lens "$SEQ_LENS"} 2>&1 \
  | grep -v "it/s\]$" | tail -n 40
sweep_rc=${PIPESTATUS[0]}
echo "sweep: exit $sweep_rc after $(( $(date +%s) - start )) s"
python3 -m bench summary "$RESULTS" || true

if [ -n "${OUT:-}" ]; then  # the device tool brings back what lands in $OUT
  cp "$RESULTS"/attention.csv "$RESULTS"/attention_provenance.json "$RESULTS"/attention_summary.md \
     "$RESULTS"/gpu_tests.txt "$OUT"/ 2>/dev/null
  cp "$RESULTS"/plots/*.png "$OUT"/ 2>/dev/null
fi
exit $(( test_rc != 0 || sweep_rc != 0 ))
