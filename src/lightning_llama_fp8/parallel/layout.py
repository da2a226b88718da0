"""Parallel layout (TP x CP x PP x DP) and its validation.

Every check here runs on the CPU before a process group, a model or a dataset exists, so a layout that
cannot work fails in seconds with a message that names the numbers and the fix, instead of minutes later
inside NCCL or a shape assertion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.parallel.pipeline_layout import interleaved_schedule_problems, pipeline_problems
from lightning_llama_fp8.validate import as_bool, as_int, as_optional_int

CPCommType = Literal["p2p", "a2a", "all_gather"]
CP_COMM_TYPES: tuple[str, ...] = ("p2p", "a2a", "all_gather")


#: The fields that make the pipeline split (what a dp_reshardable optimizer state depends on, with TP and CP).
PIPELINE_FIELDS: tuple[str, ...] = (
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage",
)


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class ParallelLayout:
    """How the GPUs are split. Data parallelism takes whatever TP x CP x PP leaves of the world size.

    Pipeline parallelism (PP) splits the layers into ``pipeline_model_parallel_size`` stages, each with
    ``virtual_pipeline_model_parallel_size`` model chunks for the interleaved schedule (None: one chunk, 1F1B).
    ``num_layers_in_first/last_pipeline_stage`` give the first / last stage another number of layers than the
    even split (they also hold the embedding and the output layer); the middle stages share the rest evenly.
    """

    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    cp_comm_type: CPCommType = "p2p"
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    def __post_init__(self) -> None:
        # Whole numbers only (2.0 is taken as 2, 2.5 or True refused); the ranges are validate_layout's to check.
        for name in ("tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size"):
            object.__setattr__(self, name, as_int(getattr(self, name), name))
        for name in PIPELINE_FIELDS[1:]:
            object.__setattr__(self, name, as_optional_int(getattr(self, name), name))
        object.__setattr__(self, "sequence_parallel", as_bool(self.sequence_parallel, "sequence_parallel"))

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    @property
    def chunks_per_stage(self) -> int:
        """Model chunks on each pipeline stage: the virtual pipeline size, or 1."""
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def pipeline_split(self) -> tuple[int, int | None, int | None, int | None]:
        """(PP, virtual PP, first-stage layers, last-stage layers): what a dp_reshardable optimizer state depends on."""
        return tuple(getattr(self, name) for name in PIPELINE_FIELDS)  # type: ignore[return-value]

    @property
    def interleaved(self) -> bool:
        """Whether Megatron runs its interleaved (virtual-pipeline) schedule."""
        return self.pipeline_model_parallel_size > 1 and self.virtual_pipeline_model_parallel_size is not None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


def resolve_param_gather(
    use_distributed_optimizer: bool, overlap_param_gather: bool | None, align_param_gather: bool
) -> bool:
    """Whether updated parameters are all-gathered during the next forward pass (``overlap_param_gather``; None:
    with the distributed optimizer, the only one that gathers parameters); ``LayoutError`` naming the fix for
    settings Megatron would refuse or ignore."""
    overlap = use_distributed_optimizer if overlap_param_gather is None else bool(overlap_param_gather)
    if overlap and not use_distributed_optimizer:
        raise LayoutError(
            "overlap_param_gather=True needs use_distributed_optimizer=True (only the distributed optimizer gathers "
            "parameters); leave overlap_param_gather unset (it follows use_distributed_optimizer) or set it false."
        )
    if align_param_gather and not overlap:  # Megatron reads it only for overlapped gathers
        raise LayoutError(
            "align_param_gather=True has no effect without overlapped parameter gathers (overlap_param_gather, on "
            "with the distributed optimizer): turn on both or neither."
        )
    return overlap


def validate_layout(
    layout: ParallelLayout,
    world_size: int,
    arch: LlamaConfig | None = None,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
) -> int:
    """Check that ``layout`` can run on ``world_size`` GPUs; return the data-parallel size.

    ``arch`` and the batch sizes are optional so the strategy can check what it knows early and the
    data module and ``llama-fp8 plan`` can check the rest.
    """
    tp, cp, pp = layout.tensor_model_parallel_size, layout.context_parallel_size, layout.pipeline_model_parallel_size
    problems: list[str] = []
    if tp < 1 or cp < 1 or pp < 1 or world_size < 1:
        raise LayoutError(f"Parallel sizes must be >= 1 (got TP={tp}, CP={cp}, PP={pp}, world size={world_size}).")
    model_parallel = layout.model_parallel_size
    if world_size % model_parallel != 0:
        sizes = f"TP {tp} x CP {cp}" + (f" x PP {pp}" if pp > 1 else "")
        problems.append(
            f"world size {world_size} is not divisible by {sizes} = {model_parallel}: use a number of GPUs "
            f"(devices x nodes) that is a multiple of {model_parallel}, or change tensor_model_parallel_size / "
            "context_parallel_size / pipeline_model_parallel_size."
        )
    if layout.cp_comm_type not in CP_COMM_TYPES:
        problems.append(f"cp_comm_type {layout.cp_comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}.")
    problems += pipeline_problems(layout, arch.num_layers if arch is not None else None)
    if arch is not None:
        problems += _model_problems(layout, arch)
    dp = max(layout.data_parallel_size(world_size), 1)
    batch_given = global_batch_size is not None and micro_batch_size is not None
    if batch_given and (global_batch_size < 1 or micro_batch_size < 1):
        problems.append(f"global and micro batch sizes must be >= 1 (got {global_batch_size} and {micro_batch_size}).")
    elif batch_given and global_batch_size % (micro_batch_size * dp) != 0:
        problems.append(
            f"global batch size {global_batch_size} is not divisible by micro batch size "
            f"{micro_batch_size} x data-parallel size {dp} = {micro_batch_size * dp}: pick a global batch "
            f"that is a multiple of {micro_batch_size * dp}."
        )
    elif batch_given and layout.interleaved:
        problems += interleaved_schedule_problems(layout, global_batch_size // (micro_batch_size * dp))
    if problems:
        raise LayoutError("Invalid parallel layout:\n  - " + "\n  - ".join(problems))
    return dp


def _model_problems(layout: ParallelLayout, arch: LlamaConfig) -> list[str]:
    tp, cp = layout.tensor_model_parallel_size, layout.context_parallel_size
    problems = []
    if arch.num_attention_heads % tp != 0:
        problems.append(
            f"num_attention_heads {arch.num_attention_heads} is not divisible by TP {tp}: each tensor-parallel "
            f"rank needs whole heads; use a TP that divides {arch.num_attention_heads}."
        )
    if arch.num_query_groups % tp != 0:
        problems.append(
            f"num_query_groups {arch.num_query_groups} is not divisible by TP {tp}: each tensor-parallel rank "
            f"needs whole key/value groups; use a TP that divides {arch.num_query_groups}."
        )
    if arch.ffn_hidden_size % tp != 0:
        problems.append(
            f"ffn_hidden_size {arch.ffn_hidden_size} is not divisible by TP {tp}: each tensor-parallel rank holds an "
            f"equal slice of the MLP; use a TP that divides {arch.ffn_hidden_size}."
        )
    if cp > 1 and arch.seq_length % (2 * cp) != 0:
        problems.append(
            f"seq_length {arch.seq_length} is not divisible by 2 x CP = {2 * cp}: context parallelism splits "
            "each sequence into 2 x CP load-balanced chunks."
        )
    if layout.sequence_parallel and tp > 1 and (arch.seq_length // cp) % tp != 0:
        problems.append(
            f"sequence parallelism splits each rank's {arch.seq_length // cp} tokens over TP {tp}: use a "
            "seq_length divisible by CP x TP."
        )
    if layout.sequence_parallel and tp > 1 and arch.transformer_impl != "transformer_engine":
        problems.append(
            "sequence parallelism needs the Transformer Engine layer spec (Megatron-Core's local spec builds "
            "RMSNorm as torch.nn.RMSNorm, which cannot split activations over TP): set transformer_impl: "
            "transformer_engine or sequence_parallel: false."
        )
    if cp > 1 and arch.transformer_impl != "transformer_engine":
        problems.append(
            "context parallelism needs the Transformer Engine layer spec: set transformer_impl: "
            "transformer_engine (and install the `te` extra)."
        )
    if cp > 1 and layout.cp_comm_type == "a2a" and (arch.num_attention_heads // tp) % cp != 0:
        problems.append(
            f"cp_comm_type 'a2a' scatters the {arch.num_attention_heads // tp} heads of each TP rank over CP {cp}; "
            "they must divide evenly. Use p2p or all_gather, or a CP that divides the heads per TP rank."
        )
    return problems
