"""Callbacks for Megatron-Core training under Lightning."""

from lightning_llama_fp8.callbacks.fault_injection import FaultInjector
from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
from lightning_llama_fp8.callbacks.gc import ManualGC
from lightning_llama_fp8.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError
from lightning_llama_fp8.callbacks.progress import StepProgressBar
from lightning_llama_fp8.callbacks.throughput import ThroughputMonitor

__all__ = [
    "FP8StatsMonitor",
    "FaultInjector",
    "ManualGC",
    "NaNGuard",
    "NonFiniteTrainingError",
    "StepProgressBar",
    "ThroughputMonitor",
]
