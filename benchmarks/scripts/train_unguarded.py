"""A plain training script without a ``__main__`` guard that saves distributed checkpoints (copied and run by the
telemetry stage).

Processes started by the checkpoint writer import the main module again; without a guard that import trains once
more, which once hung the save. The script prints where its top level runs, then the checkpoints it saved in the
directory given as its argument. It has no main guard on purpose: do not add one.
"""

import os
import sys

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llama_fp8 import (
    LlamaLightningModule,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    OptimizerSettings,
    get_preset,
)

print(f"top level runs in {__name__} pid {os.getpid()}", flush=True)
arch = get_preset("llama_tiny")
saver = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=2, save_top_k=-1)
trainer = Trainer(
    accelerator="gpu",
    devices=1,
    strategy=MegatronCPStrategy(),
    plugins=[MegatronPrecision()],
    max_steps=4,
    callbacks=[saver],
    logger=False,
    enable_progress_bar=False,
    limit_val_batches=0,
)
data = MockDataModule(seq_length=arch.seq_length, vocab_size=arch.vocab_size, global_batch_size=4, micro_batch_size=2)
trainer.fit(LlamaLightningModule(arch, OptimizerSettings(warmup_steps=1)), datamodule=data)
print("saved", sorted(os.listdir(sys.argv[1])), flush=True)
