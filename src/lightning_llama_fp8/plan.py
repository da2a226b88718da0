"""CPU-only training planner behind ``llama-fp8 plan``.

Given an architecture, a parallel layout, a GPU count, batch sizes and a precision, :func:`plan_training`
validates the layout and works out what one training step costs: the data-parallel size, the number of
micro batches, parameters in total and per GPU, a per-GPU memory breakdown and the FLOPs per step.

What is exact and what is an estimate:

* Parameter counts, weight, gradient and optimizer bytes follow the buffers Megatron-Core allocates
  (bucket padding of the distributed optimizer aside, which is below 0.1%).
* Activation bytes are an **estimate**: the tensors a Llama layer built from Transformer Engine modules with
  flash / fused attention saves for backward, for the one micro batch that is alive at a time under
  Megatron's no-pipeline schedule, plus the logits and cross-entropy buffers. Transient tensors inside a
  single kernel or a single layer's backward are not counted.
* **Not counted at all**: the CUDA context and loaded kernels (about 0.5-1 GiB), NCCL communication buffers,
  PyTorch caching-allocator fragmentation and reserved-but-unused memory, Transformer Engine workspaces
  (cuBLAS workspaces, cached FP8 copies / transposes of BF16 weights when FP8 param gather is off, FP8
  scaling metadata and amax histories), the fp32 copy of the gradient shard that the optimizer step makes
  when gradients are reduced in bf16, and the RoPE / attention-mask buffers. Leave several GiB of headroom
  on top of :attr:`MemoryBreakdown.total`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lightning_llama_fp8.config import LlamaConfig, resolve_arch
from lightning_llama_fp8.layout import ParallelLayout, validate_layout

PrecisionName = Literal["fp8", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp8", "bf16")

GIB = 1024**3
TERA = 1e12
BF16_BYTES = 2
FP8_BYTES = 1
FP32_BYTES = 4
# Megatron's mixed-precision Adam: fp32 main parameter + exp_avg + exp_avg_sq.
OPTIMIZER_BYTES_PER_PARAM = 3 * FP32_BYTES


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one tensor-parallel rank, split by how they are sharded and stored.

    ``linear`` are the Transformer Engine linear weights of the decoder layers (QKV, attention output, fc1,
    fc2): the weights FP8 param gather stores in FP8. ``embedding`` and ``output_layer`` are vocab-parallel
    (split over TP, kept in bf16 - the LM head runs outside FP8). ``norms`` are replicated on every rank.
    """

    embedding: int
    output_layer: int
    linear: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.linear + self.norms


def parameters_per_rank(arch: LlamaConfig, tensor_model_parallel_size: int) -> ParameterCounts:
    """Parameters one tensor-parallel rank holds (context parallelism does not shard weights)."""
    tp = tensor_model_parallel_size
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    per_layer_linear = h * (q + 2 * kv) + q * h + 2 * h * f + f * h  # QKV, proj, fc1 (gate+up), fc2
    embedding = arch.padded_vocab_size(tp) * h // tp
    return ParameterCounts(
        embedding=embedding,
        output_layer=0 if arch.tie_embeddings else embedding,
        linear=arch.num_layers * per_layer_linear // tp,
        norms=arch.num_layers * 2 * h + h,  # two RMSNorms per layer and the final norm
    )


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationEstimate:
    """Estimated activation bytes of one micro batch on one GPU (see the module docstring).

    ``per_layer`` lists ``(name, bytes)`` of what one decoder layer saves for backward; ``head`` the same for
    the final norm, the output layer and the loss.
    """

    tokens_per_gpu: int
    per_layer: tuple[tuple[str, int], ...]
    head: tuple[tuple[str, int], ...]
    num_layers: int

    @property
    def layer_bytes(self) -> int:
        return sum(b for _, b in self.per_layer)

    @property
    def head_bytes(self) -> int:
        return sum(b for _, b in self.head)

    @property
    def total(self) -> int:
        return self.num_layers * self.layer_bytes + self.head_bytes


