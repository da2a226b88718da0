"""Which layers each pipeline stage and virtual chunk holds, and the pipeline rules Megatron enforces later.

Pure arithmetic (no torch, no process group), so ``validate_layout`` and ``llama-fp8 plan`` can use it before
anything is built. The assignment is Megatron-Core's (``get_num_layers_to_build`` /
``get_transformer_layer_offset``; ``tests/parallel/test_pipeline_layout.py`` checks the two agree): the first and
last stage take ``num_layers_in_first/last_pipeline_stage`` layers when given, the middle stages share the rest
evenly, and each stage's layers are split into ``virtual_pipeline_model_parallel_size`` equal chunks. Chunks are
numbered chunk-major: virtual chunk 0 of every stage in stage order holds the first layers, then chunk 1 of every
stage, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PipelineSplit(Protocol):
    """The pipeline fields of a layout (:class:`~lightning_llama_fp8.parallel.layout.ParallelLayout` has them)."""

    @property
    def pipeline_model_parallel_size(self) -> int: ...
    @property
    def virtual_pipeline_model_parallel_size(self) -> int | None: ...
    @property
    def num_layers_in_first_pipeline_stage(self) -> int | None: ...
    @property
    def num_layers_in_last_pipeline_stage(self) -> int | None: ...
    @property
    def chunks_per_stage(self) -> int:
        """Model chunks per stage: the virtual pipeline size, or 1."""
        ...


@dataclass(frozen=True)
class ModelChunk:
    """One (virtual) pipeline stage's model: ``layers`` global transformer layer indices (0-based)."""

    pipeline_rank: int
    virtual_stage: int
    layers: range
    has_embedding: bool  # the first chunk of the first stage
    has_output_layer: bool  # the last chunk of the last stage (final norm, output layer, loss)


