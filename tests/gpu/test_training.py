"""One-GPU training evidence: FP8 trains, FP8 is really on, and Lightning equals a plain Megatron loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_llama_fp8 import (
    LlamaConfig,
    LlamaLightningModule,
    MockDataModule,
    OptimizerSettings,
    TEFP8Precision,
)
from lightning_llama_fp8.cli.fit import LlamaCLI
from tests.gpu.probes import StepProbe, one_gpu_trainer

REPO = Path(__file__).resolve().parents[2]


def te_fp8_state(model: torch.nn.Module) -> dict[str, Any]:
    """What Transformer Engine's own modules say about FP8: recipe, amax histories, scales."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    te_modules = [m for m in model.modules() if isinstance(m, TransformerEngineBaseModule)]
    with_fp8 = [m for m in te_modules if "scaling_fwd" in getattr(m, "fp8_meta", {})]
    # Linear layers run their GEMMs in FP8; attention keeps an (unused) fp8_meta while fp8_dpa is off.
    linears = [m for m in with_fp8 if "Linear" in type(m).__name__ or "MLP" in type(m).__name__]
    recipes = {
        (type(r).__name__, r.margin, str(r.fp8_format), r.amax_history_len, str(r.amax_compute_algo))
        for r in (m.fp8_meta.get("recipe") for m in with_fp8)
    }
    amax_nonzero = sum(int(m.fp8_meta["scaling_fwd"].amax_history.abs().max() > 0) for m in linears)
    history_lens = {int(m.fp8_meta["scaling_fwd"].amax_history.shape[0]) for m in with_fp8}
    scales = [float(m.fp8_meta["scaling_fwd"].scale.min()) for m in with_fp8]
    return {
        "te_modules": len(te_modules),
        "fp8_modules": len(with_fp8),
        "fp8_linear_modules": len(linears),
        "amax_nonzero_modules": amax_nonzero,
        "amax_history_lens": sorted(history_lens),
        "recipes": sorted(list(r) for r in recipes),
        "min_scale": min(scales) if scales else None,
        "max_scale": max(float(m.fp8_meta["scaling_fwd"].scale.max()) for m in with_fp8) if with_fp8 else None,
    }


def test_small_config_trains_in_fp8(record: Any) -> None:
    """The example one-GPU config, through the CLI's parser: 60 FP8 steps, loss falls, TE reports FP8."""
    config = REPO / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml"
    cli = LlamaCLI(
        LlamaLightningModule,
        MockDataModule,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config",
            str(config),
            "--trainer.max_steps",
            "60",
            "--trainer.val_check_interval",
            "60",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
    )
    recorder = StepProbe()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    losses = recorder.losses
    state = te_fp8_state(cli.model)
    step_times = cli.model.step_times
    record(
        "small_config_fp8",
        {
            "losses": losses,
            "te_fp8_state": state,
            "val_loss": float(cli.trainer.callback_metrics["val/loss"]),
            "median_step_time_s": sorted(step_times)[len(step_times) // 2],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        },
    )
    assert len(losses) == 60
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # 16 layers x (QKV, attention output, fc1, fc2): every FP8 GEMM recorded amaxes and moved its scale.
    assert state["fp8_linear_modules"] == 64 and state["amax_nonzero_modules"] == 64
    assert state["max_scale"] > 1.0
    assert state["amax_history_lens"] == [1024]
    assert [r[1:] for r in state["recipes"]] == [[0, "Format.HYBRID", 1024, "max"]], state["recipes"]
    assert "val/loss" in cli.trainer.callback_metrics and "val/ppl" in cli.trainer.callback_metrics


def _tiny_arch() -> LlamaConfig:
    return LlamaConfig(
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=1536,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=64,
        vocab_size=32000,
        seq_length=1024,
    )


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_lightning_matches_plain_megatron(precision: str, record: Any) -> None:
    from lightning_llama_fp8 import MegatronPrecision
    from tests.gpu.plain_megatron import train_plain_megatron

    steps, gbs, mbs, seed = 10, 8, 2, 1234
    arch = _tiny_arch()
    optim = OptimizerSettings(lr=3e-4, min_lr=3e-5, warmup_steps=2, decay_steps=steps)

    def data() -> MockDataModule:
        return MockDataModule(
            seq_length=arch.seq_length,
            vocab_size=arch.vocab_size,
            global_batch_size=gbs,
            micro_batch_size=mbs,
            train_samples=steps * gbs,
            val_samples=gbs,
            num_workers=0,
        )

    # FP8 as the reference recipe runs it: delayed scaling with FP8 weights gathered in FP8.
    plugin = TEFP8Precision(fp8_param_gather=True) if precision == "fp8" else MegatronPrecision()
    seed_everything(seed)
    recorder = StepProbe()
    trainer = one_gpu_trainer(plugin, steps, [recorder])
    trainer.fit(LlamaLightningModule(arch, optim), datamodule=data())

    reference_data = data()
    reference_data.setup("fit")
    batches = list(reference_data.train_dataloader())
    fp8 = plugin.transformer_config_kwargs() if precision == "fp8" else None
    reference = train_plain_megatron(arch, batches, seed, fp8, optim.lr, optim.min_lr, optim.warmup_steps, steps)

    record(
        f"lightning_vs_plain_megatron_{precision}",
        {"lightning": recorder.losses, "plain_megatron": reference},
    )
    assert len(recorder.losses) == len(reference) == steps
    for step, (ours, theirs) in enumerate(zip(recorder.losses, reference, strict=True)):
        assert ours == pytest.approx(theirs, rel=5e-3), f"step {step}: {ours} vs {theirs}"
