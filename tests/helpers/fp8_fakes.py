"""Fake Transformer Engine layers with predictable delayed-scaling state, for FP8StatsMonitor's tests on the CPU.

``PredictableFP8Linear`` emulates what TE leaves behind after each training step with delayed scaling: the step's
amaxes in the last history row (row 0 zeroed) and scales computed from them. After its k-th forward the forward
amaxes are ``[k, 2k, 4k] * factor`` and after its k-th backward the backward amaxes are ``[k, 8k] * factor``;
scales are ``1 / amax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.trainers import MemoryLogger


@dataclass
class FakeState:
    amax_history: Tensor
    scale: Tensor


class CountingDict(dict):
    """fp8_meta that counts lookups, to prove the monitor does not touch FP8 state on non-logging steps."""

    lookups = 0

    def __getitem__(self, key: Any) -> Any:
        CountingDict.lookups += 1
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        CountingDict.lookups += 1
        return super().get(key, default)


class PredictableFP8Linear(nn.Linear):
    def __init__(self, factor: float, lazy: bool = False, history_len: int = 4) -> None:
        super().__init__(4, 4)
        self.factor = factor
        self.history_len = history_len
        self.forwards = 0
        self.backwards = 0
        self.fp8_meta = CountingDict(recipe=None, fp8_checkpoint=False)
        # Private references, so that the module's own bookkeeping does not count as fp8_meta lookups.
        self._fwd = FakeState(torch.zeros(history_len, 3), torch.ones(3))
        self._bwd = FakeState(torch.zeros(history_len, 2), torch.ones(2))
        if not lazy:  # TE creates the scaling state in the first FP8 forward; lazy=True emulates that
            self._publish_state()

    def _publish_state(self) -> None:
        dict.__setitem__(self.fp8_meta, "scaling_fwd", self._fwd)
        dict.__setitem__(self.fp8_meta, "scaling_bwd", self._bwd)

    @staticmethod
    def _update(state: FakeState, newest: Tensor) -> None:
        # As TE's update kernel: rotate so that the newest amax is the last row, zero the staging row 0.
        state.amax_history.copy_(state.amax_history.roll(-1, 0))
        state.amax_history[-1] = newest
        state.amax_history[0] = 0.0
        state.scale.copy_(1.0 / newest)

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        if self.forwards == 1:
            self._publish_state()
        k = self.forwards * self.factor
        self._update(self._fwd, torch.tensor([k, 2 * k, 4 * k]))
        out = super().forward(x)
        if out.requires_grad:  # not in validation
            out.register_hook(self._on_backward)
        return out

    def _on_backward(self, grad: Tensor) -> None:
        self.backwards += 1
        k = self.backwards * self.factor
        self._update(self._bwd, torch.tensor([k, 8 * k]))


class TinyFP8Module(LightningModule):
    def __init__(self, fp8: bool = True, lazy: bool = False) -> None:
        super().__init__()
        if fp8:
            self.layer1 = PredictableFP8Linear(factor=1.0, lazy=lazy)
            self.block = nn.ModuleDict({"norm": nn.LayerNorm(4), "fc": PredictableFP8Linear(factor=0.5, lazy=lazy)})
        else:
            self.layer1 = nn.Linear(4, 4)
            self.block = nn.ModuleDict({"norm": nn.LayerNorm(4), "fc": nn.Linear(4, 4)})
        self.head = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        return self.head(self.block["fc"](self.block["norm"](self.layer1(x)))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2)


def fit(module: LightningModule, callback: Callback, max_steps: int, **kwargs: Any) -> Trainer:
    """``max_steps`` of ``module`` on one CPU process with ``callback`` and a ``MemoryLogger``."""
    trainer_kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": MemoryLogger(),
        "callbacks": [callback],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    trainer = Trainer(**trainer_kwargs)
    trainer.fit(module)
    return trainer
