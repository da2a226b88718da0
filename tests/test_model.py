"""LlamaLightningModule (model.py): its optimizer settings and schedule, how it reads the strategy and precision,
and the model it builds."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from lightning_llama_fp8._compat.warnings import MANUAL_OPTIMIZATION_CHECKPOINT_WARNING
from tests.helpers.models import tiny_llama


def test_resumed_schedule_follows_this_runs_settings() -> None:
    """A run resumed with a longer schedule (decay over 8 steps instead of 4) keeps the step count and decays
    over 8 (Megatron-LM's --override-opt_param-scheduler), instead of silently keeping the checkpoint's schedule."""
    from types import SimpleNamespace

    from lightning_llama_fp8 import LlamaLightningModule, OptimizerSettings

    def scheduler(decay_steps: int) -> tuple[Any, dict[str, float]]:
        group = {"max_lr": 3e-4, "min_lr": 3e-5, "lr": 0.0, "weight_decay": 0.1, "wd_mult": 1.0, "lr_mult": 1.0}
        settings = OptimizerSettings(lr=3e-4, min_lr=3e-5, warmup_steps=1, decay_steps=decay_steps)
        module = LlamaLightningModule(tiny_llama(), settings)
        return module.lr_scheduler(SimpleNamespace(param_groups=[group])), group

    saved, _ = scheduler(4)
    for _ in range(3):
        saved.step(increment=1)
    resumed, group = scheduler(8)
    resumed.load_state_dict(saved.state_dict())
    reference, reference_group = scheduler(8)
    for _ in range(3):
        reference.step(increment=1)
    assert resumed.num_steps == 3 and resumed.lr_decay_steps == 8
    assert group["lr"] == pytest.approx(reference_group["lr"]) and group["lr"] > 3e-5


def test_llama_module_installs_the_checkpoint_warning_filter() -> None:
    from lightning_llama_fp8 import LlamaLightningModule

    with warnings.catch_warnings():
        warnings.resetwarnings()
        LlamaLightningModule("llama_tiny")
        assert any(
            action == "ignore" and message is not None and message.pattern == MANUAL_OPTIMIZATION_CHECKPOINT_WARNING
            for action, message, *_ in warnings.filters
        )
