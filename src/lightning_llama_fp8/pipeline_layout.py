"""The documented path of the pipeline-stage arithmetic (it lives in :mod:`.parallel.pipeline_layout`)."""

from lightning_llama_fp8.parallel.pipeline_layout import (
    ModelChunk,
    bubble_fraction,
    largest_chunk_layers,
    model_chunks,
    stage_layer_counts,
)

__all__ = ["ModelChunk", "bubble_fraction", "largest_chunk_layers", "model_chunks", "stage_layer_counts"]
