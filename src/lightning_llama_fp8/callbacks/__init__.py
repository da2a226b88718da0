"""Callbacks for Megatron-Core training under Lightning."""

from lightning_llama_fp8.callbacks.gc import ManualGC

__all__ = ["ManualGC"]
