"""Callbacks for Megatron-Core training under Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llama_fp8._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_llama_fp8.callbacks.fault_injection import FaultInjector
    from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
    from lightning_llama_fp8.callbacks.gc import ManualGC
    from lightning_llama_fp8.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError
    from lightning_llama_fp8.callbacks.preemption import PreemptionCheckpoint, TrainingPreempted
    from lightning_llama_fp8.callbacks.progress import StepProgressBar
    from lightning_llama_fp8.callbacks.throughput import ThroughputMonitor

__all__ = [
    "FP8StatsMonitor",
    "FaultInjector",
    "ManualGC",
    "NaNGuard",
    "NonFiniteTrainingError",
    "PreemptionCheckpoint",
    "StepProgressBar",
    "ThroughputMonitor",
    "TrainingPreempted",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "FP8StatsMonitor": "lightning_llama_fp8.callbacks.fp8_monitor",
        "FaultInjector": "lightning_llama_fp8.callbacks.fault_injection",
        "ManualGC": "lightning_llama_fp8.callbacks.gc",
        "NaNGuard": "lightning_llama_fp8.callbacks.nan_guard",
        "NonFiniteTrainingError": "lightning_llama_fp8.callbacks.nan_guard",
        "PreemptionCheckpoint": "lightning_llama_fp8.callbacks.preemption",
        "StepProgressBar": "lightning_llama_fp8.callbacks.progress",
        "ThroughputMonitor": "lightning_llama_fp8.callbacks.throughput",
        "TrainingPreempted": "lightning_llama_fp8.callbacks.preemption",
    },
)
