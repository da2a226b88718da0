"""Distributed checkpoints: their format and checks, atomic directories, Megatron's sharded I/O, background saves,
the strategy's checkpoint hooks and the pre-flight checks of every location a run writes to."""

from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo, read_checkpoint_info

__all__ = ["CheckpointError", "CheckpointInfo", "read_checkpoint_info"]
