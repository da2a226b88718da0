"""Manual garbage collection, as Megatron-LM's ``--manual-gc``.

Python's cyclic garbage collector runs whenever allocation counters cross a threshold, which on a large
training process means pauses of tens of milliseconds at unpredictable steps, and, across ranks, stragglers
that stall every collective. Disabling it and collecting at a fixed step interval makes every rank pause at
the same step, and rarely.
"""

from __future__ import annotations

import gc
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class ManualGC(Callback):
    """Turn off automatic garbage collection while training; collect every ``interval`` steps (0: never)."""

    def __init__(self, interval: int = 0, collect_around_validation: bool = True) -> None:
        if interval < 0:
            raise ValueError(f"ManualGC interval must be >= 0, got {interval}.")
        self.interval = interval
        self.collect_around_validation = collect_around_validation
        self._was_enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval and trainer.global_step % self.interval == 0:
            gc.collect()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.collect_around_validation and trainer.training:
            gc.collect()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gc.collect()
        if self._was_enabled:
            gc.enable()
