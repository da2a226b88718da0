"""The CPU planner behind ``llama-fp8 plan``: counts, memory, FLOPs and the rendered table."""

from __future__ import annotations

import pytest

from lightning_llama_fp8.config import get_preset, llama3_8b
from lightning_llama_fp8.layout import LayoutError, ParallelLayout
from lightning_llama_fp8.plan import (
    GIB,
    PrecisionName,
    TrainingPlan,
    format_plan,
    parameters_per_rank,
    plan_training,
)

# Llama 3 8B by hand.
H, FFN, LAYERS, VOCAB, SEQ = 4096, 14336, 32, 128256, 8192
Q, KV = 32 * 128, 8 * 128
LINEAR_PER_LAYER = H * (Q + 2 * KV) + Q * H + 3 * H * FFN  # QKV, proj, fc1 (gate + up), fc2
LINEAR = LAYERS * LINEAR_PER_LAYER
EMBEDDING = VOCAB * H  # 128256 is already a multiple of 128 x TP for TP <= 2
NORMS = LAYERS * 2 * H + H
TOTAL_8B = 8_030_261_248


def reference_plan(**kwargs: object) -> TrainingPlan:
    """Megatron-LM's 8B FP8 recipe: 8 GPUs, TP1 CP2, GBS 128, MBS 1, FP8 param gather."""
    args: dict = dict(
        arch=llama3_8b(),
        layout=ParallelLayout(tensor_model_parallel_size=1, context_parallel_size=2),
        world_size=8,
        global_batch_size=128,
        micro_batch_size=1,
        precision="fp8",
        fp8_param_gather=True,
    )
    args.update(kwargs)
    return plan_training(**args)


def test_hand_count_matches_known_total() -> None:
    assert LINEAR + 2 * EMBEDDING + NORMS == TOTAL_8B


def test_reference_recipe_sizes_and_state_memory() -> None:
    plan = reference_plan()
    assert plan.data_parallel_size == 4
    assert plan.num_microbatches == 32
    assert plan.total_parameters == TOTAL_8B
    assert plan.parameters_per_gpu == TOTAL_8B  # TP1: CP does not shard weights
    # Distributed optimizer: 12 bytes/param sharded over DP x CP = 4 x 2 = 8.
    assert plan.memory.optimizer == 12 * TOTAL_8B // 8
    assert plan.memory.gradients == 2 * TOTAL_8B  # bf16 grad buffer, full size on every rank
    # FP8 param gather: TE linear weights in 1 byte, embeddings / LM head / norms in bf16.
    assert plan.memory.weights == LINEAR + 2 * (2 * EMBEDDING + NORMS)
    m = plan.memory
    assert m.total == m.weights + m.gradients + m.optimizer + m.activations
    assert 0 < m.activations < 40 * GIB


