"""The precision-aware optimizer (bf16 Adam moments, main-weight remainders) on one GPU: it trains like Megatron's
default optimizer over a short run, keeps less memory, and a run resumed from its checkpoint continues it; the
strategy's default ("auto": fp32 moments) trains like Megatron's default too and resumes a checkpoint's own state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    CheckpointError,
    LlamaLightningModule,
    MegatronCPStrategy,
    MockDataModule,
    OptimizerPrecisionSettings,
    TEFP8Precision,
    read_checkpoint_info,
)
from lightning_llama_fp8.parallel.optimizer_precision import OptimizerPrecision
from tests.gpu.probes import StepProbe, one_gpu_trainer, short_run_optimizer

STEPS, SAVE_EVERY, GBS = 8, 4, 4
ARCH = small_arch(num_layers=4, seq_length=2048)


class StateDtypes(Callback):
    """The dtypes of the Adam state the optimizer holds after the last step (several runs share this process, so
    their memory cannot be compared here: the full 8B runs compare peaks, one process each)."""

    def __init__(self) -> None:
        self.dtypes: dict[str, set[str]] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
        for part in parts:
            for state in part.optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.numel() > 1:
                        self.dtypes.setdefault(key, set()).add(str(value.dtype).removeprefix("torch."))


def _train(
    settings: OptimizerPrecision, ckpt_dir: Path | None = None, ckpt_path: Path | None = None
) -> tuple[StepProbe, Any, dict[str, set[str]]]:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seed_everything(1234)
    probe = StepProbe()
    state = StateDtypes()
    callbacks: list[Any] = [probe, state]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_EVERY, save_top_k=-1))
    trainer = one_gpu_trainer(
        TEFP8Precision(),  # bf16 weights, FP8 compute
        STEPS,
        callbacks,
        enable_checkpointing=ckpt_dir is not None,
        strategy=MegatronCPStrategy(optimizer_precision=settings),
    )
    module = LlamaLightningModule(ARCH, short_run_optimizer(STEPS))
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return probe, trainer, state.dtypes


def test_bf16_moments_train_like_fp32_ones_and_resume(tmp_path: Path, record: Any) -> None:
    default, _, default_state = _train(None)
    bf16_dir = tmp_path / "bf16"
    bf16, trainer, bf16_state = _train(OptimizerPrecisionSettings(), ckpt_dir=bf16_dir)
    assert trainer.global_step == STEPS
    gaps = [abs(a - b) / abs(b) for a, b in zip(bf16.losses, default.losses, strict=True)]
    step4 = bf16_dir / f"epoch=0-step={SAVE_EVERY}.ckpt"
    info = read_checkpoint_info(step4)
    resumed, _, _ = _train(OptimizerPrecisionSettings(), ckpt_dir=tmp_path / "resumed", ckpt_path=step4)
    resume_gaps = [abs(a - b) / abs(b) for a, b in zip(resumed.losses, bf16.losses[SAVE_EVERY:], strict=True)]
    with pytest.raises(CheckpointError, match="holds optimizer state as precision-aware Adam"):
        _train(None, ckpt_path=step4)
    # "auto", the default: a new run keeps fp32 moments (and remainders); resuming, the checkpoint's bf16 moments.
    auto, auto_trainer, auto_state = _train("auto")
    auto_gaps = [abs(a - b) / abs(b) for a, b in zip(auto.losses, default.losses, strict=True)]
    auto_resumed, resumed_trainer, auto_resumed_state = _train("auto", ckpt_dir=tmp_path / "auto", ckpt_path=step4)
    auto_resume_gaps = [abs(a - b) / abs(b) for a, b in zip(auto_resumed.losses, bf16.losses[SAVE_EVERY:], strict=True)]
    record(
        "optimizer_precision_1gpu",
        {
            "default_losses": default.losses,
            "bf16_moments_losses": bf16.losses,
            "relative_loss_gaps": gaps,
            "resumed_losses": resumed.losses,
            "resume_relative_gaps": resume_gaps,
            "adam_state_dtypes_default": {key: sorted(value) for key, value in default_state.items()},
            "adam_state_dtypes_bf16_moments": {key: sorted(value) for key, value in bf16_state.items()},
            "checkpoint_optimizer_state": info.optimizer_state,
            "auto_losses": auto.losses,
            "auto_relative_loss_gaps": auto_gaps,
            "adam_state_dtypes_auto": {key: sorted(value) for key, value in auto_state.items()},
            "auto_resumed_from_bf16_losses": auto_resumed.losses,
            "auto_resume_relative_gaps": auto_resume_gaps,
        },
    )
    assert auto_trainer.strategy.optimizer_precision_in_use == OptimizerPrecisionSettings("fp32", "fp32")
    assert auto_state["exp_avg"] == auto_state["exp_avg_sq"] == {"float32"} and auto_state["master_param"] == {"int16"}
    assert max(auto_gaps) < 1e-3, auto_gaps  # the default update but for bf16 rounding of clipped gradients
    assert resumed_trainer.strategy.optimizer_precision_in_use == OptimizerPrecisionSettings()
    assert auto_resumed_state["exp_avg"] == {"bfloat16"}, auto_resumed_state
    assert max(auto_resume_gaps) < 1e-3, auto_resume_gaps
    assert info.optimizer_state == OptimizerPrecisionSettings().checkpoint_record()
    assert max(gaps) < 2e-2, gaps  # the same first steps; bf16 moments round the update's statistics only
    assert max(resume_gaps) < 1e-3, resume_gaps  # the resumed run continues the interrupted one
    # Megatron's default: fp32 moments (its fp32 main weights are its own tensors, not optimizer state); the
    # precision-aware optimizer: bf16 moments and the 16-bit remainders of the main weights.
    assert default_state["exp_avg"] == default_state["exp_avg_sq"] == {"float32"}, default_state
    assert bf16_state["exp_avg"] == bf16_state["exp_avg_sq"] == {"bfloat16"}, bf16_state
    assert bf16_state["master_param"] == {"int16"}, bf16_state
