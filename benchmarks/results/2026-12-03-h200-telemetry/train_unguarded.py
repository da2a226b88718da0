import os, sys
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy, MegatronPrecision, MockDataModule, OptimizerSettings
from lightning_llama_fp8 import get_preset
print(f"top level runs in {__name__} pid {os.getpid()}", flush=True)
arch = get_preset("llama_tiny")
saver = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=2, save_top_k=-1)
trainer = Trainer(accelerator="gpu", devices=1, strategy=MegatronCPStrategy(), plugins=[MegatronPrecision()],
                  max_steps=4, callbacks=[saver], logger=False, enable_progress_bar=False, limit_val_batches=0)
data = MockDataModule(seq_length=arch.seq_length, vocab_size=arch.vocab_size, global_batch_size=4, micro_batch_size=2)
trainer.fit(LlamaLightningModule(arch, OptimizerSettings(warmup_steps=1)), datamodule=data)
print("saved", sorted(os.listdir(sys.argv[1])), flush=True)
