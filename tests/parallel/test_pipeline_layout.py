"""Which layers each pipeline stage and chunk holds (parallel/pipeline_layout.py), against Megatron-Core's own
assignment; the pipeline splits Megatron cannot build, refused before anything starts."""

from __future__ import annotations

import pytest
import torch

from lightning_llama_fp8 import LayoutError, ParallelLayout, validate_layout
from lightning_llama_fp8.config import llama_tiny
from lightning_llama_fp8.parallel.pipeline_layout import bubble_fraction, model_chunks, stage_layer_counts
from tests.helpers.layouts import pipeline
from tests.helpers.models import CPU_ARCH

SPLITS = [  # (num_layers, pp, vpp, first, last)
    (8, 2, None, None, None),
    (32, 4, None, None, None),
    (8, 2, 2, None, None),
    (16, 4, 2, None, None),
    (80, 4, 5, None, None),  # Megatron-LM's Llama 3 70B layout: PP4 x VPP5, 4 layers a chunk
    (10, 4, None, 1, 3),
    (8, 3, None, 2, None),
    (7, 2, None, None, 3),
    (12, 4, 2, 2, 2),
    (14, 3, 2, 4, 2),
]


@pytest.mark.parametrize("num_layers,pp,vpp,first,last", SPLITS)
def test_chunks_hold_the_layers_megatron_core_assigns(
    num_layers: int, pp: int, vpp: int | None, first: int | None, last: int | None
) -> None:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layout = pipeline(pp, vpp, first, last)
    assert validate_layout(layout, pp, arch=llama_tiny(num_layers=num_layers)) == 1
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last, pipeline_dtype=torch.bfloat16,
    )  # fmt: skip
    chunks = model_chunks(layout, num_layers)
    for chunk in chunks:
        vp_stage = chunk.virtual_stage if vpp is not None else None
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=chunk.pipeline_rank)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=chunk.pipeline_rank)
        assert chunk.layers == range(offset, offset + count), chunk
    # Every layer in exactly one chunk; the embedding in the first chunk of stage 0, the output in the last one.
    assert sorted(layer for chunk in chunks for layer in chunk.layers) == list(range(num_layers))
    assert [(c.pipeline_rank, c.virtual_stage) for c in chunks if c.has_embedding] == [(0, 0)]
    assert [(c.pipeline_rank, c.virtual_stage) for c in chunks if c.has_output_layer] == [(pp - 1, (vpp or 1) - 1)]
    assert sum(stage_layer_counts(layout, num_layers)) == num_layers


def test_interleaved_chunks_take_turns_over_the_stages() -> None:
    chunks = model_chunks(pipeline(2, 2), 8)
    assert [(c.pipeline_rank, c.virtual_stage, list(c.layers)) for c in chunks] == [
        (0, 0, [0, 1]), (0, 1, [4, 5]), (1, 0, [2, 3]), (1, 1, [6, 7]),
    ]  # fmt: skip
    assert model_chunks(pipeline(2, 2), 8, pipeline_rank=1) == chunks[2:]


def test_bubble_fraction() -> None:
    assert bubble_fraction(ParallelLayout(), 8) == 0.0
    assert bubble_fraction(pipeline(4), 8) == pytest.approx(3 / 11)  # 1F1B: (p - 1) / (m + p - 1)
    assert bubble_fraction(pipeline(4, 2), 8) == pytest.approx(3 / 19)  # interleaved: (p - 1) / (v m + p - 1)


@pytest.mark.parametrize(
    "layout,num_layers,message",
    [
        (pipeline(3), 32, "num_layers 32 is not divisible by pipeline_model_parallel_size 3"),
        (pipeline(4, 3), 32, "each pipeline stage's 8 layers do not split into virtual_pipeline_model_parallel_size 3"),
        (pipeline(1, 2), 32, "virtual_pipeline_model_parallel_size=2 needs pipeline_model_parallel_size >= 2"),
        (pipeline(2, 1), 32, "virtual_pipeline_model_parallel_size must be None or >= 2 (got 1)"),
        (pipeline(1, first=4), 32, "need pipeline_model_parallel_size >= 2 (got 1)"),
        (pipeline(4, first=0), 32, "num_layers_in_first_pipeline_stage must be >= 1 (got 0)"),
        (pipeline(4, first=20, last=20), 32, "leaving -8 for 2 middle stage(s)"),
        (pipeline(2, first=20, last=20), 32, "the stages must hold exactly 32 layers"),
        (pipeline(3, first=5), 32, "the 27 layers left after the first/last stages do not split evenly over the 2"),
        (pipeline(3, 2, first=3), 31, "stages of 3 layers do not split into virtual_pipeline_model_parallel_size 2"),
    ],
)
def test_pipeline_layouts_megatron_cannot_build_are_refused(
    layout: ParallelLayout, num_layers: int, message: str
) -> None:
    world = layout.pipeline_model_parallel_size
    with pytest.raises(LayoutError, match="Invalid parallel layout") as err:
        validate_layout(layout, world, arch=llama_tiny(num_layers=num_layers))
    assert message in str(err.value)


def test_interleaved_schedule_needs_whole_groups_of_micro_batches() -> None:
    arch = llama_tiny(num_layers=8)
    layout = pipeline(2, 2)
    with pytest.raises(LayoutError, match=r"groups of PP 2, but each step has 3 \(global batch"):
        validate_layout(layout, 4, arch=arch, global_batch_size=6, micro_batch_size=1)  # DP2: 3 micro batches
    assert validate_layout(layout, 4, arch=arch, global_batch_size=8, micro_batch_size=1) == 2
    assert validate_layout(pipeline(2), 4, arch=arch, global_batch_size=6, micro_batch_size=1) == 2  # 1F1B: any


def test_recompute_num_layers_fits_the_largest_chunk_of_an_uneven_split() -> None:
    """One recompute_num_layers for every chunk; Megatron clamps it to each chunk's own layer count."""
    from lightning_llama_fp8 import MegatronCPStrategy, RecomputeSettings
    from lightning_llama_fp8.plan.estimate import plan_training

    layout = pipeline(4, first=2, last=2)  # stages of 2, 14, 14, 2 layers
    block = RecomputeSettings("full", "block", 8)
    strategy = MegatronCPStrategy(
        pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2
    )
    from lightning_llama_fp8.parallel.pipeline_layout import largest_chunk_layers

    assert largest_chunk_layers(strategy.layout, 32) == 14
    arch = llama_tiny(num_layers=32, **CPU_ARCH)
    plan = plan_training(arch, layout, 4, 8, 1, "bf16", recompute=block)
    assert [stage.activations.layers_kept for stage in plan.stages] == [0, 6, 6, 0]  # 14 - 8 kept whole
    with pytest.raises(ValueError, match="must be between 1 and the model's 14 transformer layers"):
        plan_training(arch, layout, 4, 8, 1, "bf16", recompute=RecomputeSettings("full", "block", 15))
