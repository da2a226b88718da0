"""This rank's place in Megatron's process groups, read from ``parallel_state`` once it is initialised."""

from __future__ import annotations


def data_parallel_size_and_rank() -> tuple[int, int]:
    """DP size and rank from Megatron's ``parallel_state``, or (1, 0) when it is not initialised.

    The DP group excludes tensor/pipeline/context-parallel peers: those ranks must see the same samples, so they
    count as one data-parallel replica.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    return 1, 0
