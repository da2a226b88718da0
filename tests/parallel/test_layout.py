"""Parallel layout validation (parallel/layout.py): every problem of a layout named, all of them at once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lightning_llama_fp8.config import LlamaConfig, get_preset, llama3_8b
from lightning_llama_fp8.parallel.layout import LayoutError, ParallelLayout, validate_layout


def layout(tp: int = 1, cp: int = 1, sp: bool = False, comm: str = "p2p") -> ParallelLayout:
    return ParallelLayout(
        tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp, cp_comm_type=comm
    )


def problems(err: pytest.ExceptionInfo[LayoutError]) -> list[str]:
    """The bullet points of a LayoutError message."""
    message = str(err.value)
    assert message.startswith("Invalid parallel layout:\n  - ")
    return message.split("\n  - ")[1:]


# ---------------------------------------------------------------------------------------------- valid layouts
@pytest.mark.parametrize(
    "world,tp,cp,dp",
    [(1, 1, 1, 1), (8, 1, 1, 8), (8, 1, 2, 4), (8, 2, 2, 2), (8, 8, 1, 1), (16, 2, 4, 2), (64, 8, 2, 4)],
)
def test_valid_layout_returns_data_parallel_size(world: int, tp: int, cp: int, dp: int) -> None:
    lay = layout(tp, cp)
    assert validate_layout(lay, world) == dp
    assert validate_layout(lay, world, arch=llama3_8b()) == dp
    assert lay.model_parallel_size == tp * cp
    assert lay.data_parallel_size(world) == dp


def test_reference_fp8_recipe_layout_is_valid() -> None:
    # Megatron-LM's 8B FP8 recipe: 8 GPUs, TP1 CP2, GBS 128, MBS 1.
    assert validate_layout(layout(1, 2), 8, arch=llama3_8b(), global_batch_size=128, micro_batch_size=1) == 4
    # Sequence parallel with TP2 CP2, every CP comm type.
    for comm in ("p2p", "a2a", "all_gather"):
        lay = layout(2, 2, sp=True, comm=comm)
        assert validate_layout(lay, 8, arch=llama3_8b(), global_batch_size=64, micro_batch_size=2) == 2


# ---------------------------------------------------------------------------------------------- each problem
@pytest.mark.parametrize(
    "world,tp,cp,expected",
    [
        (6, 4, 1, "world size 6 is not divisible by TP 4 x CP 1 = 4"),
        (8, 2, 3, "world size 8 is not divisible by TP 2 x CP 3 = 6"),
        (2, 1, 4, "world size 2 is not divisible by TP 1 x CP 4 = 4"),
    ],
)
def test_world_size_not_divisible_by_model_parallel(world: int, tp: int, cp: int, expected: str) -> None:
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp, cp), world)
    assert len(problems(err)) == 1
    assert expected in str(err.value)
    assert f"a multiple of {tp * cp}" in str(err.value)  # the fix


def test_heads_not_divisible_by_tp() -> None:
    # Llama 3.2 3B: 24 heads, 8 query groups; TP 16 splits neither evenly.
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=16), 16, arch=get_preset("llama3_2_3b"))
    found = problems(err)
    assert len(found) == 2
    assert found[0].startswith("num_attention_heads 24 is not divisible by TP 16")
    assert "use a TP that divides 24" in found[0]
    assert found[1].startswith("num_query_groups 8 is not divisible by TP 16")


@pytest.mark.parametrize(
    "arch,tp",
    [
        (llama3_8b(), 16),  # 32 heads split over 16 ranks, but only 8 KV groups
        (LlamaConfig(num_attention_heads=24, num_query_groups=6, hidden_size=3072), 4),  # 24 / 4 ok, 6 / 4 not
    ],
    ids=["8b-tp16", "custom-6-groups-tp4"],
)
def test_query_groups_not_divisible_by_tp(arch: LlamaConfig, tp: int) -> None:
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=tp), tp, arch=arch)
    (only,) = problems(err)
    groups = arch.num_query_groups
    assert only.startswith(f"num_query_groups {groups} is not divisible by TP {tp}")
    assert f"use a TP that divides {groups}" in only
    assert "num_attention_heads" not in str(err.value)


@pytest.mark.parametrize("seq,cp", [(256, 3), (8190, 2), (8192, 3)])
def test_seq_length_not_divisible_by_twice_cp(seq: int, cp: int) -> None:
    arch = get_preset("llama_tiny", seq_length=seq)
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(cp=cp), cp, arch=arch)
    (only,) = problems(err)
    assert only.startswith(f"seq_length {seq} is not divisible by 2 x CP = {2 * cp}")
    # Without CP the same sequence is fine.
    assert validate_layout(layout(), 1, arch=arch) == 1


def test_context_parallel_needs_transformer_engine_spec() -> None:
    local = get_preset("llama_tiny", transformer_impl="local")
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(cp=2), 2, arch=local)
    (only,) = problems(err)
    assert "context parallelism needs the Transformer Engine layer spec" in only
    assert "transformer_impl: transformer_engine" in only
    # Local spec without CP, and TE spec with CP, are both fine.
    assert validate_layout(layout(tp=2), 2, arch=local) == 1
    assert validate_layout(layout(cp=2), 2, arch=get_preset("llama_tiny")) == 1


def test_sequence_parallel_needs_transformer_engine_spec() -> None:
    local = get_preset("llama_tiny", transformer_impl="local")
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=2, sp=True), 2, arch=local)
    (only,) = problems(err)
    assert only.startswith("sequence parallelism needs the Transformer Engine layer spec")
    assert validate_layout(layout(tp=2, sp=True), 2, arch=get_preset("llama_tiny")) == 1


def test_sequence_parallel_needs_seq_divisible_by_cp_times_tp() -> None:
    # 8196 = 4 x 2049: divisible by 2 x CP = 4, but each CP rank's 4098 tokens do not split over TP 4.
    arch = llama3_8b(seq_length=8196)
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=4, cp=2, sp=True), 8, arch=arch)
    (only,) = problems(err)
    assert only.startswith("sequence parallelism splits each rank's 4098 tokens over TP 4")
    assert "divisible by CP x TP" in only
    # Same without sequence parallelism: valid.
    assert validate_layout(layout(tp=4, cp=2), 8, arch=arch) == 1
    # Without CP: 8190 tokens over TP 4.
    with pytest.raises(LayoutError, match="splits each rank's 8190 tokens over TP 4"):
        validate_layout(layout(tp=4, sp=True), 4, arch=llama3_8b(seq_length=8190))


def test_a2a_needs_heads_per_tp_rank_divisible_by_cp() -> None:
    arch = get_preset("llama3_2_3b")  # 24 heads: 12 per rank at TP 2, which CP 8 cannot split
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=2, cp=8, comm="a2a"), 16, arch=arch)
    (only,) = problems(err)
    assert only.startswith("cp_comm_type 'a2a' scatters the 12 heads of each TP rank over CP 8")
    # Ring (p2p) and all_gather attention have no such constraint; a CP that divides 12 is fine with a2a.
    assert validate_layout(layout(tp=2, cp=8, comm="p2p"), 16, arch=arch) == 1
    assert validate_layout(layout(tp=2, cp=8, comm="all_gather"), 16, arch=arch) == 1
    assert validate_layout(layout(tp=2, cp=4, comm="a2a"), 16, arch=arch) == 2


def test_unknown_cp_comm_type() -> None:
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(cp=2, comm="ring"), 2)
    (only,) = problems(err)
    assert only == "cp_comm_type 'ring' is not one of p2p, a2a, all_gather."


@pytest.mark.parametrize("gbs,mbs,ok", [(128, 1, True), (16, 2, True), (12, 2, False), (6, 1, False), (4, 4, False)])
def test_global_batch_divisible_by_micro_batch_times_dp(gbs: int, mbs: int, ok: bool) -> None:
    lay = layout(tp=1, cp=2)  # DP 4 on 8 ranks
    if ok:
        assert validate_layout(lay, 8, global_batch_size=gbs, micro_batch_size=mbs) == 4
        return
    with pytest.raises(LayoutError) as err:
        validate_layout(lay, 8, global_batch_size=gbs, micro_batch_size=mbs)
    (only,) = problems(err)
    assert only.startswith(
        f"global batch size {gbs} is not divisible by micro batch size {mbs} x data-parallel size 4 = {4 * mbs}"
    )
    assert f"a multiple of {4 * mbs}" in only


def test_batch_sizes_are_only_checked_together() -> None:
    assert validate_layout(layout(cp=2), 8, global_batch_size=7) == 4
    assert validate_layout(layout(cp=2), 8, micro_batch_size=3) == 4


def test_several_problems_are_listed_together() -> None:
    arch = get_preset("llama_tiny", transformer_impl="local", seq_length=250)
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=4, cp=2, comm="ring"), 10, arch=arch, global_batch_size=7, micro_batch_size=2)
    found = problems(err)
    assert len(found) == 5
    assert found[0].startswith("world size 10 is not divisible by TP 4 x CP 2 = 8")
    assert found[1].startswith("cp_comm_type 'ring' is not one of")
    assert found[2].startswith("seq_length 250 is not divisible by 2 x CP = 4")
    assert found[3].startswith("context parallelism needs the Transformer Engine layer spec")
    assert found[4].startswith("global batch size 7 is not divisible by micro batch size 2 x data-parallel size 1")


@pytest.mark.parametrize(
    "world,tp,cp,pp", [(8, 0, 1, 1), (8, 1, 0, 1), (8, -2, 1, 1), (0, 1, 1, 1), (-1, 1, 1, 1), (8, 1, 1, 0)]
)
def test_sizes_below_one(world: int, tp: int, cp: int, pp: int) -> None:
    expected = f"Parallel sizes must be >= 1 (got TP={tp}, CP={cp}, PP={pp}, world size={world})."
    with pytest.raises(LayoutError) as err:
        validate_layout(replace(layout(tp, cp), pipeline_model_parallel_size=pp), world, arch=llama3_8b())
    assert str(err.value) == expected
    assert isinstance(err.value, ValueError)  # LayoutError is a ValueError for callers that catch those


# ---------------------------------------------------------------------------------------------- strategy


# ---------------------------------------------------------------------------------------------- real Trainer


def test_world_size_counts_pipeline_stages() -> None:
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by TP 2 x CP 1 x PP 2 = 4"):
        validate_layout(ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6)
    assert validate_layout(ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 8) == 2


def test_layout_sizes_are_whole_numbers_and_switches_true_or_false() -> None:
    """2.5 GPUs per model would be cut to 2 and "false" read as true; the ranges stay validate_layout's."""
    with pytest.raises(ValueError, match=r"^tensor_model_parallel_size must be a whole number; got 2\.5, which has"):
        ParallelLayout(tensor_model_parallel_size=2.5)
    with pytest.raises(ValueError, match=r"^num_layers_in_last_pipeline_stage must be a whole number; got True"):
        ParallelLayout(pipeline_model_parallel_size=2, num_layers_in_last_pipeline_stage=True)
    with pytest.raises(ValueError, match=r"^sequence_parallel must be true or false; got 'false' \(str\)"):
        ParallelLayout(tensor_model_parallel_size=2, sequence_parallel="false")
    assert ParallelLayout(context_parallel_size=2.0, virtual_pipeline_model_parallel_size=None) == layout(1, 2)


def test_ffn_hidden_size_not_divisible_by_tp() -> None:
    """Megatron asserted it on every rank once the data was built; the layout check says it first."""
    arch = get_preset("llama_tiny", ffn_hidden_size=769)
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(tp=2), 2, arch=arch)
    assert problems(err) == [
        "ffn_hidden_size 769 is not divisible by TP 2: each tensor-parallel rank holds an equal slice of the MLP; use "
        "a TP that divides 769."
    ]
