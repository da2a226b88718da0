#!/usr/bin/env bash
# Megatron-LM reference baseline for the lightning-llama-fp8 benchmarks.
#
# Runs Megatron-LM's own `pretrain_gpt.py` with a scaled-down version of its
# Llama-3-8B FP8 H100 example recipe (examples/llama/train_llama3_8b_h100_fp8.sh):
# the same per-layer shapes (hidden 4096, FFN 14336, 32 heads, 8 KV groups,
# head dim 128, seq 8192) and the same performance-relevant flags, but only a
# few layers, a small global batch, a short schedule, mock data, no evaluation
# and no checkpointing. Our own trainer is compared against its
# "elapsed time per iteration (ms)" and loss log lines; see
# benchmarks/lib/megatron_log.py for the parser.
#
# Megatron-LM itself is NOT part of this repository and must never be
# committed. Fetch it into the git-ignored folder `.baseline/megatron-lm`;
# `.baseline/COMMIT` records the Megatron-LM commit used.
# Only `megatron/`, `pretrain_gpt.py`, `gpt_builders.py`, `model_provider.py`,
# `hybrid_builders.py` and `mamba_builders.py` are needed. Point
# MEGATRON_LM_DIR elsewhere to use another checkout.
#
# Requirements on the GPU machine: Python >= 3.12, torch, Transformer Engine,
# numpy, packaging, einops, triton (e.g. via `source .gpu/setup.sh`). Megatron-LM's `megatron/`
# folder is put first on PYTHONPATH so it shadows any installed megatron-core.
# At start-up rank 0 runs `make` in megatron/core/datasets to build the C++
# dataset helpers, which needs a C++ compiler, `python3-config` and the
# `pybind11` Python package (APEX is not needed: gradient-accumulation fusion
# is switched off).
#
# Environment knobs (defaults in brackets):
#   MEGATRON_LM_DIR  Megatron-LM checkout   [<repo>/.baseline/megatron-lm]
#   PRECISION        fp8 | bf16             [fp8]
#   NPROC            GPUs (torchrun procs)  [1]
#   NUM_LAYERS       transformer layers     [4]
#   GBS              global batch size      [8]   (micro batch size is 1)
#   ITERS            training iterations    [30]
#   WARMUP_ITERS     LR warm-up iterations  [2]
#   TP, CP           tensor / context parallel sizes [1, 1]
#   FP8_RECIPE       TE FP8 recipe          [delayed] (the recipe's default)
#   DATA_PATH        corpus prefix (<prefix>.bin/.idx, e.g. from `llama-fp8 preprocess`) instead of mock
#                    data, split 99,1,0, read with the same NullTokenizer vocabulary      [unset: mock data]
#   DATA_CACHE_PATH  where Megatron-LM caches that corpus's sample index [/tmp/megatron_lm_index_cache]
#   DOCUMENT_MASKING 1: --dataloader-inter-document-masking (each document attends only to itself) [0]
#   MASTER_ADDR, MASTER_PORT                [127.0.0.1, 29500]
#   TORCHRUN         launcher command       [torchrun, else python3 -m torch.distributed.run]
# Any extra arguments are passed through to pretrain_gpt.py (later flags win).
#
# Everything Megatron-LM prints (stdout and stderr of all ranks) goes to this
# script's stdout. Iteration lines are printed by the last rank only.
#
# Example:
#   PRECISION=bf16 NUM_LAYERS=8 bash benchmarks/scripts/megatron_lm_baseline.sh | tee megatron.log
#   python3 -m benchmarks.lib.megatron_log megatron.log --warmup 10

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MEGATRON_LM_DIR="${MEGATRON_LM_DIR:-${REPO_ROOT}/.baseline/megatron-lm}"

if [[ ! -f "${MEGATRON_LM_DIR}/pretrain_gpt.py" || ! -d "${MEGATRON_LM_DIR}/megatron" ]]; then
    echo "error: no Megatron-LM checkout at '${MEGATRON_LM_DIR}'" >&2
    echo "       (expected pretrain_gpt.py and megatron/; set MEGATRON_LM_DIR)" >&2
    exit 1
fi
MEGATRON_LM_DIR="$(cd "${MEGATRON_LM_DIR}" && pwd)"

PRECISION="${PRECISION:-fp8}"
NPROC="${NPROC:-1}"
NUM_LAYERS="${NUM_LAYERS:-4}"
GBS="${GBS:-8}"
ITERS="${ITERS:-30}"
WARMUP_ITERS="${WARMUP_ITERS:-2}"
TP="${TP:-1}"
CP="${CP:-1}"
FP8_RECIPE="${FP8_RECIPE:-delayed}"
DATA_PATH="${DATA_PATH:-}"
DATA_CACHE_PATH="${DATA_CACHE_PATH:-/tmp/megatron_lm_index_cache}"
DOCUMENT_MASKING="${DOCUMENT_MASKING:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# Megatron-LM's packages must win over an installed megatron-core.
export PYTHONPATH="${MEGATRON_LM_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
# Same as the recipe: one hardware queue so communication/compute overlap
# kernels are issued in order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a LAUNCHER <<< "${TORCHRUN}"
elif command -v torchrun > /dev/null 2>&1; then
    LAUNCHER=(torchrun)
