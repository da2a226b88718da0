"""Callbacks for Megatron-Core training under Lightning."""

from lightning_llama_fp8.callbacks.fault_injection import FaultInjector
from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
from lightning_llama_fp8.callbacks.gc import ManualGC
from lightning_llama_fp8.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError

__all__ = ["FP8StatsMonitor", "FaultInjector", "ManualGC", "NaNGuard", "NonFiniteTrainingError"]
