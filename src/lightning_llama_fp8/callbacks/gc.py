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

from lightning_llama_fp8.validate import as_bool, as_int


class ManualGC(Callback):
    """Turn off automatic garbage collection while training; collect every ``interval`` steps (0: never)."""

    def __init__(self, interval: int = 0, collect_around_validation: bool = True) -> None:
        self.interval = as_int(interval, "ManualGC interval", at_least=0)
        self.collect_around_validation = as_bool(collect_around_validation, "ManualGC collect_around_validation")
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
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A fit that fails (NaNGuard's stop, Ctrl-C, an error) leaves the process, a notebook or a retry loop,
        with the collector as it found it."""
        self._restore()

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()