else
    LAUNCHER=(python3 -m torch.distributed.run)
fi

LAUNCH_ARGS=(
    --nproc_per_node "${NPROC}"
    --nnodes 1
    --node_rank 0
    --master_addr "${MASTER_ADDR}"
    --master_port "${MASTER_PORT}"
)

# Llama-3-8B layer geometry and architecture choices from the recipe.
MODEL_ARGS=(
    --num-layers "${NUM_LAYERS}"
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length 8192
    --max-position-embeddings 8192
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --normalization RMSNorm
    --apply-layernorm-1p
    --init-method-std 0.0134
    --attention-backend fused
    --untie-embeddings-and-output-weights
    --disable-bias-linear
)

# Optimizer / schedule: the recipe's values, with an iteration-based short
# schedule instead of the full-size sample-based one.
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size "${GBS}"
    --train-iters "${ITERS}"
    --lr-warmup-iters "${WARMUP_ITERS}"
    --lr-decay-iters "${ITERS}"
    --lr 0.00015
    --min-lr 0.00001
    --decoupled-lr 5.0e-4
    --decoupled-min-lr 4.5e-5
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
    --grad-reduce-in-bf16
    --cross-entropy-loss-fusion
    --calculate-per-token-loss
    --manual-gc
    --empty-unused-memory-level 1
    --exit-duration-in-mins 235
    --no-gradient-accumulation-fusion
)

case "${PRECISION}" in
    fp8)
        PRECISION_ARGS=(
            --fp8-format hybrid
            --fp8-recipe "${FP8_RECIPE}"
            --fp8-amax-history-len 1024
            --fp8-amax-compute-algo max
            --fp8-param-gather
        )
        ;;
    bf16)
        PRECISION_ARGS=()
        ;;
    *)
        echo "error: PRECISION must be 'fp8' or 'bf16', got '${PRECISION}'" >&2
        exit 2
        ;;
esac

# Megatron-LM turns --sequence-parallel off by itself when TP is 1.
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP}"
    --context-parallel-size "${CP}"
    --pipeline-model-parallel-size 1
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

# Synthetic tokens; no data files, no on-disk index cache.
DATA_ARGS=(
    --mock-data
    --tokenizer-type NullTokenizer
    --vocab-size 128256
    --tiktoken-pattern v2
    --split "99,1,0"
    --no-create-attention-mask-in-dataloader
    --no-mmap-bin-files
    --num-workers 1
)
# A corpus instead: the same tokenizer settings (ids are read as they are; the NullTokenizer's vocabulary sizes the
# model), its sample index cached outside the corpus's folder.
if [[ -n "${DATA_PATH}" ]]; then
    DATA_ARGS=(
        --data-path "${DATA_PATH}"
        --data-cache-path "${DATA_CACHE_PATH}"
        --tokenizer-type NullTokenizer
        --vocab-size 128256
        --split "99,1,0"
        --no-create-attention-mask-in-dataloader
        --num-workers 1
    )
fi
case "${DOCUMENT_MASKING}" in
    1) DATA_ARGS+=(--dataloader-inter-document-masking) ;;
    0) ;;
    *)
        echo "error: DOCUMENT_MASKING must be 0 or 1, got '${DOCUMENT_MASKING}'" >&2
        exit 2
        ;;
esac

# Log every iteration with throughput; no evaluation, no checkpoints
# (no --save/--load), no TensorBoard/W&B, no profiler.
LOGGING_ARGS=(
    --log-interval 1
    --log-throughput
    --eval-iters 0
    --eval-interval $((ITERS + 1))
    --distributed-timeout-minutes 60
)

if [[ -f "${MEGATRON_LM_DIR}/../COMMIT" ]]; then
    COMMIT="$(cat "${MEGATRON_LM_DIR}/../COMMIT")"
elif [[ -e "${MEGATRON_LM_DIR}/.git" ]]; then
    COMMIT="$(git -C "${MEGATRON_LM_DIR}" rev-parse HEAD 2>/dev/null || echo unknown)"
else
    COMMIT=unknown
fi
echo "[megatron_lm_baseline] dir=${MEGATRON_LM_DIR} commit=${COMMIT}" \
     "precision=${PRECISION} nproc=${NPROC} layers=${NUM_LAYERS} gbs=${GBS} iters=${ITERS} tp=${TP} cp=${CP}" \
     "data=${DATA_PATH:-mock} document_masking=${DOCUMENT_MASKING}"

exec "${LAUNCHER[@]}" "${LAUNCH_ARGS[@]}" "${MEGATRON_LM_DIR}/pretrain_gpt.py" \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${PRECISION_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${LOGGING_ARGS[@]}" \
    "$@" 2>&1
