"""Fine-tuning against pretraining speed of one model (issue 29): the Llama-3-8B-shaped 4-layer model of
``benchmarks.throughput`` (its ``recipe_arch``, FP8 delayed scaling with FP8 weights, one GPU), trained for a few steps
either on packed conversations (``SFTDataModule``: document masking, answer-only loss) or on mock pretraining data
(``MockDataModule``: full causal attention over the sequence, every token learned); one JSON record per run.

Tokens/s counts the positions of the global batch (``global_batch_size x seq_length``) per second, padding included,
as pretraining's does, so the two compare step time for step time: what the masks cost. The record also gives the
conversation tokens per second (positions x the packing's fill ratio).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def run_speed(
    data: str,
    out: Path,
    *,
    corpus: str | None = None,
    layers: int = 4,
    seq_length: int = 8192,
    global_batch_size: int = 8,
    steps: int = 15,
    warmup: int = 5,
) -> dict[str, Any]:
    """Train ``steps`` steps on ``data`` (``"sft"``: the chat corpus ``corpus``; ``"pretrain"``: mock data) and write
    the record to ``out``; the median step time leaves out the first ``warmup`` steps."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from benchmarks.throughput import recipe_arch  # sets CUDA_DEVICE_MAX_CONNECTIONS=1 as the throughput runs do
    from lightning_llama_fp8 import (
        LlamaLightningModule,
        MegatronCPStrategy,
        MockDataModule,
        OptimizerSettings,
        SFTDataModule,
        TEFP8Precision,
    )
    from lightning_llama_fp8.callbacks import ManualGC

    if data not in ("sft", "pretrain"):
        raise ValueError(f"data must be 'sft' or 'pretrain', got {data!r}")
    if data == "sft" and corpus is None:
        raise ValueError("the sft run needs the chat corpus (--corpus PREFIX)")
    seed_everything(1234)
    arch = recipe_arch(layers, seq_length)
    batch = dict(seq_length=seq_length, vocab_size=arch.vocab_size, global_batch_size=global_batch_size)
    batch["micro_batch_size"] = 1
    datamodule: Any = (
        SFTDataModule(data_path=[corpus], tokenizer="llama3", split="99,1,0", **batch)
        if data == "sft"
        else MockDataModule(**batch)
    )
    module = LlamaLightningModule(arch, OptimizerSettings(lr=1.5e-4, min_lr=1e-5, warmup_steps=2, decay_steps=steps))
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy=MegatronCPStrategy(),
        plugins=[TEFP8Precision(recipe="delayed", fp8_param_gather=True)],
        max_steps=steps,
        callbacks=[ManualGC()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    times = module.step_times[max(warmup - 1, 0) :]  # step_times starts at step 2
    median = statistics.median(times)
    tokens_per_s = global_batch_size * seq_length / median
    fill = getattr(datamodule, "fill_ratio", None)
    record = {
        "data": data,
        "corpus": corpus,
        "device": torch.cuda.get_device_name(),
        "arch": "benchmarks.throughput recipe_arch (Llama-3-8B layers, vocab 128256)",
        "layers": layers,
        "seq_length": seq_length,
        "global_batch_size": global_batch_size,
        "micro_batch_size": 1,
        "precision": "fp8 delayed, FP8 weights",
        "steps": steps,
        "timed_steps": len(times),
        "median_step_time_s": median,
        "step_times_s": module.step_times,
        "tokens_per_s": tokens_per_s,
        "fill_ratio": fill,
        "conversation_tokens_per_s": None if fill is None else tokens_per_s * fill,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "step_times_s"}))
    return record
