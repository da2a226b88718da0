"""Small helpers shared by the CPU tests."""

from __future__ import annotations

import socket
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_llama_fp8 import LlamaLightningModule


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (for gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
