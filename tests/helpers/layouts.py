"""Parallel layouts of the parallel/ tests."""

from __future__ import annotations

from lightning_llama_fp8 import ParallelLayout


def pipeline(pp: int, vpp: int | None = None, first: int | None = None, last: int | None = None) -> ParallelLayout:
    """``pp`` pipeline stages (``vpp`` chunks each); the first/last stage holds ``first``/``last`` layers."""
    return ParallelLayout(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
    )
