"""``StepProgressBar``: a progress bar in optimizer steps of ``max_steps``, for step-counted pre-training.

Lightning's bars count the batches of the current epoch and name the epoch (the Rich bar as ``Epoch 0/-2`` when a run
is bounded by ``max_steps`` only, ``max_epochs`` being -1). Pre-training is counted in optimizer steps (global
batches), as Megatron-LM's ``iteration N/M`` lines are: this bar shows ``trainer.global_step`` of
``trainer.max_steps`` across epochs, resumes at the restored step, and keeps the epoch in its description. Without
``max_steps`` it is Lightning's tqdm bar unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_llama_fp8.validate import as_bool, as_int

if TYPE_CHECKING:
    import lightning.pytorch as pl


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting optimizer steps up to ``trainer.max_steps``.

    Args:
        refresh_rate: redraw every this many steps (and at the last one); 0 disables the bar.
        process_position: as for ``TQDMProgressBar``.
        leave: as for ``TQDMProgressBar`` (per-epoch bars only, i.e. without ``max_steps``).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(
            refresh_rate=as_int(refresh_rate, "StepProgressBar refresh_rate", at_least=0),
            process_position=as_int(process_position, "StepProgressBar process_position", at_least=0),
            leave=as_bool(leave, "StepProgressBar leave"),
        )

    def _counts_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._counts_steps():
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # a resumed run starts at the restored step
            bar.set_description(self.step_description(trainer))
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counts_steps():
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(self.step_description(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable or step == bar.n or (step % self.refresh_rate and step < trainer.max_steps):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counts_steps():
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def step_description(self, trainer: pl.Trainer) -> str:
        """The text before the bar: ``Step (epoch E)``; the counts ``step/max_steps`` follow it."""
        return f"Step (epoch {trainer.current_epoch})"
