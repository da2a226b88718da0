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
  single kernel or a single layer's backward are not counted. With pipeline parallelism each stage is planned
  on its own (its layers, the embedding on the first, the output layer on the last, and a copy of tied
  embeddings there too) and holds the activations of every micro batch (chunk) it has run forward but not yet
  backward at the peak of Megatron's schedule: PP - rank of them under 1F1B, the interleaved schedule's warm-up
  count + 1 chunks with virtual stages. With activation recompute
  (:class:`~lightning_llama_fp8.parallel.memory.RecomputeSettings`): selective recompute drops the recomputed modules'
  tensors from every layer; full recompute keeps one input per checkpointed chunk of layers and, in the
  backward pass, the activations of the one chunk being recomputed (or the logits, whichever is larger).
* The optimizer step: with gradients reduced in bf16, Megatron's optimizer makes an fp32 copy of this rank's
  gradient shard before it steps (freed at the next ``zero_grad``); activations are gone by then, so the peak
  is the larger of the two. With optimizer CPU offload (:class:`~..parallel.memory.OptimizerOffloadSettings`,
  Megatron's ``HybridDeviceOptimizer``) the offloaded share of the fp32 main weights, Adam moments and fp32
  gradients (16 bytes per parameter) lives in pinned host memory; the share left on the GPU keeps its fp32
  gradients between steps. With the precision-aware optimizer
  (:class:`~..parallel.optimizer_precision.OptimizerPrecisionSettings`) the main weights (2 bytes as remainders of
  bf16 weights, else 4) and moments (2 or 4 bytes each) are as asked, and the step reads the gradient buffer itself.
* With FP8 compute on bf16 weights (FP8 param gather off) Transformer Engine keeps an FP8 copy and an FP8 transpose
  of every linear weight (2 bytes per linear parameter), cached over the micro batches of a step and kept between
  steps: counted as ``fp8_weight_cache`` for the layers that run in FP8 (not those kept in BF16 by
  ``bf16_first_layers`` / ``bf16_last_layers``; MXFP8 / blockwise scale tensors are not counted).
* **Not counted at all**: the CUDA context and loaded kernels (about 0.5-1 GiB), NCCL communication buffers,
  PyTorch caching-allocator fragmentation and reserved-but-unused memory, Transformer Engine workspaces
  (cuBLAS workspaces, FP8 scaling metadata and amax histories), per-parameter temporaries of the offload copies,
  and the RoPE / attention-mask buffers (with document masking their upper bound is counted:
  :func:`document_masking_bytes`). Leave headroom on top of :attr:`MemoryBreakdown.total`: measured peaks on one
  H200 were 8.5-12.9% above it before the FP8 weight cache was counted (:data:`MEASURED_UNCOUNTED_SHARE`; the
  fit verdict of :func:`format_plan` asks for that room).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.data.packing import check_document_masking
from lightning_llama_fp8.hf.arch import resolve_arch
from lightning_llama_fp8.parallel.layout import ParallelLayout, validate_layout
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.parallel.optimizer_precision import (
    AUTO,
    OptimizerPrecision,
    OptimizerPrecisionSettings,
    resolve_optimizer_precision,
)
from lightning_llama_fp8.parallel.pipeline_layout import (
    bubble_fraction,
    largest_chunk_layers,
    model_chunks,
    stage_layer_counts,
)

PrecisionName = Literal["fp8", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp8", "bf16")

GIB = 1024**3
TERA = 1e12
BF16_BYTES = 2
FP8_BYTES = 1
FP32_BYTES = 4
INT32_BYTES = 4
# Megatron's mixed-precision Adam: fp32 main parameter + exp_avg + exp_avg_sq.
OPTIMIZER_BYTES_PER_PARAM = 3 * FP32_BYTES
# Megatron's HybridDeviceOptimizer also keeps an fp32 gradient per parameter it steps (on either device).
OFFLOADED_BYTES_PER_PARAM = OPTIMIZER_BYTES_PER_PARAM + FP32_BYTES


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


def parameters_per_stage(arch: LlamaConfig, layout: ParallelLayout, pipeline_rank: int) -> ParameterCounts:
    """Parameters one tensor-parallel rank of pipeline stage ``pipeline_rank`` holds (all its chunks)."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    whole = parameters_per_rank(arch, tp)
    layers = stage_layer_counts(layout, arch.num_layers)[pipeline_rank]
    first, last = pipeline_rank == 0, pipeline_rank == pp - 1
    # Tied embeddings across stages: the last stage keeps its own copy of the embedding as the output weight.
    output = whole.embedding if last and (not arch.tie_embeddings or pp > 1) else 0
    return ParameterCounts(
        embedding=whole.embedding if first else 0,
        output_layer=output,
        linear=whole.linear // arch.num_layers * layers,
        norms=2 * arch.hidden_size * layers + (arch.hidden_size if last else 0),
    )


def micro_batches_in_flight(layout: ParallelLayout, pipeline_rank: int, num_microbatches: int) -> int:
    """Chunk forward passes whose activations stage ``pipeline_rank`` holds at once at the peak of the schedule.

    1F1B: its warm-up forwards (PP - rank - 1) and the one of the steady state. Interleaved (Megatron-Core's
    ``get_pp_rank_microbatches``): (PP - rank - 1) x 2 + (chunks - 1) x PP warm-up chunk forwards, + 1, at most
    all of them. Without PP: one micro batch.
    """
    pp = layout.pipeline_model_parallel_size
    if pp == 1:
        return 1
    if not layout.interleaved:
        return min(pp - pipeline_rank, num_microbatches)
    total = num_microbatches * layout.chunks_per_stage
    warmup = (pp - pipeline_rank - 1) * 2 + (layout.chunks_per_stage - 1) * pp
    return min(warmup + 1, total)


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationEstimate:
    """Estimated activation bytes of one micro batch on one GPU (see the module docstring).

    ``per_layer`` lists ``(name, bytes)`` of what one decoder layer saves for backward (after selective recompute
    dropped ``recomputed_per_layer``); ``head`` the same for the final norm, the output layer and the loss. Under
    full recompute only ``checkpointed_inputs`` chunk inputs of ``layer_input_bytes`` each stay for the whole
    backward pass, ``layers_kept`` layers keep everything (``block`` method), and ``recompute_window`` layers at a
    time are rebuilt in the backward pass.
    """

    tokens_per_gpu: int
    per_layer: tuple[tuple[str, int], ...]
    head: tuple[tuple[str, int], ...]
    num_layers: int
    recompute: RecomputeSettings | None = None
    recomputed_per_layer: tuple[tuple[str, int], ...] = ()
    layer_input_bytes: int = 0
    checkpointed_inputs: int = 0
    layers_kept: int | None = None  # None: all layers
    recompute_window: int = 0
    #: Under pipeline parallelism: chunk forward passes alive at once (each keeping ``kept_bytes``), see
    #: :func:`micro_batches_in_flight`; ``num_layers`` are then one chunk's.
    in_flight: int = 1
    #: With document masking: the document boundaries each chunk forward pass keeps on the GPU (an upper bound).
    packed_bytes: int = 0

    @property
    def layer_bytes(self) -> int:
        return sum(b for _, b in self.per_layer)

    @property
    def head_bytes(self) -> int:
        return sum(b for _, b in self.head)

    @property
    def kept_bytes(self) -> int:
        """What the layers hold through the whole backward pass (chunk inputs and fully kept layers)."""
        kept = self.num_layers if self.layers_kept is None else self.layers_kept
        return self.checkpointed_inputs * self.layer_input_bytes + kept * self.layer_bytes

    @property
    def total(self) -> int:
        """The peak: at the loss (kept + head), or while a chunk is recomputed (kept + that chunk's layers)."""
        kept = self.in_flight * (self.kept_bytes + self.packed_bytes)
        return kept + max(self.head_bytes, self.recompute_window * self.layer_bytes)


# Names of the layer terms that recompute drops or keeps.
LAYER_INPUT = "input_norm input (layer input, bf16)"
QKV_INPUT = "QKV linear input (norm output)"
ATTENTION_OUTPUT = "attention output (bf16)"
ATTENTION_LSE = "attention softmax LSE (fp32)"
MLP_NORM_RSTD = "pre_mlp_norm rstd (fp32)"
FC1_INPUT = "fc1 linear input (norm output)"
FC1_OUTPUT = "fc1 output, gate + up (bf16, saved by SwiGLU)"
FC2_INPUT = "fc2 linear input (SwiGLU output)"


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
        (LAYER_INPUT, BF16_BYTES * n * h // sp),
        ("input_norm rstd (fp32)", FP32_BYTES * n // sp),
        (QKV_INPUT, lin * n * h // sp),
        ("Q, K, V after RoPE (bf16, saved by attention)", BF16_BYTES * n * (q + 2 * kv) // tp),
        (ATTENTION_OUTPUT, BF16_BYTES * n * q // tp),
        (ATTENTION_LSE, FP32_BYTES * n * heads),
        # In bf16 the output projection saves the attention output itself (no extra bytes); in FP8 it
        # keeps an FP8 copy of it.
        ("proj linear input (FP8 copy)", FP8_BYTES * n * q // tp if precision == "fp8" else 0),
        # The residual adds (no bias, no dropout) save nothing. MLP block:
        ("pre_mlp_norm input (residual, bf16)", BF16_BYTES * n * h // sp),
        (MLP_NORM_RSTD, FP32_BYTES * n // sp),
        (FC1_INPUT, lin * n * h // sp),
        (FC1_OUTPUT, BF16_BYTES * n * 2 * f // tp),
        (FC2_INPUT, lin * n * f // tp),
    )


def _selectively_recomputed(modules: tuple[str, ...], precision: PrecisionName) -> set[str]:
    """The layer terms that selective recompute of ``modules`` does not keep.

    ``core_attn``: the attention kernel keeps only its inputs (Q, K, V); its output stays only where the output
    projection saves it (bf16: that very tensor; FP8: an FP8 copy, so the bf16 output goes). ``mlp``: the MLP keeps
    only its input, the residual. ``layernorm`` (separate norm modules): the norm outputs the linears would save.
    """
    dropped: set[str] = set()
    if "core_attn" in modules:
        dropped |= {ATTENTION_LSE} | ({ATTENTION_OUTPUT} if precision == "fp8" else set())
    if "mlp" in modules:
        dropped |= {MLP_NORM_RSTD, FC1_INPUT, FC1_OUTPUT, FC2_INPUT}
    if "layernorm" in modules:
        dropped |= {QKV_INPUT, FC1_INPUT}
    return dropped


def _head_activation_terms(arch: LlamaConfig, layout: ParallelLayout, tokens: int) -> tuple[tuple[str, int], ...]:
    """Final norm, LM head and loss: the LM head runs in bf16 outside FP8, the loss in fp32."""
    tp = layout.tensor_model_parallel_size
    sp = tp if layout.sequence_parallel else 1
    n, h = tokens, arch.hidden_size
    vocab_shard = arch.padded_vocab_size(tp) // tp
    if arch.cross_entropy_impl == "te":
        # TE's kernel (TE >= config.TE_CROSS_ENTROPY_MIN_VERSION) copies the bf16 logits and keeps the copy (plus two
        # fp32 statistics per token) for backward, where it overwrites the copy with the logits' gradient.
        loss_term = ("cross-entropy saved logits / grad, vocab shard (bf16)", BF16_BYTES * n * vocab_shard)
    else:
        # Megatron's kernels (fused or not) turn an fp32 copy into the softmax in place and keep it for backward
        # (where it becomes the logits' gradient).
        loss_term = ("cross-entropy softmax / grad, vocab shard (fp32)", FP32_BYTES * n * vocab_shard)
    return (
        ("final_norm input (bf16)", BF16_BYTES * n * h // sp),
        ("final_norm rstd (fp32)", FP32_BYTES * n // sp),
        ("output layer input (bf16)", BF16_BYTES * n * h // sp),
        # Peak at the loss: the bf16 logits of this rank's vocab shard and the buffer cross entropy keeps.
        ("logits, vocab shard (bf16)", BF16_BYTES * n * vocab_shard),
        loss_term,
    )


def estimate_activations(
    arch: LlamaConfig,
    layout: ParallelLayout,
    micro_batch_size: int,
    precision: PrecisionName,
    recompute: RecomputeSettings | None = None,
    *,
    pipeline_rank: int = 0,
    num_microbatches: int = 1,
) -> ActivationEstimate:
    """Estimate the activation bytes on one GPU (see the module docstring): one micro batch without PP, else the
    micro batches (chunks) pipeline stage ``pipeline_rank`` holds at the peak of its schedule."""
    tokens = micro_batch_size * arch.seq_length // layout.context_parallel_size
    terms = _layer_activation_terms(arch, layout, tokens, precision)
    last = pipeline_rank == layout.pipeline_model_parallel_size - 1
    head = _head_activation_terms(arch, layout, tokens) if last else ()
    layers = stage_layer_counts(layout, arch.num_layers)[pipeline_rank] // layout.chunks_per_stage
    in_flight = micro_batches_in_flight(layout, pipeline_rank, num_microbatches)
    if recompute is None:
        return ActivationEstimate(tokens, terms, head, layers, in_flight=in_flight)
    if recompute.granularity == "selective":
        dropped = _selectively_recomputed(recompute.resolved_modules, precision)
        return ActivationEstimate(
            tokens,
            tuple(t for t in terms if t[0] not in dropped),
            head,
            layers,
            recompute=recompute,
            recomputed_per_layer=tuple(t for t in terms if t[0] in dropped),
            in_flight=in_flight,
        )
    # Full recompute: each checkpointed chunk keeps its input hidden states (what the layer input term counts).
    k = recompute.resolved_num_layers(layers)
    assert k is not None
    input_bytes = dict(terms)[LAYER_INPUT]
    if recompute.resolved_method == "uniform":
        chunks, kept, window = -(-layers // k), 0, min(k, layers)
    else:  # block: the first k layers are checkpointed one by one, the others keep everything
        chunks, kept, window = min(k, layers), layers - min(k, layers), 1
    return ActivationEstimate(
        tokens,
        terms,
        head,
        layers,
        recompute=recompute,
        layer_input_bytes=input_bytes,
        checkpointed_inputs=chunks,
        layers_kept=kept,
        recompute_window=window,
        in_flight=in_flight,
    )


# ------------------------------------------------------------------------------------------ document masking
#: Megatron-Core's ``RotaryEmbedding.forward`` is an ``lru_cache(maxsize=32)`` keyed by the sequence length it is
#: asked for; with document masking that is each micro batch's longest document, so up to 32 tables stay cached.
ROPE_CACHE_ENTRIES = 32


def document_masking_bytes(arch: LlamaConfig, micro_batch_size: int) -> tuple[int, int]:
    """What document masking adds on one GPU, upper bounds: (bytes per chunk forward pass in flight, bytes for the
    whole run).

    Per forward pass: the micro batch's document boundaries, an int32 per document + 1 (at most one per token),
    which attention keeps for its backward pass. For the run: the RoPE tables (fp32, ``seq x kv_channels``) that
    Megatron caches, one per longest-document length, besides the one table it caches without masking. The
    attention itself keeps no more: Transformer Engine's cuDNN attention keeps one softmax statistic per token and
    head for packed sequences as for unpacked ones (cuDNN >= 9.6).
    """
    boundaries = INT32_BYTES * (micro_batch_size * arch.seq_length + 1)
    rope = (ROPE_CACHE_ENTRIES - 1) * arch.seq_length * arch.kv_channels * FP32_BYTES
    return boundaries, rope


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU. ``activations`` is an estimate; see the module docstring for what is not counted.

    ``optimizer`` is the optimizer state on the GPU; ``optimizer_step`` the fp32 gradient copy the step makes
    (activations are freed by then, so ``total`` counts the larger of the two); ``host`` the pinned CPU memory of
    an offloaded optimizer (not part of ``total``).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_step: int = 0
    host: int = 0
    #: With document masking: the RoPE tables Megatron caches besides the one it keeps anyway (see
    #: :func:`document_masking_bytes`), for the whole run.
    rope_cache: int = 0
    #: FP8 compute on bf16 weights: Transformer Engine's cached FP8 copy and transpose of each linear weight.
    fp8_weight_cache: int = 0
    total: int = field(init=False)

    def __post_init__(self) -> None:
        peak = max(self.activations, self.optimizer_step)
        kept = self.weights + self.gradients + self.optimizer + self.rope_cache + self.fp8_weight_cache
        object.__setattr__(self, "total", kept + peak)


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage's share of a :class:`TrainingPlan` (the whole model without PP), per GPU."""

    pipeline_rank: int
    layers: tuple[range, ...]  # global layer indices of each of its chunks
    parameter_counts: ParameterCounts
    memory: MemoryBreakdown
    activations: ActivationEstimate


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
    recompute: RecomputeSettings | None
    optimizer_offload: OptimizerOffloadSettings | None
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
    #: Every pipeline stage (one without PP); ``memory``, ``parameter_counts`` and ``activations`` above are
    #: those of the stage with the highest peak, the one that decides whether the layout fits.
    stages: tuple[StagePlan, ...] = ()
    #: Share of each step the stages idle while the pipeline fills and drains (0 without PP).
    bubble_fraction: float = 0.0
    #: Each document attends only to itself (``GPTDataModule(document_masking=True)``); what it adds to memory is in
    #: ``memory.rope_cache`` and ``activations.packed_bytes``.
    document_masking: bool = False
    #: Megatron's precision-aware optimizer (``None``: its default fp32 main weights and moments).
    optimizer_precision: OptimizerPrecisionSettings | None = None

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


def _fp8_weight_cache_bytes(
    counts: ParameterCounts, precision: PrecisionName, fp8_param_gather: bool, layers: int, fp8_layers: int
) -> int:
    """FP8 compute on bf16 weights: TE's cached FP8 weight and its transpose (1 byte each per linear parameter) of the
    ``fp8_layers`` of a stage's ``layers`` that run in FP8."""
    if precision != "fp8" or fp8_param_gather or layers == 0:
        return 0
    return 2 * FP8_BYTES * counts.linear * fp8_layers // layers


def _optimizer_bytes(
    counts: ParameterCounts,
    shards: int,
    use_distributed_optimizer: bool,
    grad_reduce_in_fp32: bool,
    offload: OptimizerOffloadSettings | None,
    optimizer_precision: OptimizerPrecisionSettings | None = None,
) -> tuple[int, int, int]:
    """(GPU state, GPU transient at the step, host state) of Megatron's mixed-precision Adam.

    fp32 main params + Adam moments; the distributed optimizer shards them over DP x CP (``shards``). With bf16
    gradients the step first copies this rank's gradient shard to fp32 (``.float()``; a no-op for fp32 ones).
    Offloaded (``HybridDeviceOptimizer``): the offloaded share of main params, moments and fp32 gradients sits in
    host memory; the GPU share keeps its fp32 gradients between steps instead of a transient copy. Precision-aware
    (``optimizer_precision``): main weights and moments at the bytes asked for, no gradient copy.
    """
    params = -(-counts.total // shards) if use_distributed_optimizer else counts.total
    if optimizer_precision is not None:
        return optimizer_precision.bytes_per_parameter() * params, 0, 0
    if offload is not None:
        on_host = round(params * offload.fraction)
        return OFFLOADED_BYTES_PER_PARAM * (params - on_host), 0, OFFLOADED_BYTES_PER_PARAM * on_host
    step = 0 if grad_reduce_in_fp32 else FP32_BYTES * params
    return OPTIMIZER_BYTES_PER_PARAM * params, step, 0


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
    recompute: RecomputeSettings | None = None,
    optimizer_offload: OptimizerOffloadSettings | None = None,
    fp8_recipe: str = "delayed",
    document_masking: bool = False,
    fp8_attention: bool = False,
    optimizer_precision: OptimizerPrecision = AUTO,
    checkpoint_optimizer_sharding: str = "dp_reshardable",
    bf16_first_layers: int = 0,
    bf16_last_layers: int = 0,
) -> TrainingPlan:
    """Validate ``layout`` and compute the :class:`TrainingPlan` of one training step, on the CPU.

    Raises :class:`~lightning_llama_fp8.parallel.layout.LayoutError` for a layout that cannot run and ``ValueError``
    for an unknown precision, FP8 param gather without FP8, or recompute / offload settings the strategy would
    refuse (``fp8_recipe`` is only read for those checks), or document masking where it cannot run (context
    parallelism, Megatron's own attention, FP8 attention: ``fp8_attention`` is only read for that check). Activation
    memory is an estimate (one micro batch alive at a time, or under PP the micro batches a stage's schedule keeps
    alive); CUDA context, NCCL buffers, allocator fragmentation and TE workspaces are not counted.
    ``optimizer_precision="auto"`` (the strategy's default) is resolved as a new run resolves it
    (``resolve_optimizer_precision``; a resumed run keeps its checkpoint's optimizer state instead).
    """
    cfg = resolve_arch(arch)
    _check_precision(precision, fp8_param_gather)
    optimizer_precision = resolve_optimizer_precision(
        optimizer_precision,
        use_distributed_optimizer=use_distributed_optimizer,
        fp8_param_gather=fp8_param_gather,
        optimizer_offloaded=optimizer_offload is not None,
        checkpoint_optimizer_sharding=checkpoint_optimizer_sharding,
        transformer_engine_layers=cfg.transformer_impl == "transformer_engine",
    )
    dp = validate_layout(layout, world_size, cfg, global_batch_size, micro_batch_size)
    recipe = fp8_recipe if precision == "fp8" else None
    if recompute is not None:
        recompute.check(largest_chunk_layers(layout, cfg.num_layers), cfg.transformer_impl, recipe)
    if optimizer_offload is not None:
        optimizer_offload.check(use_distributed_optimizer, recipe, fp8_param_gather)
    if optimizer_precision is not None:
        optimizer_precision.check(
            use_distributed_optimizer,
            fp8_param_gather,
            optimizer_offloaded=optimizer_offload is not None,
            checkpoint_optimizer_sharding=checkpoint_optimizer_sharding,
        )
    if document_masking:
        check_document_masking(
            context_parallel_size=layout.context_parallel_size,
            transformer_impl=cfg.transformer_impl,
            attention_backend=cfg.attention_backend,
            fp8_attention=fp8_attention and precision == "fp8",
        )
    packed_bytes, rope_cache = document_masking_bytes(cfg, micro_batch_size) if document_masking else (0, 0)
    tp, cp = layout.tensor_model_parallel_size, layout.context_parallel_size
    num_microbatches = global_batch_size // (micro_batch_size * dp)

    def stage(rank: int) -> StagePlan:
        counts = parameters_per_stage(cfg, layout, rank)
        activations = estimate_activations(
            cfg, layout, micro_batch_size, precision, recompute, pipeline_rank=rank, num_microbatches=num_microbatches
        )
        if packed_bytes:
            activations = dataclasses.replace(activations, packed_bytes=packed_bytes)
        layers = tuple(chunk.layers for chunk in model_chunks(layout, cfg.num_layers, rank))
        indices = [index for chunk in layers for index in chunk]
        fp8_layers = sum(bf16_first_layers <= index < cfg.num_layers - bf16_last_layers for index in indices)
        optimizer, optimizer_step, host = _optimizer_bytes(
            counts,
            dp * cp,
            use_distributed_optimizer,
            grad_reduce_in_fp32,
            optimizer_offload,
            optimizer_precision,
        )
        memory = MemoryBreakdown(
            weights=_weight_bytes(counts, precision, fp8_param_gather),
            gradients=_gradient_bytes(counts, grad_reduce_in_fp32),
            optimizer=optimizer,
            activations=activations.total,
            optimizer_step=optimizer_step,
            host=host,
            rope_cache=rope_cache,
            fp8_weight_cache=_fp8_weight_cache_bytes(counts, precision, fp8_param_gather, len(indices), fp8_layers),
        )
        return StagePlan(rank, layers, counts, memory, activations)

    stages = tuple(stage(rank) for rank in range(layout.pipeline_model_parallel_size))
    peak = max(stages, key=lambda plan: plan.memory.total)
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
        recompute=recompute,
        optimizer_offload=optimizer_offload,
        data_parallel_size=dp,
        num_microbatches=num_microbatches,
        total_parameters=cfg.num_parameters(tp),
        parameters_per_gpu=peak.parameter_counts.total,
        parameter_counts=peak.parameter_counts,
        memory=peak.memory,
        activations=peak.activations,
        flops_per_token=cfg.flops_per_token(),
        flops_per_step=flops_per_step,
        flops_per_gpu_per_step=flops_per_step / world_size,
        stages=stages,
        bubble_fraction=bubble_fraction(layout, num_microbatches),
        document_masking=document_masking,
        optimizer_precision=optimizer_precision,
    )


# ------------------------------------------------------------------------------------------ rendering
