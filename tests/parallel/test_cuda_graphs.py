"""CUDA graphs of the transformer layers (``MegatronCPStrategy(cuda_graphs=...)``): the settings, the refusals before
anything is built, and what reaches Megatron's ``TransformerConfig`` (CPU; the capture itself needs a GPU:
tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from lightning_llama_fp8 import (
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    OptimizerOffloadSettings,
    RecomputeSettings,
    get_preset,
)
from lightning_llama_fp8.callbacks import NaNGuard
from lightning_llama_fp8.parallel.cuda_graphs import CudaGraphSettings
from tests.helpers import NeverBuilt
from tests.helpers.trainers import cpu_cli_of_example

TE_TINY = dict(apply_rope_fusion=False)  # the Transformer Engine layer spec; CPU: no fused RoPE kernel


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modules": ["attention"]}, r"unknown modules \['attention'\] \(a dense Llama layer has attn, mlp\)"),
        ({"modules": []}, r"modules must be a non-empty list of attn, mlp, or null"),
        ({"modules": "mlp"}, r"modules must be a non-empty list"),
        ({"modules": ["mlp", "mlp"]}, r"modules lists a name twice"),
        ({"warmup_steps": 0}, r"warmup_steps must be a whole number >= 1; got 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CudaGraphSettings(**kwargs)


def test_megatron_config_gets_the_graph_fields() -> None:
    settings = CudaGraphSettings(modules=["attn", "mlp"], warmup_steps=2)
    config = get_preset("llama_tiny", **TE_TINY).transformer_config(
        **settings.transformer_config_kwargs(), use_cpu_initialization=True
    )
    assert config.cuda_graph_impl == "transformer_engine" and config.cuda_graph_warmup_steps == 2
    assert [module.name for module in config.cuda_graph_modules] == ["attn", "mlp"]
    assert config.use_te_rng_tracker  # graphed layers draw their dropout RNG from Transformer Engine's tracker
    assert CudaGraphSettings().transformer_config_kwargs()["cuda_graph_modules"] == []  # the whole layer


def _fit(strategy_kwargs: dict[str, Any], arch: Any = None, callbacks: list[Any] | None = None, **data: Any) -> None:
    from lightning.pytorch import Trainer

    module = NeverBuilt(arch or get_preset("llama_tiny", **TE_TINY))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronCPStrategy(**strategy_kwargs),
        plugins=[MegatronPrecision()],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks or [],
    )
    datamodule = MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4, micro_batch_size=1, **data)
    trainer.fit(module, datamodule=datamodule)


@pytest.mark.parametrize(
    ("strategy_kwargs", "arch_kwargs", "data", "message"),
    [
        ({}, {"transformer_impl": "local"}, {}, r"needs model.arch.transformer_impl 'transformer_engine'"),
        ({"activation_recompute": RecomputeSettings("full")}, {}, {}, r"cannot go with full activation recompute"),
        ({"optimizer_offload": OptimizerOffloadSettings(0.5)}, {}, {}, r"cannot go with optimizer_offload"),
        ({}, {}, {"document_masking": True}, r"cannot go with document masking"),
    ],
)
def test_what_cannot_run_with_graphs_is_refused_before_building(
    strategy_kwargs: dict[str, Any], arch_kwargs: dict[str, Any], data: dict[str, Any], message: str
) -> None:
    arch = get_preset("llama_tiny", **{**TE_TINY, **arch_kwargs})
    with pytest.raises(ValueError, match=message):
        _fit({"cuda_graphs": CudaGraphSettings(), **strategy_kwargs}, arch, **data)
    assert not torch.distributed.is_initialized()


def test_nanguard_bf16_steps_are_refused_and_its_output_watch_is_said_to_be_blind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match=r"cannot go with NaNGuard\(bf16_steps_after_rollback>0\)"):
        _fit({"cuda_graphs": CudaGraphSettings()}, callbacks=[NaNGuard(policy="rollback", bf16_steps_after_rollback=5)])
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="cannot go with document masking"):
        _fit({"cuda_graphs": CudaGraphSettings()}, callbacks=[NaNGuard()], document_masking=True)
    assert "does not see layers replayed as CUDA graphs" in caplog.text
    assert not torch.distributed.is_initialized()


def test_settings_from_yaml_through_lightning_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = cpu_cli_of_example(
        monkeypatch, "llama3_8b_h100_fp8.yaml", "--trainer.strategy.cuda_graphs.modules", "[attn]"
    )
    assert parsed.trainer.strategy.cuda_graphs == CudaGraphSettings(modules=["attn"], warmup_steps=3)
