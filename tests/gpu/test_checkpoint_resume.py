"""Checkpoints on one GPU: a run resumed from step 4 trains steps 5-8 like the run that never stopped.

FP8 with the reference recipe (delayed scaling, amax history 1024, FP8 parameter all-gather) and Megatron's
distributed optimizer: the weights, the optimizer's fp32 main weights and moments, TE's amax histories and scales,
the LR schedule and the data position all have to come back for the losses to agree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    CheckpointError,
    LlamaLightningModule,
    MockDataModule,
    OptimizerSettings,
    TEFP8Precision,
    read_checkpoint_info,
)
from tests.gpu.probes import StepProbe, one_gpu_trainer, short_run_optimizer

STEPS, SAVE_EVERY, GBS = 8, 4, 4
ARCH = small_arch(num_layers=4, seq_length=2048)


def _train(ckpt_dir: Path, ckpt_path: Path | None = None) -> tuple[LlamaLightningModule, StepProbe, Any, float]:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()  # a fresh process's TE state for every run in this process
    seed_everything(1234)
    probe = StepProbe()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_EVERY, save_top_k=-1)
    trainer = one_gpu_trainer(TEFP8Precision(fp8_param_gather=True), STEPS, [probe, saver], enable_checkpointing=True)
    optim = short_run_optimizer(STEPS)
    module = LlamaLightningModule(ARCH, optim)
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, probe, trainer, time.perf_counter() - start


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StepProbe, float]:
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted")
    _, probe, trainer, seconds = _train(ckpt_dir)
    assert trainer.global_step == STEPS and len(probe.losses) == STEPS
    return ckpt_dir, probe, seconds


def test_resumed_run_trains_like_the_uninterrupted_one(
    uninterrupted: tuple[Path, StepProbe, float], tmp_path: Path, record: Any
) -> None:
    ckpt_dir, full, full_seconds = uninterrupted
    step4 = ckpt_dir / f"epoch=0-step={SAVE_EVERY}.ckpt"
    info = read_checkpoint_info(step4)
    assert info.global_step == SAVE_EVERY and info.optimizer_sharding == "dp_reshardable"

    _, resumed, trainer, resumed_seconds = _train(tmp_path, ckpt_path=step4)
    assert trainer.global_step == STEPS and len(resumed.losses) == STEPS - SAVE_EVERY
    gaps = [abs(a - b) / abs(b) for a, b in zip(resumed.losses, full.losses[SAVE_EVERY:], strict=True)]
    weights_equal = bool((resumed.fingerprints[0] == full.fingerprints[SAVE_EVERY]).all())
    size = sum(f.stat().st_size for f in step4.rglob("*") if f.is_file())
    record(
        "checkpoint_resume_1gpu",
        {
            "uninterrupted_losses": full.losses,
            "resumed_losses": resumed.losses,
            "relative_loss_gaps": gaps,
            "weights_at_resume_equal_uninterrupted": weights_equal,
            "checkpoint_bytes": size,
            "checkpoint_files": sorted(p.name for p in step4.iterdir()),
            "seconds_uninterrupted_8_steps_with_2_saves": full_seconds,
            "seconds_resumed_4_steps_with_load_and_1_save": resumed_seconds,
            "info": json.loads((step4 / "lightning_llama_fp8.json").read_text()),
        },
    )
    assert weights_equal  # the weights at the start of step 5 are exactly the uninterrupted run's
    assert max(gaps) < 1e-3, gaps  # and so are the next four steps, up to kernel nondeterminism


def test_validate_loads_the_weights_into_a_fresh_module(
    uninterrupted: tuple[Path, StepProbe, float], record: Any
) -> None:
    ckpt_dir, full, _ = uninterrupted
    step8 = ckpt_dir / f"epoch=0-step={STEPS}.ckpt"
    scores = []
    for path in (step8, None):  # the trained checkpoint vs freshly initialised weights
        trainer = one_gpu_trainer(TEFP8Precision(fp8_param_gather=True), STEPS, [], limit_val_batches=2)
        data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
        (result,) = trainer.validate(LlamaLightningModule(ARCH), datamodule=data, ckpt_path=path, verbose=False)
        scores.append(result["val/loss"])
    trained, untrained = scores
    record("checkpoint_validate_1gpu", {"val_loss_step8_checkpoint": trained, "val_loss_fresh_weights": untrained})
    assert trained < untrained - 0.5  # the checkpoint's weights were loaded: 8 steps took the loss ~1 down
    assert abs(trained - full.losses[-1]) < 0.5  # close to the training loss of the step it was saved at


def test_damaged_checkpoint_is_refused_before_any_step(
    uninterrupted: tuple[Path, StepProbe, float], tmp_path: Path
) -> None:
    import shutil

    ckpt_dir, _, _ = uninterrupted
    copy = tmp_path / "damaged.ckpt"
    shutil.copytree(ckpt_dir / f"epoch=0-step={SAVE_EVERY}.ckpt", copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    probe = StepProbe()
    trainer = one_gpu_trainer(TEFP8Precision(), STEPS, [probe])
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    optim = OptimizerSettings(warmup_steps=2, decay_steps=STEPS)
    with pytest.raises(CheckpointError, match=rf"{shard.name} has 1000 bytes, the save wrote"):
        trainer.fit(LlamaLightningModule(ARCH, optim), datamodule=data, ckpt_path=copy)
    assert probe.losses == []
