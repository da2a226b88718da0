"""Lightning ergonomics for Megatron-Core Llama 3 with Transformer Engine FP8 training.

Public API::

    from lightning_llama_fp8 import (
        LlamaLightningModule, LlamaConfig, OptimizerSettings, get_preset, PRESETS, MegatronCPStrategy,
        TEFP8Precision, MegatronPrecision, FP8UnavailableError, MockDataModule, IndexedDataModule, SFTDataModule,
        GPTDataModule, ParallelLayout, validate_layout, LayoutError, CheckpointError, CheckpointInfo,
        read_checkpoint_info, RecomputeSettings, OptimizerOffloadSettings, OptimizerPrecisionSettings,
        CudaGraphSettings,
    )
    from lightning_llama_fp8.callbacks import NaNGuard, NonFiniteTrainingError, FP8StatsMonitor, FaultInjector, ManualGC
    from lightning_llama_fp8.callbacks import ThroughputMonitor, StepProgressBar
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# First: filters for dependency warnings nobody can act on, in place before megatron-core / TE are imported.
import lightning_llama_fp8._compat.warnings  # noqa: F401
from lightning_llama_fp8._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo, read_checkpoint_info
    from lightning_llama_fp8.config import PRESETS, LlamaConfig, get_preset
    from lightning_llama_fp8.data.base import GPTDataModule
    from lightning_llama_fp8.data.indexed import IndexedDataModule
    from lightning_llama_fp8.data.mock import MockDataModule
    from lightning_llama_fp8.data.sft import SFTDataModule
    from lightning_llama_fp8.model import LlamaLightningModule, OptimizerSettings
    from lightning_llama_fp8.parallel.cuda_graphs import CudaGraphSettings
    from lightning_llama_fp8.parallel.layout import LayoutError, ParallelLayout, validate_layout
    from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
    from lightning_llama_fp8.parallel.optimizer_precision import OptimizerPrecisionSettings
    from lightning_llama_fp8.precision import FP8UnavailableError, MegatronPrecision, TEFP8Precision
    from lightning_llama_fp8.strategy import MegatronCPStrategy

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "CheckpointInfo",
    "CudaGraphSettings",
    "FP8UnavailableError",
    "GPTDataModule",
    "IndexedDataModule",
    "LayoutError",
    "LlamaConfig",
    "LlamaLightningModule",
    "MegatronCPStrategy",
    "MegatronPrecision",
    "MockDataModule",
    "OptimizerOffloadSettings",
    "OptimizerPrecisionSettings",
    "OptimizerSettings",
    "ParallelLayout",
    "RecomputeSettings",
    "SFTDataModule",
    "TEFP8Precision",
    "get_preset",
    "read_checkpoint_info",
    "validate_layout",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": "lightning_llama_fp8.checkpoint.info",
        "CheckpointInfo": "lightning_llama_fp8.checkpoint.info",
        "CudaGraphSettings": "lightning_llama_fp8.parallel.cuda_graphs",
        "FP8UnavailableError": "lightning_llama_fp8.precision",
        "GPTDataModule": "lightning_llama_fp8.data.base",
        "IndexedDataModule": "lightning_llama_fp8.data.indexed",
        "LayoutError": "lightning_llama_fp8.parallel.layout",
        "LlamaConfig": "lightning_llama_fp8.config",
        "LlamaLightningModule": "lightning_llama_fp8.model",
        "MegatronCPStrategy": "lightning_llama_fp8.strategy",
        "MegatronPrecision": "lightning_llama_fp8.precision",
        "MockDataModule": "lightning_llama_fp8.data.mock",
        "OptimizerOffloadSettings": "lightning_llama_fp8.parallel.memory",
        "OptimizerPrecisionSettings": "lightning_llama_fp8.parallel.optimizer_precision",
        "OptimizerSettings": "lightning_llama_fp8.model",
        "PRESETS": "lightning_llama_fp8.config",
        "ParallelLayout": "lightning_llama_fp8.parallel.layout",
        "RecomputeSettings": "lightning_llama_fp8.parallel.memory",
        "SFTDataModule": "lightning_llama_fp8.data.sft",
        "TEFP8Precision": "lightning_llama_fp8.precision",
        "get_preset": "lightning_llama_fp8.config",
        "read_checkpoint_info": "lightning_llama_fp8.checkpoint.info",
        "validate_layout": "lightning_llama_fp8.parallel.layout",
    },
)
