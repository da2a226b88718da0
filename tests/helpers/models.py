"""The small models and the mock data of the CPU tests.

``Recorder`` is the tiny model of the tests that run ``Trainer.fit`` through ``MegatronCPStrategy``; ``tiny_llama``
the Llama that Megatron-Core builds on the CPU (its local layer spec: no Transformer Engine needed).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

#: LlamaConfig overrides that Megatron-Core builds on the CPU: its own layers, no fused RoPE kernel.
CPU_ARCH: dict[str, Any] = {"transformer_impl": "local", "apply_rope_fusion": False}


def tiny_llama(**overrides: Any) -> Any:
    """The ``llama_tiny`` preset (2 layers, hidden 256) as Megatron-Core builds it on the CPU."""
    from lightning_llama_fp8.config import get_preset

    return get_preset("llama_tiny", **{**CPU_ARCH, **overrides})


class Recorder(LightningModule):
    """Three weights trained towards 1 by SGD; records the samples of each training batch and some hooks.

    The loss, so the gradient, is the same on every rank: the CPU test strategy has no Megatron DDP to average
    gradients. ``seen`` holds one hash per sample (``seq_length`` tokens) of each training batch, ``hooks`` the
    ``setup`` and ``configure_model`` calls. ``momentum`` gives the optimizer state a checkpoint has to restore.
    """

    def __init__(self, seq_length: int, momentum: float = 0.0) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.momentum = momentum
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.seen: list[list[int]] = []
        self.hooks: list[str] = []

    def setup(self, stage: str) -> None:
        self.hooks.append("setup")

    def configure_model(self) -> None:
        self.hooks.append("configure_model")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append([hash(tuple(s.tolist())) for s in batch["tokens"].reshape(-1, self.seq_length)])
        return ((self.weight - 1.0) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


def mock_data(seq_length: int, global_batch_size: int, vocab_size: int = 1000, **overrides: Any) -> Any:
    """``MockDataModule`` (megatron-core's mock GPT samples) with one sample per micro batch and no loader workers."""
    from lightning_llama_fp8 import MockDataModule

    settings: dict[str, Any] = dict(micro_batch_size=1, num_workers=0, **overrides)
    return MockDataModule(seq_length=seq_length, vocab_size=vocab_size, global_batch_size=global_batch_size, **settings)


class Regression(LightningModule):
    """A linear regression on 8 random samples (4 batches an epoch) that logs ``train/loss`` to the progress bar;
    ``manual=True`` steps its optimizer itself (manual optimization)."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)  # 4 batches an epoch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
