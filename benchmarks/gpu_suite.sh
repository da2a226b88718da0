#!/usr/bin/env bash
# Everything the GPU machine has to prove for one commit, in one call (device time is scarce):
#   1. the GPU test suite (tests/gpu) with its JSON records,
#   2. ours vs Megatron-LM throughput on the recipe's scaled-down config.
# Usage (from the repo root on the GPU machine, after `source .gpu/setup.sh`):
#   bash benchmarks/gpu_suite.sh OUT_DIR [compare args...]
set -uo pipefail
out="${1:?usage: gpu_suite.sh OUT_DIR [compare args...]}"; shift
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_RESULTS_DIR="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m benchmarks.compare_megatron_lm --out-dir "$out/bench" "$@" 2>&1 | tail -20
  status=$(( status || PIPESTATUS[0] ))
fi
exit $status
