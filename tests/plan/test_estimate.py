"""The CPU planner behind ``llama-fp8 plan`` (plan/estimate.py): counts, memory, FLOPs, pipeline stages."""

from __future__ import annotations

import re

import pytest

from lightning_llama_fp8.config import get_preset, llama3_8b
from lightning_llama_fp8.parallel.layout import LayoutError, ParallelLayout
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.plan.estimate import GIB, PrecisionName, TrainingPlan, parameters_per_rank, plan_training
from lightning_llama_fp8.plan.report import format_plan
from tests.helpers.plans import reference_plan

# Llama 3 8B by hand.
H, FFN, LAYERS, VOCAB, SEQ = 4096, 14336, 32, 128256, 8192
Q, KV = 32 * 128, 8 * 128
LINEAR_PER_LAYER = H * (Q + 2 * KV) + Q * H + 3 * H * FFN  # QKV, proj, fc1 (gate + up), fc2
LINEAR = LAYERS * LINEAR_PER_LAYER
EMBEDDING = VOCAB * H  # 128256 is already a multiple of 128 x TP for TP <= 2
NORMS = LAYERS * 2 * H + H
TOTAL_8B = 8_030_261_248


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
    tp1 = reference_plan(precision="bf16", fp8_param_gather=False, optimizer_precision=None)
    tp2 = reference_plan(
        precision="bf16",
        fp8_param_gather=False,
        layout=ParallelLayout(tensor_model_parallel_size=2, context_parallel_size=2),
        optimizer_precision=None,  # Megatron's default optimizer: 12 bytes per parameter
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
    bf16 = reference_plan(precision="bf16", fp8_param_gather=False, optimizer_precision=None)
    fp8_gather = reference_plan(precision="fp8", fp8_param_gather=True)
    fp8_bf16_weights = reference_plan(precision="fp8", fp8_param_gather=False, optimizer_precision=None)
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
    head = n * (2 * H + 4 + 2 * H) + n * VOCAB * (2 + 2)  # bf16 logits and the copy TE's cross entropy keeps
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


# ---------------------------------------------------------------------------------------------- recompute / offload
def one_gpu_8b(**kwargs: object) -> TrainingPlan:
    """The full 8B on one GPU: seq 8192, MBS 1, GBS 8, FP8 with FP8 weights."""
    args: dict = dict(
        arch=llama3_8b(), layout=ParallelLayout(), world_size=1, global_batch_size=8, micro_batch_size=1,
        precision="fp8", fp8_param_gather=True,
    )  # fmt: skip
    args.update(kwargs)
    return plan_training(**args)


def test_full_recompute_keeps_each_layer_input_only() -> None:
    plain, full = one_gpu_8b(), one_gpu_8b(recompute=RecomputeSettings("full"))
    layer_input = 2 * SEQ * H  # bf16 hidden states of one sequence
    assert full.activations.layer_input_bytes == layer_input
    assert full.activations.checkpointed_inputs == LAYERS
    # Peak: 32 inputs plus the loss's logits (larger than one recomputed layer).
    head = plain.activations.head_bytes
    assert head > plain.activations.layer_bytes
    assert full.memory.activations == LAYERS * layer_input + head
    assert plain.memory.activations == LAYERS * plain.activations.layer_bytes + head
    assert full.memory.activations < plain.memory.activations / 4


def test_uniform_chunks_and_block_method() -> None:
    layer = one_gpu_8b().activations.layer_bytes
    layer_input = 2 * SEQ * H
    head = one_gpu_8b().activations.head_bytes
    chunks8 = one_gpu_8b(recompute=RecomputeSettings("full", num_layers=8)).activations
    assert (chunks8.checkpointed_inputs, chunks8.recompute_window) == (4, 8)
    assert chunks8.total == 4 * layer_input + max(head, 8 * layer)
    block = one_gpu_8b(recompute=RecomputeSettings("full", method="block", num_layers=12)).activations
    assert (block.checkpointed_inputs, block.layers_kept, block.recompute_window) == (12, 20, 1)
    assert block.total == 12 * layer_input + 20 * layer + head


def test_selective_recompute_drops_the_recomputed_tensors() -> None:
    n, q, f = SEQ, Q, FFN
    plain = one_gpu_8b().activations
    attn = one_gpu_8b(recompute=RecomputeSettings("selective")).activations
    # FP8: the output projection keeps an FP8 copy, so the bf16 attention output and the softmax LSE go.
    assert plain.layer_bytes - attn.layer_bytes == 2 * n * q + 4 * n * 32
    bf16 = one_gpu_8b(precision="bf16", fp8_param_gather=False)
    bf16_attn = one_gpu_8b(precision="bf16", fp8_param_gather=False, recompute=RecomputeSettings("selective"))
    assert bf16.activations.layer_bytes - bf16_attn.activations.layer_bytes == 4 * n * 32  # LSE only
    mlp = one_gpu_8b(recompute=RecomputeSettings("selective", modules=["mlp"])).activations
    # The MLP keeps its input (the residual); rstd, fc1 input (FP8), fc1 output and fc2 input (FP8) go.
    assert plain.layer_bytes - mlp.layer_bytes == 4 * n + n * H + 2 * n * 2 * f + n * f
    assert sum(b for _, b in mlp.recomputed_per_layer) == plain.layer_bytes - mlp.layer_bytes


def test_optimizer_step_fp32_gradient_copy_counts_at_the_peak() -> None:
    full = one_gpu_8b(recompute=RecomputeSettings("full"))
    m = full.memory
    assert m.optimizer_step == 4 * TOTAL_8B  # .float() of the whole bf16 gradient shard (DP 1)
    assert m.optimizer_step > m.activations
    assert m.total == m.weights + m.gradients + m.optimizer + m.optimizer_step
    fp32_grads = one_gpu_8b(recompute=RecomputeSettings("full"), grad_reduce_in_fp32=True).memory
    assert fp32_grads.optimizer_step == 0 and fp32_grads.gradients == 4 * TOTAL_8B
    # Sharded over DP x CP with the distributed optimizer (reference recipe: 8 shards), below the activations.
    reference = reference_plan().memory
    assert reference.optimizer_step == 4 * TOTAL_8B // 8 < reference.activations


def test_full_8b_on_one_h200_needs_optimizer_offload() -> None:
    """The prediction behind examples/configs/llama3_8b_1gpu_fp8_recompute.yaml."""
    no_offload = one_gpu_8b(recompute=RecomputeSettings("full"))
    assert 142 * GIB < no_offload.memory.total < 144 * GIB  # more than an H200's 140 GiB before any overhead
    half = one_gpu_8b(recompute=RecomputeSettings("full"), optimizer_offload=OptimizerOffloadSettings(0.5))
    m = half.memory
    on_host = round(TOTAL_8B * 0.5)
    assert m.host == 16 * on_host  # fp32 main weight, two moments, fp32 gradient per offloaded parameter
    assert m.optimizer == 16 * (TOTAL_8B - on_host) and m.optimizer_step == 0
    assert m.total == m.weights + m.gradients + m.optimizer + m.activations
    assert 88 * GIB < m.total < 90 * GIB  # 89.3 GiB (91.2 with Megatron's cross entropy, as measured 2026-12-03)
    everything = one_gpu_8b(recompute=RecomputeSettings("full"), optimizer_offload=OptimizerOffloadSettings(1.0))
    assert everything.memory.optimizer == 0 and everything.memory.host == 16 * TOTAL_8B
    text = format_plan(half, gpu_memory_gib=140)
    assert re.search(r"Recompute +full \(uniform, 1 layer per chunk\)", text)
    assert "50% of the optimizer state on the CPU" in text
    assert re.search(rf"Host memory per GPU +{m.host / GIB:,.2f} GiB", text)
    assert f"yes, {140 - m.total / GIB:,.2f} GiB left" in text
    assert "no, " in format_plan(no_offload, gpu_memory_gib=140)


def test_plan_refuses_what_the_strategy_refuses() -> None:
    with pytest.raises(ValueError, match=r"'layernorm' recomputes nothing"):
        one_gpu_8b(recompute=RecomputeSettings("selective", modules=["layernorm"]))
    with pytest.raises(ValueError, match=r"num_layers \(40, layers per chunk\)"):
        one_gpu_8b(recompute=RecomputeSettings("full", num_layers=40))
    with pytest.raises(ValueError, match=r"needs use_distributed_optimizer=True"):
        one_gpu_8b(optimizer_offload=OptimizerOffloadSettings(), use_distributed_optimizer=False)
    with pytest.raises(ValueError, match=r"needs the delayed recipe, not 'current'"):
        one_gpu_8b(optimizer_offload=OptimizerOffloadSettings(), fp8_recipe="current")


# ---------------------------------------------------------------------------------------------- pipeline stages
@pytest.mark.parametrize("pp,vpp,micro_batches", [(4, None, 8), (4, None, 2), (4, 2, 8), (8, 5, 64), (2, 2, 2)])
def test_micro_batches_in_flight_follow_megatrons_warmup(pp: int, vpp: int | None, micro_batches: int) -> None:
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from lightning_llama_fp8.plan.estimate import micro_batches_in_flight

    layout = ParallelLayout(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    for rank in range(pp):
        group = SimpleNamespace(size=lambda: pp, rank=lambda rank=rank: rank)
        p2p = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)
        total, _, warmup, _ = get_pp_rank_microbatches(micro_batches, vpp or 1, pp, p2p_communicator=p2p)
        assert micro_batches_in_flight(layout, rank, micro_batches) == min(warmup + 1, total), rank


def test_pipeline_stages_hold_the_model_once() -> None:
    from lightning_llama_fp8.plan.estimate import parameters_per_stage

    for arch in (get_preset("llama3_70b"), get_preset("llama3_2_1b")):  # untied, tied
        layout = ParallelLayout(tensor_model_parallel_size=4, pipeline_model_parallel_size=4)
        stages = [parameters_per_stage(arch, layout, rank) for rank in range(4)]
        whole = parameters_per_rank(arch, 4)
        copy = whole.embedding if arch.tie_embeddings else 0  # the last stage's own copy of tied embeddings
        assert sum(stage.total for stage in stages) == whole.total + copy
        assert [bool(stage.embedding) for stage in stages] == [True, False, False, False]
        assert [bool(stage.output_layer) for stage in stages] == [False, False, False, True]


def test_plan_of_megatron_lms_70b_layout(capsys: pytest.CaptureFixture[str]) -> None:
    """Megatron-LM's published Llama 3 70B FP8 layout (examples/llama/README.md: 64 GPUs, TP4 x PP8 x VP5, GBS 128)."""
    layout = ParallelLayout(
        tensor_model_parallel_size=4, sequence_parallel=True, pipeline_model_parallel_size=8,
        virtual_pipeline_model_parallel_size=5,
    )  # fmt: skip
    plan = plan_training("llama3_70b", layout, 64, 128, 1, "fp8")
    assert plan.data_parallel_size == 2 and plan.num_microbatches == 64
    assert plan.bubble_fraction == pytest.approx(7 / (5 * 64 + 7))
    assert len(plan.stages) == 8 and [len(stage.layers) for stage in plan.stages] == [5] * 8
    assert plan.stages[0].layers[:2] == (range(0, 2), range(16, 18))
    assert plan.memory == max((stage.memory for stage in plan.stages), key=lambda memory: memory.total)
    # The first stage keeps the most chunk forwards alive: (PP - 1) x 2 + (VP - 1) x PP + 1 = 47.
    assert [stage.activations.in_flight for stage in plan.stages] == [47, 45, 43, 41, 39, 37, 35, 33]
    text = format_plan(plan, gpu_memory_gib=80)
    assert "TP 4 x CP 1 x PP 8 x DP 2 = 64 GPUs" in text
    assert "interleaved, 5 chunks per stage; layers per stage 10, 10, 10, 10, 10, 10, 10, 10; bubble 2.1%" in text
    assert re.search(r"stage 0 +\d+\.\d+ GiB \(layers 0-1, 16-17, 32-33, 48-49, 64-65 \+ embedding", text)
    assert "layers 14-15, 30-31, 46-47, 62-63, 78-79 + output layer" in text
    assert "Fits 80 GiB per GPU" in text


# ---------------------------------------------------------------------------------------------- document masking
def test_document_masking_adds_its_upper_bounds_to_memory() -> None:
    """Masked: the RoPE tables Megatron caches (31 more, 8192 x 128 fp32 each) for the run and the document boundaries
    (an int32 per token + 1) per micro batch in flight; nothing else changes."""
    plain, masked = one_gpu_8b(), one_gpu_8b(document_masking=True)
    assert not plain.document_masking and masked.document_masking
    assert masked.memory.rope_cache == 31 * 8192 * 128 * 4 and plain.memory.rope_cache == 0
    assert masked.activations.packed_bytes == 4 * (8192 + 1) and plain.activations.packed_bytes == 0
    assert masked.memory.activations - plain.memory.activations == 4 * (8192 + 1)
    assert masked.memory.total - plain.memory.total == 31 * 8192 * 128 * 4 + 4 * (8192 + 1)
    assert (masked.memory.weights, masked.memory.optimizer) == (plain.memory.weights, plain.memory.optimizer)
    # Under PP every chunk forward pass in flight keeps its micro batch's boundaries.
    piped = one_gpu_8b(
        layout=ParallelLayout(pipeline_model_parallel_size=2), world_size=2, document_masking=True, micro_batch_size=2
    )
    first = piped.stages[0]
    assert first.activations.packed_bytes == 4 * (2 * 8192 + 1) and first.activations.in_flight == 2


def test_plan_refuses_document_masking_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match=r"context_parallel_size 2: .*2 x CP = 4 tokens"):
        reference_plan(document_masking=True)  # the recipe's CP2
    with pytest.raises(ValueError, match=r"fp8_attention: false"):
        one_gpu_8b(document_masking=True, fp8_attention=True)
    one_gpu_8b(document_masking=True, fp8_attention=True, precision="bf16", fp8_param_gather=False)  # no FP8: fine
    reference_plan(fp8_attention=True)  # masking off: FP8 attention is none of the plan's business
    with pytest.raises(ValueError, match=r"transformer_impl: transformer_engine"):
        one_gpu_8b(arch=get_preset("llama_tiny", transformer_impl="local"), document_masking=True, precision="bf16",
                   fp8_param_gather=False)  # fmt: skip
