"""What the GPU tests share: a quiet one-GPU trainer, per-step losses and exact weight fingerprints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer


class StepProbe(Callback):
    """Per step: the loss, and a fingerprint of every weight at the step's start (exact, one float64 per tensor)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.fingerprints: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.fingerprints.append(fingerprint(pl_module))

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def fingerprint(module: torch.nn.Module) -> torch.Tensor:
    # float() dequantizes FP8 weights (fp8_param_gather); sums in float64 are bitwise equal iff nothing moved.
    return torch.stack([p.detach().float().double().sum() for p in module.parameters()]).cpu()


def short_run_optimizer(steps: int) -> Any:
    """The recipe's optimizer with every learning rate x 0.1 (lr 1.5e-5, min 1e-6, decoupled 5e-5), warmup 2, decay
    over ``steps``: on mock data the loss then stays well above zero for a short run, so relative gaps mean
    something."""
    from lightning_llama_fp8 import OptimizerSettings

    return OptimizerSettings(lr=1.5e-5, min_lr=1e-6, warmup_steps=2, decay_steps=steps, decoupled_lr=5e-5)


def one_gpu_trainer(plugin: Any, max_steps: int, callbacks: list[Callback], **overrides: Any) -> Trainer:
    """A quiet one-GPU Trainer with ``MegatronCPStrategy``: by default training only (no validation, logger or
    checkpoints); ``overrides`` replace any of these Trainer arguments (``strategy``: another MegatronCPStrategy)."""
    from lightning_llama_fp8 import MegatronCPStrategy

    strategy = overrides.pop("strategy", None) or MegatronCPStrategy()

    kwargs: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        **overrides,
    }
    return Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        plugins=[plugin],
        max_steps=max_steps,
        callbacks=callbacks,
        **kwargs,
    )


def one_rank_process_group(port: int) -> Any:
    """torch.distributed as a one-rank NCCL group on this GPU (unless a test before made one); its WORLD group."""
    import os

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    return torch.distributed.group.WORLD


@contextmanager
def megatron_on_one_gpu(port: int) -> Iterator[None]:
    """Megatron's parallel state (TP1, CP1) and RNG tracker on this GPU, for models built without a Trainer; the
    parallel state is destroyed afterwards (the process group stays, for the next test)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    one_rank_process_group(port=port)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
