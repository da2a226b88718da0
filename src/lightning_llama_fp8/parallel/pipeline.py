"""Pipeline parallelism with Megatron-Core: this rank's model chunks, the schedule's inputs, the loss on every rank.

Lightning has no pipeline parallelism; Megatron-Core's schedules (``get_forward_backward_func``: 1F1B, and the
interleaved schedule with virtual stages) already run every training step of this package, so PP is a matter of
building the right chunks and feeding the schedule:

- :func:`pipeline_config_kwargs`: the TransformerConfig fields Megatron-LM sets for a pipeline.
- :func:`build_model_chunks`: one GPTModel per (virtual) stage of this rank, with the embedding only on the first
  chunk of the first stage and the output layer only on the last chunk of the last stage.
- :func:`chunk_data_iterators`: the schedule asks each chunk for every micro batch: one iterator per chunk.
- :func:`reduce_pipeline_loss`: only the last stage computes the loss; every rank gets the same global value, so
  logs, progress bars and ``NaNGuard``'s skip decisions agree across stages.

Which layers each chunk holds: ``pipeline_layout.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_llama_fp8.config import LlamaConfig
    from lightning_llama_fp8.parallel.layout import ParallelLayout


def pipeline_config_kwargs(layout: ParallelLayout) -> dict[str, Any]:
    """The pipeline fields of the model's TransformerConfig (empty without PP).

    The virtual size must equal the one given to ``parallel_state`` (the schedule is chosen from parallel_state, its
    warm-up length from the config). Activations travel between stages in BF16 (``pipeline_dtype``), the stage
    outputs already sent are freed early (``deallocate_pipeline_outputs``), and the interleaved schedule overlaps its
    sends and receives with compute as Megatron-LM's default does (``overlap_p2p_comm``; 1F1B batches them).
    """
    if layout.pipeline_model_parallel_size == 1:
        return {}
    from lightning_llama_fp8.parallel.layout import PIPELINE_FIELDS

    overlap = layout.interleaved
    return {
        **{name: getattr(layout, name) for name in PIPELINE_FIELDS},  # the same names in TransformerConfig
        "pipeline_dtype": torch.bfloat16,
        "deallocate_pipeline_outputs": True,
        "variable_seq_lengths": False,
        "overlap_p2p_comm": overlap,
        "batch_p2p_comm": not overlap,
    }


def build_model_chunks(arch: LlamaConfig, config: Any) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks, in virtual-stage order (one without a virtual pipeline).

    ``parallel_state`` must be initialised with the layout ``config`` describes.
    """
    from megatron.core import parallel_state

    virtual = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(virtual or 1):
        vp_stage = stage if virtual is not None else None
        chunks.append(
            arch.build_model(
                config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        )
    return chunks


def chunk_data_iterators(micro_batches: Sequence[Any], num_chunks: int) -> Iterator[Any] | list[Iterator[Any]]:
    """The schedule's ``data_iterator``: one iterator for one chunk, else one per chunk over all micro batches.

    The interleaved schedule runs every micro batch through every chunk and takes each chunk's input from that
    chunk's iterator; a shared iterator would hand chunks each other's micro batches. Whatever a micro batch holds
    travels with it to every chunk of every stage: with document masking its document boundaries, from which each
    stage's forward step builds the packed-sequence parameters its attention needs (the activations it receives
    from the stage before carry no such information).
    """
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def reduce_pipeline_loss(reports: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the micro batches' ``[loss sum, token count]`` reports, share them over the pipeline, then over DP x CP.

    The schedule returns the reports on the last pipeline stage only (an empty list elsewhere). Summing before
    dividing makes ``loss_sum / num_tokens`` the per-token loss of the whole global batch in any layout. Returns
    the global loss sum, the global token count, and this model replica's ``[loss sum, token count]`` (the same on
    every stage of it).
    """
    from megatron.core import parallel_state

    if reports:
        local = torch.stack([report["lm loss"] for report in reports]).sum(dim=0).float()
    else:
        local = torch.zeros(2, dtype=torch.float32, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage holds a non-zero value: the sum over the pipeline is its value, on every stage.
        torch.distributed.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    totals = local.clone()
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return totals[0], totals[1], local


def chunk_layer_offset(chunk: torch.nn.Module) -> int:
    """The global index of a GPTModel chunk's first transformer layer (0 without PP; its layers may be none)."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    if not layers:
        return 0
    return int(layers[0].layer_number) - 1  # Megatron numbers layers globally, from 1


_LAYER_PATH = re.compile(r"^(.*?(?:^|\.)layers\.(\d+))(?:\.|$)")


def global_module_name(name: str, modules: dict[str, torch.nn.Module]) -> str:
    """``name`` (as in ``named_modules()``) with its transformer layer index made global (``layers.3`` of pipeline
    stage 1 of a 32-layer PP2 model is ``layers.19``); unchanged outside the layers and without PP.

    ``modules`` is ``dict(root.named_modules())``; the layer's own ``layer_number`` (global, from 1) decides.
    """
    match = _LAYER_PATH.match(name)
    if match is None:
        return name
    layer = modules.get(match.group(1))
    number = getattr(layer, "layer_number", None)
    if not isinstance(number, int) or number - 1 == int(match.group(2)):
        return name
    prefix = match.group(1)[: -len(match.group(2))]
    return f"{prefix}{number - 1}{name[len(match.group(1)) :]}"


def gather_over_pipeline(value: Any) -> list[Any]:
    """``value`` of every pipeline stage of this rank's model replica, in stage order (a collective over the
    pipeline group; ``[value]`` without pipeline parallelism)."""
    if pipeline_stage() is None:
        return [value]
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    values: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(values, value, group=group)
    return values


def pipeline_stage() -> int | None:
    """This rank's pipeline stage, or None without pipeline parallelism (or before parallel_state exists)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_pipeline_model_parallel_rank()
