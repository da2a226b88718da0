"""A module and a dataset that move a fake clock, so that ThroughputMonitor's numbers have exact hand-computed
values: handing out a sample takes ``FETCH_S``, training step k takes ``STEP_S[k - 1]`` on the clock."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset

from lightning_llama_fp8.config import get_preset

SEQ, BATCH = 16, 2


FETCH_S = 0.125  # per sample: 0.25 s per batch (binary fractions, so the sums are exact)


STEP_S = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


ARCH = get_preset("llama_tiny", seq_length=SEQ)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Tokens(Dataset):
    """``{"tokens": [SEQ]}`` samples; handing one out takes ``fetch_s`` on the clock (and ``sleep_s`` for real)."""

    def __init__(self, clock: FakeClock | None, length: int, fetch_s: float = FETCH_S, sleep_s: float = 0.0) -> None:
        self.clock, self.length, self.fetch_s, self.sleep_s = clock, length, fetch_s, sleep_s

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.clock is not None:
            self.clock.advance(self.fetch_s)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return {"tokens": torch.zeros(SEQ, dtype=torch.long)}


class TimedModule(LightningModule):
    """Step k takes ``step_s[k - 1]`` on the clock; validation and saving a checkpoint take long (not training)."""

    def __init__(self, clock: FakeClock | None, step_s: list[float], length: int = 64, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.arch = ARCH
        self.clock, self.step_s, self.length, self.sleep_s = clock, step_s, length, sleep_s
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.clock is not None:
            self.clock.advance(self.step_s[self.global_step])
        return (self.weight - 1.0).pow(2).sum()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.clock is not None:
            self.clock.advance(100.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.clock is not None:
            self.clock.advance(1000.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(self.clock, self.length, sleep_s=self.sleep_s), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(None, BATCH), batch_size=BATCH)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
