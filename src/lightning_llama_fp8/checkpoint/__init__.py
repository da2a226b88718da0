"""Distributed checkpoints: their format and checks, atomic directories, Megatron's sharded I/O, background saves,
the strategy's checkpoint hooks and the pre-flight checks of every location a run writes to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llama_fp8._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo, read_checkpoint_info

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "read_checkpoint_info",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": "lightning_llama_fp8.checkpoint.info",
        "CheckpointInfo": "lightning_llama_fp8.checkpoint.info",
        "read_checkpoint_info": "lightning_llama_fp8.checkpoint.info",
    },
)
