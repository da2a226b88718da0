"""Small helpers shared by the CPU tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_llama_fp8 import LlamaLightningModule

from .distributed import free_port as free_port
from .distributed import run_distributed as run_distributed

#: The repository's root (the directory with pyproject.toml), wherever this file lies under tests/.
REPO_ROOT = next(parent for parent in Path(__file__).resolve().parents if (parent / "pyproject.toml").is_file())
#: Scripts the launcher tests start as processes; they lie next to this file.
LAUNCH_PROBE = Path(__file__).with_name("launch_probe.py")
MULTINODE_PROBE = Path(__file__).with_name("multinode_probe.py")


def cpu_trainer(**kwargs: object) -> Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or summary."""
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )


def megatron_cpu_trainer(world_size: int, **kwargs: object) -> Trainer:
    """A quiet CPU Trainer with ``MegatronCPStrategy`` for plain torch modules on ``world_size`` gloo processes.

    Megatron's DDP wrapper needs CUDA, so this strategy skips only that wrapping; everything else it does under
    Lightning (parallel groups, data sharding, the hooks around the optimizer step, vetoes) runs for real.
    """
    from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision

    class MegatronCPStrategyWithoutDDP(MegatronCPStrategy):
        def _wrap_megatron_modules(self) -> None:
            self._ddp_modules = []

    return cpu_trainer(
        devices=world_size,
        strategy=MegatronCPStrategyWithoutDDP(),
        plugins=[MegatronPrecision()],
        **kwargs,
    )


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call as ``(step, {name: float})``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))


def allow_dist_checkpointing_on_cpu() -> None:
    """Let megatron-core's distributed checkpoint writer run on a CPU-only machine (tests only).

    Its writer only touches CUDA to wait for pending GPU copies (``torch.cuda.synchronize``) and to place a
    one-element failure flag for an all-reduce (``torch.cuda.current_device``); on the CPU there is nothing to wait
    for and the flag works on the CPU device with gloo. Everything else (sharding, file layout, metadata) runs as
    on the GPU. Call it in the process that saves (spawned workers call it themselves).
    """
    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


class NeverBuilt(LlamaLightningModule):
    """Fails the test if Lightning gets as far as building the model."""

    def configure_model(self) -> None:
        raise AssertionError("configure_model ran: the error came too late")


def fit_never_built(plugin: object, arch: Any = None, **strategy_kwargs: Any) -> None:
    """``Trainer.fit`` of a tiny model on one CPU process that must fail before the model is built."""
    from lightning_llama_fp8 import MegatronCPStrategy, MockDataModule, get_preset

    module = NeverBuilt(arch or get_preset("llama_tiny", transformer_impl="local"))
    data = MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4, micro_batch_size=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronCPStrategy(**strategy_kwargs),
        plugins=[plugin],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)


def iteration_line(
    iteration: int,
    elapsed_ms: float,
    loss: float | None,
    *,
    train_iters: int = 30,
    gbs: int = 8,
    tflops: float | None = 401.3,
    skipped_samples: int = 0,
    grad_norm: float = 3.14159,
    timestamp: str = "2026-08-23 10:15:42.123456",
) -> str:
    """One training log line, field by field in Megatron-LM's format (numbers made up)."""
    line = f" [{timestamp}]"
    line += f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {iteration * gbs:12d} |"
    if skipped_samples > 0:
        line += f" skipped samples: {skipped_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    if tflops is not None:
        line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
    line += f" learning rate: {1.5e-4 * min(1.0, iteration / 2):.6E} |"
    line += f" global batch size: {gbs:5d} |"
    if loss is not None:
        line += f" lm loss: {loss:.6E} |"
    line += f" loss scale: {1.0:.1f} |"
    line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {0:3d} |"
    line += f" number of nan iterations: {0:3d} |"
    return line