def stage_layer_counts(layout: PipelineSplit, num_layers: int) -> list[int]:
    """Transformer layers per pipeline stage (all its chunks together)."""
    pp = layout.pipeline_model_parallel_size
    first, last = layout.num_layers_in_first_pipeline_stage, layout.num_layers_in_last_pipeline_stage
    if pp == 1:
        return [num_layers]
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    per_middle = middle_layers // middle_stages if middle_stages > 0 else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def model_chunks(layout: PipelineSplit, num_layers: int, pipeline_rank: int | None = None) -> list[ModelChunk]:
    """Every model chunk of the layout (or of one pipeline rank), in (pipeline rank, virtual stage) order.

    Assumes ``pipeline_problems(layout, num_layers)`` is empty.
    """
    pp, vpp = layout.pipeline_model_parallel_size, layout.chunks_per_stage
    per_chunk = [count // vpp for count in stage_layer_counts(layout, num_layers)]
    layers_per_round = sum(per_chunk)  # one chunk of every stage
    chunks = []
    for rank in range(pp) if pipeline_rank is None else [pipeline_rank]:
        for stage in range(vpp):
            start = stage * layers_per_round + sum(per_chunk[:rank])
            chunks.append(
                ModelChunk(
                    pipeline_rank=rank,
                    virtual_stage=stage,
                    layers=range(start, start + per_chunk[rank]),
                    has_embedding=rank == 0 and stage == 0,
                    has_output_layer=rank == pp - 1 and stage == vpp - 1,
                )
            )
    return chunks


def largest_chunk_layers(layout: PipelineSplit, num_layers: int) -> int:
    """The most transformer layers a model chunk holds. All chunks share one ``recompute_num_layers``, which
    Megatron clamps to each chunk's own layer count (``recompute.py``), so it may go up to this."""
    return max(len(chunk.layers) for chunk in model_chunks(layout, num_layers))


def pipeline_problems(layout: PipelineSplit, num_layers: int | None) -> list[str]:
    """What Megatron would refuse (or silently not do) about the pipeline split; ``num_layers`` None: not known."""
    pp, vpp = layout.pipeline_model_parallel_size, layout.virtual_pipeline_model_parallel_size
    first, last = layout.num_layers_in_first_pipeline_stage, layout.num_layers_in_last_pipeline_stage
    problems = []
    if vpp is not None and vpp < 2:
        problems.append(
            f"virtual_pipeline_model_parallel_size must be None or >= 2 (got {vpp}): it is the number of model "
            "chunks per pipeline stage; None runs one chunk per stage."
        )
        return problems
    if vpp is not None and pp < 2:
        problems.append(
            f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 (got {pp}): the "
            "interleaved schedule interleaves the chunks of several stages."
        )
    if (first is not None or last is not None) and pp < 2:
        problems.append(
            "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage need "
            f"pipeline_model_parallel_size >= 2 (got {pp})."
        )
        return problems
    for name, value in (("first", first), ("last", last)):
        if value is not None and value < 1:
            problems.append(f"num_layers_in_{name}_pipeline_stage must be >= 1 (got {value}).")
    if problems or num_layers is None or pp == 1:
        return problems
    chunks = vpp or 1
    if first is None and last is None:
        if num_layers % pp != 0:
            problems.append(
                f"num_layers {num_layers} is not divisible by pipeline_model_parallel_size {pp}: use a PP that "
                f"divides {num_layers}, or give the first/last stage their own number of layers "
                "(num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage)."
            )
        elif (num_layers // pp) % chunks != 0:
            problems.append(
                f"each pipeline stage's {num_layers // pp} layers do not split into "
                f"virtual_pipeline_model_parallel_size {chunks} equal chunks: use a virtual size that divides "
                f"{num_layers // pp}."
            )
        return problems
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        problems.append(
            f"the first/last stages take {(first or 0) + (last or 0)} layers, leaving {middle_layers} for "
            f"{middle_stages} middle stage(s) of a {num_layers}-layer model: the stages must hold exactly "
            f"{num_layers} layers."
        )
    elif middle_stages > 0 and (middle_layers == 0 or middle_layers % middle_stages != 0):
        problems.append(
            f"the {middle_layers} layers left after the first/last stages do not split evenly over the "
            f"{middle_stages} middle stage(s) (each needs at least one): change num_layers_in_first_pipeline_stage "
            "/ num_layers_in_last_pipeline_stage."
        )
    elif chunks > 1:
        counts = stage_layer_counts(layout, num_layers)
        uneven = sorted({count for count in counts if count % chunks != 0})
        if uneven:
            problems.append(
                f"stages of {', '.join(map(str, uneven))} layers do not split into "
                f"virtual_pipeline_model_parallel_size {chunks} equal chunks: every stage's layer count must be "
                f"a multiple of {chunks}."
            )
    return problems


def interleaved_schedule_problems(layout: PipelineSplit, num_microbatches: int) -> list[str]:
    """Megatron's interleaved schedule runs micro batches in groups of PP per chunk: it needs a whole number of them."""
    pp = layout.pipeline_model_parallel_size
    if num_microbatches >= pp and num_microbatches % pp == 0:
        return []
    return [
        f"the interleaved pipeline schedule (virtual_pipeline_model_parallel_size "
        f"{layout.virtual_pipeline_model_parallel_size}) runs micro batches in groups of PP {pp}, but each step has "
        f"{num_microbatches} (global batch / (micro batch x data-parallel size)): use a global batch that gives a "
        f"multiple of {pp} micro batches per data-parallel rank, or no virtual pipeline."
    ]


def bubble_fraction(layout: PipelineSplit, num_microbatches: int) -> float:
    """The share of a step each stage idles while the pipeline fills and drains (0 without PP).

    Megatron's papers (Narayanan et al. 2021) give the bubble as (PP - 1) / (chunks x micro batches) of the ideal
    step time for 1F1B and the interleaved schedule; as a share of the whole step that is
    (PP - 1) / (chunks x micro batches + PP - 1).
    """
    pp = layout.pipeline_model_parallel_size
    if pp == 1 or num_microbatches < 1:
        return 0.0
    return (pp - 1) / (layout.chunks_per_stage * num_microbatches + pp - 1)
