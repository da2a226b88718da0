"""What ``LlamaLightningModule`` logs at the end of a validation on several ranks (model.py's logging lines): the
global validation loss, the same on every rank, without Lightning's advice to sync it."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8 import LlamaLightningModule
from tests.helpers import run_distributed
from tests.helpers.models import mock_data, tiny_llama


class ConstantValidation(LlamaLightningModule):
    """Megatron's model cannot run on the CPU: nothing is built, and each validation batch adds the loss a real one
    would already have reduced over all ranks (the same on every rank)."""

    def configure_model(self) -> None:
        pass

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = torch.tensor(2.5)
        self.val_loss.update(loss, weight=torch.tensor(10.0))
        return loss


def _validate_worker(rank: int, world_size: int) -> tuple[dict[str, float], list[str]]:
    from tests.helpers import megatron_cpu_trainer

    trainer = megatron_cpu_trainer(world_size)
    module = ConstantValidation(arch=tiny_llama(seq_length=64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, datamodule=mock_data(64, 4, val_samples=8))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return metrics, [str(w.message) for w in caught]


@pytest.mark.multiprocess
def test_validation_logs_the_global_loss_without_lightnings_sync_advice(tmp_path: Path) -> None:
    """Lightning warned at every validation ("It is recommended to use `self.log('val/ppl', ..., sync_dist=True)`")
    for values that are already global; they are logged synced now (max over equal values: exact)."""
    for metrics, messages in run_distributed(_validate_worker, 2, tmp_path):
        assert metrics["val/loss"] == 2.5
        assert metrics["val/ppl"] == pytest.approx(math.exp(2.5), rel=1e-6)
        assert not [m for m in messages if "sync_dist=True" in m], messages
