"""Started by tests/callbacks/test_preemption.py: a real two-rank CPU ``fit`` that a test stops with a signal.

``python preemption_probe.py OUT_DIR MAX_STEPS RESUME`` trains ``Recorder`` on ``MegatronCPStrategy`` (without Megatron
DDP) with a ModelCheckpoint as the 1B example has it (every 3 steps, ``save_top_k: 1``, ``save_last: link``), a
DataLoader worker per rank and :class:`PreemptionCheckpoint`; each step takes 0.3 s, so that a test can signal it mid
run. ``RESUME`` is ``last`` (resume from the newest complete checkpoint, as ``llama-fp8 fit --ckpt_path last``) or
``none``. Without SLURM variables the parent process is rank 0 and Lightning's launcher starts rank 1 (``devices=2``);
with them (``SLURM_PROCID``...) the test starts each rank, as srun would. Rank 0 writes the finished step to
``OUT_DIR/progress`` after each step; every rank writes what it saw to ``OUT_DIR/rank<r>.json`` when ``fit`` ends,
however it ends.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llama_fp8 import MegatronPrecision, MockDataModule
from lightning_llama_fp8.callbacks import PreemptionCheckpoint
from lightning_llama_fp8.checkpoint.resume import resolve_last_checkpoint
from tests.helpers.distributed import allow_dist_checkpointing_on_cpu
from tests.helpers.models import Recorder
from tests.helpers.trainers import StrategyWithoutDDP, cpu_trainer

SEQ, GBS, STEP_SECONDS, SAVE_EVERY = 64, 4, 0.3, 3


class SlowRecorder(Recorder):
    """``Recorder`` whose steps take :data:`STEP_SECONDS`, long enough to signal a run between two of its steps."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_SECONDS)
        return super().training_step(batch, batch_idx)


class Progress(Callback):
    """Rank 0 writes the finished step to ``progress`` after each step."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "progress"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:
            self.path.write_text(str(trainer.global_step))


def main() -> None:
    out_dir, max_steps, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    allow_dist_checkpointing_on_cpu()
    checkpoints = out_dir / "ckpts"
    ckpt_path = resolve_last_checkpoint([checkpoints], run_directories=[out_dir]) if resume == "last" else None
    module = SlowRecorder(SEQ, momentum=0.9)
    data = MockDataModule(seq_length=SEQ, vocab_size=1000, global_batch_size=GBS, micro_batch_size=1, num_workers=1)
    saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=SAVE_EVERY, save_top_k=1, save_last="link")
    trainer = cpu_trainer(
        devices=2,
        strategy=StrategyWithoutDDP(),
        plugins=[MegatronPrecision()],
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=True,
        default_root_dir=out_dir,
        callbacks=[saver, Progress(out_dir), PreemptionCheckpoint()],
    )
    ended: dict[str, Any] = {"how": "finished"}
    try:
        trainer.fit(module, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    except BaseException as err:
        ended = {"how": type(err).__name__, "code": getattr(err, "code", None)}
        raise
    finally:
        record = {
            "rank": trainer.global_rank,
            "resumed_from": None if ckpt_path is None else str(ckpt_path),
            "step": trainer.global_step,
            "seen": module.seen,
            "weight": module.weight.detach().tolist(),
            "ended": ended,
        }
        (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
