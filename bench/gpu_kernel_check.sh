#!/usr/bin/env bash
# A short GPU run (about 2 minutes: 126 s on the H200 on 2026-11-28) that localizes the Triton kernel's
# CUDA failures instead of the whole of bench/gpu.sh: every candidate config pinned in turn (python -m
# bench kernel-check) on the two rows where the every-candidate test failed and at the sweep's headline
# shape, pointer and TMA configs;
# then the per-kernel breakdown that died with an illegal memory access, under CUDA_LAUNCH_BLOCKING=1 so
# the error names the faulting launch; then wall against device time of triton and flex at the headline
# shape. Needs no wheels (no xformers). Everything goes to $RESULTS (default results/gpu/kernel_check/).
set -uo pipefail
RESULTS=${RESULTS:-results/gpu/kernel_check}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$(date +%s)

# shellcheck source=bench/gpu_check_loop.sh
source "$(dirname "$0")/gpu_check_loop.sh"
check() {  # name timeout args...
  local name=$1 limit=$2
  shift 2
  CUDA_LAUNCH_BLOCKING=1 kernel_check_loop "$RESULTS/$name.csv" "$limit" "$@"
  echo "== $name: exit $? after $(( $(date +%s) - start )) s"
}

check mixed 80 --layout mixed --heads 2 --tma auto
check headline_pointer 80 --layout benchmark --batch 4 --seq-len 8192 --heads 16 --tma off
check headline_tma 45 --layout benchmark --batch 4 --seq-len 8192 --heads 16 --tma on

echo "== breakdown of triton (autotuned, TMA off), CUDA_LAUNCH_BLOCKING=1"
INTERVAL_ATTENTION_TMA=0 CUDA_LAUNCH_BLOCKING=1 TRITON_PRINT_AUTOTUNING=1 timeout 40 python3 -m bench breakdown \
  --backends triton-split,triton-atomic,triton --out "$RESULTS" 2>&1 | grep -v "^USDT\|gpuGetDeviceCount" | tail -n 40
echo "== breakdown: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"

echo "== wall vs device time at the headline shape (autotuned, TMA off)"
INTERVAL_ATTENTION_TMA=0 timeout 45 python3 -m bench kernel-check --layout benchmark --batch 4 --seq-len 8192 \
  --heads 16 --tma off --indices 0 --modes split --timing 2>&1 | tail -n 8
echo "== timing: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
if [ -n "${OUT:-}" ]; then
  # the device tool brings back 8 files: the 3 check CSVs, the breakdown CSV, one provenance (the runs
  # differ only in the arguments the log shows), a .running file where a check stopped inside a pair on
  # its last try (rarely more than one), and the caller's tee'd console log
  cp "$RESULTS"/*.csv "$RESULTS"/mixed_provenance.json "$RESULTS"/*.running "$OUT"/ 2>/dev/null
fi