def _layer_activation_terms(
    arch: LlamaConfig, layout: ParallelLayout, tokens: int, precision: PrecisionName
) -> tuple[tuple[str, int], ...]:
    """Tensors one Llama decoder layer (TE spec, flash / fused attention) keeps for backward.

    ``tokens`` = micro_batch_size x seq_length / CP. Tensors along the hidden dimension are split over TP
    only with sequence parallelism (otherwise every TP rank holds them whole); head- and FFN-sized tensors
    are always split over TP. Linear-layer inputs are saved in FP8 (1 byte) when training in FP8.
    """
    tp = layout.tensor_model_parallel_size
    sp = tp if layout.sequence_parallel else 1
    n, h, f = tokens, arch.hidden_size, arch.ffn_hidden_size
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    heads = arch.num_attention_heads // tp
    lin = FP8_BYTES if precision == "fp8" else BF16_BYTES
    return (
        # Attention block.
        ("input_norm input (layer input, bf16)", BF16_BYTES * n * h // sp),
        ("input_norm rstd (fp32)", FP32_BYTES * n // sp),
        ("QKV linear input (norm output)", lin * n * h // sp),
        ("Q, K, V after RoPE (bf16, saved by attention)", BF16_BYTES * n * (q + 2 * kv) // tp),
        ("attention output (bf16)", BF16_BYTES * n * q // tp),
        ("attention softmax LSE (fp32)", FP32_BYTES * n * heads),
        # In bf16 the output projection saves the attention output itself (no extra bytes); in FP8 it
        # keeps an FP8 copy of it.
        ("proj linear input (FP8 copy)", FP8_BYTES * n * q // tp if precision == "fp8" else 0),
        # The residual adds (no bias, no dropout) save nothing. MLP block:
        ("pre_mlp_norm input (residual, bf16)", BF16_BYTES * n * h // sp),
        ("pre_mlp_norm rstd (fp32)", FP32_BYTES * n // sp),
        ("fc1 linear input (norm output)", lin * n * h // sp),
        ("fc1 output, gate + up (bf16, saved by SwiGLU)", BF16_BYTES * n * 2 * f // tp),
        ("fc2 linear input (SwiGLU output)", lin * n * f // tp),
    )


def _head_activation_terms(arch: LlamaConfig, layout: ParallelLayout, tokens: int) -> tuple[tuple[str, int], ...]:
    """Final norm, LM head and loss: the LM head runs in bf16 outside FP8, the loss in fp32."""
    tp = layout.tensor_model_parallel_size
    sp = tp if layout.sequence_parallel else 1
    n, h = tokens, arch.hidden_size
    vocab_shard = arch.padded_vocab_size(tp) // tp
    return (
        ("final_norm input (bf16)", BF16_BYTES * n * h // sp),
        ("final_norm rstd (fp32)", FP32_BYTES * n // sp),
        ("output layer input (bf16)", BF16_BYTES * n * h // sp),
        # Peak at the loss: the bf16 logits of this rank's vocab shard and the fp32 buffer cross entropy
        # turns into the softmax in place and keeps for backward (where it becomes the logits' gradient).
        ("logits, vocab shard (bf16)", BF16_BYTES * n * vocab_shard),
        ("cross-entropy softmax / grad, vocab shard (fp32)", FP32_BYTES * n * vocab_shard),
    )


def estimate_activations(
    arch: LlamaConfig, layout: ParallelLayout, micro_batch_size: int, precision: PrecisionName
) -> ActivationEstimate:
    """Estimate the activation bytes of one micro batch on one GPU (see the module docstring)."""
    tokens = micro_batch_size * arch.seq_length // layout.context_parallel_size
    return ActivationEstimate(
        tokens_per_gpu=tokens,
        per_layer=_layer_activation_terms(arch, layout, tokens, precision),
        head=_head_activation_terms(arch, layout, tokens),
        num_layers=arch.num_layers,
    )


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU. ``activations`` is an estimate; see the module docstring for what is not counted."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.weights + self.gradients + self.optimizer + self.activations)


@dataclass(frozen=True)
class TrainingPlan:
    """What one training step of a layout costs; produced by :func:`plan_training`.

    Memory is per GPU in bytes (activations estimated, CUDA context / NCCL buffers / allocator
    fragmentation / TE workspaces not counted). FLOPs are counted the way Megatron-LM reports them.
    """

    arch: LlamaConfig
    layout: ParallelLayout
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    precision: PrecisionName
    use_distributed_optimizer: bool
    grad_reduce_in_fp32: bool
    fp8_param_gather: bool
    data_parallel_size: int
    num_microbatches: int
    total_parameters: int
    parameters_per_gpu: int
    parameter_counts: ParameterCounts
    memory: MemoryBreakdown
    activations: ActivationEstimate
    flops_per_token: float
    flops_per_step: float
    flops_per_gpu_per_step: float

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.arch.seq_length


def _weight_bytes(counts: ParameterCounts, precision: PrecisionName, fp8_param_gather: bool) -> int:
    """bf16 weights; with FP8 param gather TE's linear weights are stored in FP8 (1 byte), the rest bf16."""
    if precision == "fp8" and fp8_param_gather:
        return FP8_BYTES * counts.linear + BF16_BYTES * (counts.total - counts.linear)
    return BF16_BYTES * counts.total


def _gradient_bytes(counts: ParameterCounts, grad_reduce_in_fp32: bool) -> int:
    """Megatron DDP's contiguous grad buffer: one entry per local parameter, never sharded."""
    return (FP32_BYTES if grad_reduce_in_fp32 else BF16_BYTES) * counts.total


def _optimizer_bytes(counts: ParameterCounts, shards: int, use_distributed_optimizer: bool) -> int:
    """fp32 main params + Adam moments; the distributed optimizer shards them over DP x CP (``shards``)."""
    state = OPTIMIZER_BYTES_PER_PARAM * counts.total
    return -(-state // shards) if use_distributed_optimizer else state


def _check_precision(precision: str, fp8_param_gather: bool) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r}).")
    if fp8_param_gather and precision != "fp8":
        raise ValueError("fp8_param_gather keeps weights in FP8 and needs precision='fp8'.")


def plan_training(
    arch: LlamaConfig | str,
    layout: ParallelLayout,
    world_size: int,
    global_batch_size: int,
    micro_batch_size: int,
    precision: PrecisionName = "fp8",
    *,
    use_distributed_optimizer: bool = True,
    grad_reduce_in_fp32: bool = False,
    fp8_param_gather: bool = False,
) -> TrainingPlan:
    """Validate ``layout`` and compute the :class:`TrainingPlan` of one training step, on the CPU.

    Raises :class:`~lightning_llama_fp8.layout.LayoutError` for a layout that cannot run and ``ValueError``
    for an unknown precision or FP8 param gather without FP8. Activation memory is an estimate (one micro
    batch alive at a time, no pipeline parallelism); CUDA context, NCCL buffers, allocator fragmentation and
    TE workspaces are not counted.
    """
    cfg = resolve_arch(arch)
    _check_precision(precision, fp8_param_gather)
    dp = validate_layout(layout, world_size, cfg, global_batch_size, micro_batch_size)
    tp, cp = layout.tensor_model_parallel_size, layout.context_parallel_size
    counts = parameters_per_rank(cfg, tp)
    activations = estimate_activations(cfg, layout, micro_batch_size, precision)
    memory = MemoryBreakdown(
        weights=_weight_bytes(counts, precision, fp8_param_gather),
        gradients=_gradient_bytes(counts, grad_reduce_in_fp32),
        optimizer=_optimizer_bytes(counts, dp * cp, use_distributed_optimizer),
        activations=activations.total,
    )
    flops_per_step = cfg.flops_per_token() * global_batch_size * cfg.seq_length
    return TrainingPlan(
        arch=cfg,
        layout=layout,
        world_size=world_size,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        precision=precision,
        use_distributed_optimizer=use_distributed_optimizer,
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        fp8_param_gather=fp8_param_gather,
        data_parallel_size=dp,
        num_microbatches=global_batch_size // (micro_batch_size * dp),
        total_parameters=cfg.num_parameters(tp),
        parameters_per_gpu=counts.total,
        parameter_counts=counts,
        memory=memory,
        activations=activations,
        flops_per_token=cfg.flops_per_token(),
        flops_per_step=flops_per_step,
        flops_per_gpu_per_step=flops_per_step / world_size,
    )


# ------------------------------------------------------------------------------------------ rendering
def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:,.2f} GiB"


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _header_rows(plan: TrainingPlan) -> list[tuple[str, str]]:
    a, lay = plan.arch, plan.layout
    return [
        (
            "Model",
            f"{a.num_layers} layers, hidden {a.hidden_size:,}, FFN {a.ffn_hidden_size:,}, "
            f"heads {a.num_attention_heads}/{a.num_query_groups} (Q/KV), vocab {a.vocab_size:,}, "
            f"seq {a.seq_length:,}",
        ),
        (
            "Layout",
            f"TP {lay.tensor_model_parallel_size} x CP {lay.context_parallel_size} x DP "
            f"{plan.data_parallel_size} = {plan.world_size} GPU{'s' if plan.world_size != 1 else ''}, "
            f"sequence parallel {_on_off(lay.sequence_parallel)}",
        ),
        (
            "Batch",
            f"global {plan.global_batch_size:,}, micro {plan.micro_batch_size:,}, "
            f"{plan.num_microbatches:,} micro batches per step, {plan.tokens_per_step:,} tokens per step",
        ),
        (
            "Precision",
            f"{plan.precision}, FP8 param gather {_on_off(plan.fp8_param_gather)}, distributed optimizer "
            f"{_on_off(plan.use_distributed_optimizer)}, grad reduce in "
            f"{'fp32' if plan.grad_reduce_in_fp32 else 'bf16'}",
        ),
        ("Parameters", f"{plan.total_parameters:,} total, {plan.parameters_per_gpu:,} per GPU"),
    ]


def _memory_rows(plan: TrainingPlan) -> list[tuple[str, str]]:
    m = plan.memory
    return [
        ("  weights", _gib(m.weights)),
        ("  gradients", _gib(m.gradients)),
        ("  optimizer", _gib(m.optimizer)),
        ("  activations (estimate)", _gib(m.activations)),
        ("  total", _gib(m.total)),
    ]


def _flops_rows(plan: TrainingPlan) -> list[tuple[str, str]]:
    return [
        ("  per token", f"{plan.flops_per_token / TERA:.4f} TFLOP"),
        ("  per step", f"{plan.flops_per_step / TERA:,.2f} TFLOP"),
        ("  per GPU per step", f"{plan.flops_per_gpu_per_step / TERA:,.2f} TFLOP"),
    ]


def format_plan(plan: TrainingPlan) -> str:
    """Render ``plan`` as a readable two-column table."""
    rows = _header_rows(plan)
    rows += [("Memory per GPU", ""), *_memory_rows(plan)]
    rows += [("Compute (Megatron-LM count)", ""), *_flops_rows(plan)]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k:<{width}}{v}".rstrip() for k, v in rows]
    lines.append(
        "Activations are an estimate; not counted: CUDA context, NCCL buffers, allocator fragmentation, TE workspaces."
    )
    return "\n".join(lines)
