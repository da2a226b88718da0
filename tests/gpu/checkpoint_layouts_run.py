"""Started under ``torchrun --nproc_per_node 2`` by tests/gpu/test_checkpoint_layouts.py: save at one layout,
resume at another.

``save``: 8 steps of a small Megatron Llama (4 layers, hidden 1024, seq 2048, GBS 8) with the given layout,
checkpoints every 4 steps; ``resume``: load the step-4 checkpoint into the given layout and train steps 5-8.
Both write ``<out>/<name>.json`` (rank 0): per-step losses and the Trainer's final step.

    torchrun --nproc_per_node 2 -m tests.gpu.checkpoint_layouts_run save|resume --tp 1 --cp 2 \
        --precision bf16 --ckpt-dir DIR --out DIR --name NAME [--devices 1] [--sharding dp_reshardable]

Data parallel size = devices / (tp x cp).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    LlamaLightningModule,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    TEFP8Precision,
)
from tests.gpu.probes import StepProbe, short_run_optimizer

STEPS, SAVE_EVERY, GBS = 8, 4, 8
ARCH = small_arch(num_layers=4, seq_length=2048)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("save", "resume"))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--fp8-weights", action="store_true", help="FP8 weights (fp8_param_gather=True)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--sharding", choices=("dp_reshardable", "fully_reshardable"), default="fully_reshardable")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    seed_everything(1234)
    probe = StepProbe()
    strategy = MegatronCPStrategy(
        tensor_model_parallel_size=args.tp,
        context_parallel_size=args.cp,
        sequence_parallel=args.tp > 1,
        # The same full weights for every layout (irrelevant once resumed). Megatron's CPU init cannot fill FP8
        # weights (illegal memory access in TE's quantize, seen on H200), so FP8 weights start from the GPU init.
        use_cpu_initialization=not args.fp8_weights,
        checkpoint_optimizer_sharding=args.sharding,  # fully_reshardable lets the optimizer state change TP/CP
    )
    plugin = TEFP8Precision(fp8_param_gather=args.fp8_weights) if args.precision == "fp8" else MegatronPrecision()
    callbacks = [probe]
    if args.phase == "save":
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=SAVE_EVERY, save_top_k=-1))
    trainer = Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=strategy,
        plugins=[plugin],
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.phase == "save",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    optim = short_run_optimizer(STEPS)
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    ckpt_path = args.ckpt_dir / f"epoch=0-step={SAVE_EVERY}.ckpt" if args.phase == "resume" else None
    trainer.fit(LlamaLightningModule(ARCH, optim), datamodule=data, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        args.out.mkdir(parents=True, exist_ok=True)
        dp = args.devices // (args.tp * args.cp)
        result = {"losses": probe.losses, "global_step": trainer.global_step, "tp": args.tp, "cp": args.cp, "dp": dp}
        result["weight_fingerprints"] = [f.tolist() for f in probe.fingerprints]  # rank 0's weights, step start
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