def test_tp2_halves_linear_weights_per_gpu() -> None:
    tp1 = reference_plan(precision="bf16", fp8_param_gather=False)
    tp2 = reference_plan(
        precision="bf16",
        fp8_param_gather=False,
        layout=ParallelLayout(tensor_model_parallel_size=2, context_parallel_size=2),
    )
    assert tp2.data_parallel_size == 2
    assert tp2.total_parameters == TOTAL_8B
    # Linear weights, embedding and LM head split over TP; norms replicated.
    expected = LINEAR // 2 + 2 * (EMBEDDING // 2) + NORMS
    assert tp2.parameters_per_gpu == expected
    assert tp2.parameter_counts.linear == tp1.parameter_counts.linear // 2
    assert tp2.memory.weights == 2 * expected
    assert tp1.memory.weights - tp2.memory.weights == 2 * (LINEAR // 2 + EMBEDDING)
    # The optimizer shards over DP x CP = 2 x 2 = 4 what TP left on this rank.
    assert tp2.memory.optimizer == 12 * expected // 4


def test_tp_shards_add_up_to_the_model() -> None:
    arch = get_preset("llama3_70b")
    for tp in (1, 2, 4, 8):
        counts = parameters_per_rank(arch, tp)
        assert (counts.total - counts.norms) * tp + counts.norms == arch.num_parameters(tp)


def test_tied_embeddings_counted_once() -> None:
    plan = plan_training("llama3_2_1b", ParallelLayout(), 1, 8, 1, "bf16")
    assert plan.parameter_counts.output_layer == 0
    assert plan.parameters_per_gpu == plan.total_parameters == 1_235_814_400


def test_flops_match_megatron_closed_form() -> None:
    plan = reference_plan()
    L, h, a, g, s, f, V = LAYERS, H, 32, 8, SEQ, FFN, VOCAB
    # Megatron-LM's num_floating_point_operations, per token (SwiGLU multiplier 1.5).
    megatron = 12 * L * h**2 * ((1 + g / a + s / h) + (f / h) * 1.5 + V / (2 * L * h))
    assert plan.flops_per_token == pytest.approx(megatron, rel=1e-9)
    assert plan.flops_per_token == pytest.approx(0.058e12, abs=0.001e12)
    assert plan.flops_per_step == pytest.approx(megatron * 128 * SEQ, rel=1e-9)
    assert plan.flops_per_gpu_per_step == pytest.approx(megatron * 128 * SEQ / 8, rel=1e-9)


def test_fp8_param_gather_shrinks_weights() -> None:
    bf16 = reference_plan(precision="bf16", fp8_param_gather=False)
    fp8_gather = reference_plan(precision="fp8", fp8_param_gather=True)
    fp8_bf16_weights = reference_plan(precision="fp8", fp8_param_gather=False)
    assert fp8_gather.memory.weights < bf16.memory.weights
    assert bf16.memory.weights - fp8_gather.memory.weights == LINEAR
    assert fp8_bf16_weights.memory.weights == bf16.memory.weights
    # Gradients and optimizer state do not depend on the weights' storage type.
    assert fp8_gather.memory.gradients == bf16.memory.gradients
    assert fp8_gather.memory.optimizer == bf16.memory.optimizer


def test_optimizer_and_grad_options() -> None:
    plain = reference_plan(use_distributed_optimizer=False, grad_reduce_in_fp32=True)
    assert plain.memory.optimizer == 12 * TOTAL_8B
    assert plain.memory.gradients == 4 * TOTAL_8B


def test_activation_estimate_by_hand_bf16_one_gpu() -> None:
    plan = plan_training("llama3_8b_4layers", ParallelLayout(), 1, 8, 1, "bf16")
    n = SEQ
    per_token_layer = (
        2 * H + 4  # input norm input + rstd
        + 2 * H  # QKV input
        + 2 * (Q + 2 * KV)  # Q, K, V
        + 2 * Q + 4 * 32  # attention output + LSE
        + 2 * H + 4  # pre-MLP norm input + rstd
        + 2 * H  # fc1 input
        + 2 * 2 * FFN  # fc1 output
        + 2 * FFN  # fc2 input
    )  # fmt: skip
    head = n * (2 * H + 4 + 2 * H) + n * VOCAB * (2 + 4)
    assert plan.activations.layer_bytes == n * per_token_layer
    assert plan.memory.activations == 4 * n * per_token_layer + head
    assert plan.num_microbatches == 8 and plan.data_parallel_size == 1


def test_activations_shrink_with_fp8_cp_and_sequence_parallel() -> None:
    def act(layout: ParallelLayout, world: int, precision: PrecisionName = "bf16") -> int:
        return plan_training("llama3_8b", layout, world, 8, 1, precision).memory.activations

    base = act(ParallelLayout(), 1)
    assert act(ParallelLayout(), 1, "fp8") < base
    assert act(ParallelLayout(context_parallel_size=2), 2) == base // 2
    tp2 = act(ParallelLayout(tensor_model_parallel_size=2), 2)
    tp2_sp = act(ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True), 2)
    assert tp2_sp < tp2 < base


def test_layout_error_propagates() -> None:
    with pytest.raises(LayoutError, match="world size 6 is not divisible"):
        plan_training("llama3_8b", ParallelLayout(tensor_model_parallel_size=4), 6, 128, 1)


def test_bad_precision_options() -> None:
    with pytest.raises(ValueError, match="precision"):
        reference_plan(precision="fp16", fp8_param_gather=False)
    with pytest.raises(ValueError, match="fp8_param_gather"):
        reference_plan(precision="bf16", fp8_param_gather=True)


def test_format_plan_contains_the_numbers() -> None:
    plan = reference_plan()
    text = format_plan(plan)
    assert "8,030,261,248" in text
    assert "TP 1 x CP 2 x DP 4 = 8 GPUs" in text
    assert "32 micro batches" in text
    for value in (plan.memory.weights, plan.memory.optimizer, plan.memory.activations, plan.memory.total):
        assert f"{value / GIB:,.2f} GiB" in text
    assert f"{plan.flops_per_step / 1e12:,.2f} TFLOP" in text
    assert f"{plan.flops_per_gpu_per_step / 1e12:,.2f} TFLOP" in text
    assert "estimate" in text
