"""Megatron-LM's ``train_llama3_8b_h100_fp8.sh`` recipe as a plain Lightning script.

    torchrun --nproc_per_node 8 examples/train_llama3_8b_h100_fp8.py            # 8 x H100, TP1 CP2 DP4
    python examples/train_llama3_8b_h100_fp8.py                                  # Lightning launches 8 processes
    python examples/train_llama3_8b_h100_fp8.py --devices 1 --context-parallel-size 1 --num-layers 4 \
        --global-batch-size 8 --max-steps 50
    torchrun --nproc_per_node 8 examples/train_llama3_8b_h100_fp8.py --resume last  # continue from the newest save

The same run from YAML: ``llama-fp8 fit --config examples/configs/llama3_8b_h100_fp8.yaml``.
"""

from __future__ import annotations

import argparse
import os

# The recipe sets this so communication kernels are issued in order; it must precede CUDA initialisation.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_llama_fp8 import (
    LlamaConfig,
    LlamaLightningModule,
    MegatronCPStrategy,
    MockDataModule,
    OptimizerSettings,
    TEFP8Precision,
)
from lightning_llama_fp8.callbacks import FP8StatsMonitor, ManualGC, StepProgressBar, ThroughputMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--context-parallel-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=15_258_789)  # --train-samples 1,953,125,000 / 128
    parser.add_argument("--checkpoint-dir", default="checkpoints/llama3_8b_fp8", help="the recipe's --save/--load")
    parser.add_argument("--save-interval", type=int, default=1000, help="steps between checkpoints (0: none)")
    parser.add_argument("--resume", help="a checkpoint directory to resume from, or 'last' for the newest save")
    parser.add_argument("--log-dir", default="logs", help="TensorBoard logs (tensorboard --logdir logs)")
    args = parser.parse_args()

    seed_everything(1234)
    arch = LlamaConfig(
        num_layers=args.num_layers,
        seq_length=8192,
        rotary_base=1_000_000,  # the script's --rotary-base
        init_method_std=0.0134,
        zero_centered_gamma=True,  # --apply-layernorm-1p
        attention_backend="fused",  # --attention-backend fused
    )
    optimizer = OptimizerSettings(
        lr=1.5e-4,
        min_lr=1e-5,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        warmup_steps=min(30_518, args.max_steps // 10),  # --lr-warmup-samples 3,906,252 / 128
        decay_steps=min(15_228_271, args.max_steps),  # --lr-decay-samples 1,949,218,748 / 128
        decoupled_lr=5e-4,  # --decoupled-lr (embedding and output layer)
        decoupled_min_lr=4.5e-5,  # --decoupled-min-lr
    )
    # Megatron-LM's --manual-gc and --log-throughput, FP8 amax/scale per layer, a bar in steps of max_steps.
    callbacks: list[Callback] = [
        ManualGC(),
        ThroughputMonitor(window=10),
        FP8StatsMonitor(every_n_steps=100),
        StepProgressBar(),
    ]
    if args.save_interval > 0:  # the recipe's --save-interval / --save; keep every checkpoint, link the newest
        every = args.save_interval
        saver = ModelCheckpoint(args.checkpoint_dir, every_n_train_steps=every, save_top_k=-1, save_last="link")
        callbacks.append(saver)
    trainer = Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=MegatronCPStrategy(
            tensor_model_parallel_size=1,
            context_parallel_size=args.context_parallel_size,
            use_distributed_optimizer=True,
            overlap_grad_reduce=True,
            overlap_param_gather=True,
        ),
        plugins=[
            TEFP8Precision(
                recipe="delayed",
                fp8_format="hybrid",
                amax_history_len=1024,
                amax_compute_algo="max",
                fp8_param_gather=True,
            )
        ],
        callbacks=callbacks,
        logger=TensorBoardLogger(args.log_dir, name="llama3_8b_fp8"),
        max_steps=args.max_steps,
        val_check_interval=100,  # --eval-interval 100
        check_val_every_n_epoch=None,  # count the interval in steps across the run, as Megatron-LM does
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=args.save_interval > 0,
    )
    data = MockDataModule(
        seq_length=8192,
        vocab_size=arch.vocab_size,
        global_batch_size=args.global_batch_size,
        micro_batch_size=1,
        val_samples=32 * args.global_batch_size,
    )
    trainer.fit(LlamaLightningModule(arch, optimizer), datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
