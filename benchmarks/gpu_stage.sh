#!/usr/bin/env bash
# One named piece of GPU evidence per call, sized to fit a 10-minute device call (start-up included).
# Run from the repo root on the GPU machine after `source .gpu/setup.sh`; writes logs/JSON under OUT_DIR.
#
#   bash benchmarks/gpu_stage.sh STAGE OUT_DIR
#
# Stages (GPUs needed; wall time measured on H200 unless marked as an estimate):
#   equivalence-2   (2) issue 3: 1-GPU references + TP2, CP2 p2p/a2a/all_gather, DP2 in BF16 and FP8  (~9 min)
#   equivalence-4   (4) issue 3: the references + DP2, TP2 x CP2, CP2 x DP2 only                     (~8.6 min)
#   speed-2         (2) issue 3: ours vs Megatron-LM, FP8, CP2 and TP2+SP, 4 layers                    (~5 min)
#   speed-tp2-32    (2) issue 3: ours vs Megatron-LM, FP8, TP2+SP, all 32 layers (H200: ~84 GB/card)  (~4.6 min)
#   speed-8b-4      (4) issue 5 fallback: full Llama 3 8B, TP1 CP2 DP2, ours vs Megatron-LM           (~8 min est.)
#   speed-8b-2      (2) issue 5 fallback: full Llama 3 8B, TP1 CP2 DP1 (96 GiB/GPU measured, H200 only)  (~5.6 min)
#   ref8-ours-cp2   (8) issue 5: the shipped 8B YAML (CP2 DP4, GBS 128), 30 steps, via the CLI         (~7 min est.)
#   ref8-lm-cp2     (8) issue 5: Megatron-LM, same flags and layout; then on any machine:
#                       python3 benchmarks/reference_run.py compare OUT/ref8_ours-cp2 OUT/ref8_lm-cp2
#   ref8-ours-cp1, ref8-lm-cp1 (8) the same with CP1 DP8, the layout Megatron-LM's shipped script uses
#   nan-safety      (1) issue 4: tests/gpu/test_nan_safety.py (injections, policies, recipes)        (~3.5 min)
#   gpu-tests       (1) tests/gpu except the checkpoint tests (stage `checkpoints`)                    (~6 min)
#   checkpoints     (2) distributed checkpoints: resume on 1 GPU; CP2 -> TP2, DP2 -> DP2/DP1 on 2 GPUs  (~7.5 min)
#   recipes-1       (1) issue 4: tokens/s of BF16 and each FP8 recipe (+ NaNGuard) on Llama-3-8B layers x4 (~5 min est.)
set -uo pipefail
stage="${1:?usage: gpu_stage.sh STAGE OUT_DIR}"
out="${2:?usage: gpu_stage.sh STAGE OUT_DIR}"
case "$stage" in
  equivalence-2|equivalence-4|speed-2|speed-tp2-32|speed-8b-4|speed-8b-2|nan-safety|gpu-tests|recipes-1) ;;
  checkpoints) ;;
  ref8-ours-cp2|ref8-lm-cp2|ref8-ours-cp1|ref8-lm-cp1) ;;
  *) echo "unknown stage '$stage' (see the list at the top of $0)" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_RESULTS_DIR="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt"
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true

case "$stage" in
  equivalence-2)
    python3 benchmarks/parallel_equivalence.py --out-dir "$out/equivalence" --gpus 2 --fp8 ;;
  equivalence-4)
    python3 benchmarks/parallel_equivalence.py --out-dir "$out/equivalence" --gpus 4 --fp8 \
      --only dp2 tp2xcp2 cp2xdp2 ;;
  speed-2)
    python3 benchmarks/compare_megatron_lm.py --out-dir "$out/speed_cp2" --precisions fp8 --cp 2 --nproc 2 &&
    python3 benchmarks/compare_megatron_lm.py --out-dir "$out/speed_tp2" --precisions fp8 --tp 2 --nproc 2 ;;
  speed-tp2-32)
    python3 benchmarks/compare_megatron_lm.py --out-dir "$out/speed_tp2_32l" --precisions fp8 --tp 2 --nproc 2 \
      --layers 32 --steps 20 --warmup 8 ;;
  speed-8b-4)
    python3 benchmarks/compare_megatron_lm.py --out-dir "$out/speed_8b_tp1cp2dp2" --precisions fp8 --cp 2 \
      --nproc 4 --layers 32 --gbs 16 --steps 20 --warmup 8 ;;
  speed-8b-2)
    python3 benchmarks/compare_megatron_lm.py --out-dir "$out/speed_8b_tp1cp2dp1" --precisions fp8 --cp 2 \
      --nproc 2 --layers 32 --gbs 16 --steps 16 --warmup 6 ;;
  ref8-*)
    side="${stage#ref8-}"; side="${side%-cp*}"; cp="${stage##*-cp}"
    [ "$side" = lm ] && side=megatron-lm
    python3 benchmarks/reference_run.py "$side" --out-dir "$out/ref8_${stage#ref8-}" --gpus 8 --cp "$cp" --steps 30 ;;
  nan-safety)
    python3 -m pytest -m gpu -q tests/gpu/test_nan_safety.py -p no:cacheprovider 2>&1 | tee "$out/nan_safety.log" ;;
  gpu-tests)
    # Without the checkpoint tests, which have their own stage: together they would not fit one 10-minute call.
    python3 -m pytest -m gpu -q tests/gpu -p no:cacheprovider --ignore tests/gpu/test_checkpoint_resume.py \
      --ignore tests/gpu/test_checkpoint_layouts.py 2>&1 | tee "$out/gpu_tests.log" ;;
  checkpoints)
    python3 -m pytest -m gpu -q tests/gpu/test_checkpoint_resume.py tests/gpu/test_checkpoint_layouts.py \
      -p no:cacheprovider 2>&1 | tee "$out/checkpoints.log" ;;
  recipes-1)
    # Same shapes and flags as the speed comparisons (seq 8192, GBS 8), one GPU, one process per run.
    mkdir -p "$out/recipes"
    for run in "bf16 delayed" "fp8 delayed" "fp8 delayed skip" "fp8 current" "fp8 blockwise"; do
      set -- $run
      name="$1${2:+_$2}${3:+_guard_$3}"; [ "$1" = bf16 ] && name=bf16
      python3 benchmarks/bench_throughput.py --precision "$1" --recipe "$2" ${3:+--nan-guard "$3"} \
        --layers 4 --steps 20 --warmup 8 --out "$out/recipes/$name.json" > "$out/recipes/$name.log" 2>&1
      tail -1 "$out/recipes/$name.log"
    done ;;
esac
