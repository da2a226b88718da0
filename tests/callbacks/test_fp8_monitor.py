"""FP8StatsMonitor through Lightning's fit loop on the CPU, with fake TE modules whose FP8 state is predictable.

``PredictableFP8Linear`` emulates what TE leaves behind after each training step with delayed scaling: the step's
amaxes in the last history row (row 0 zeroed) and scales computed from them. After its k-th forward the forward
amaxes are ``[k, 2k, 4k] * factor`` and after its k-th backward the backward amaxes are ``[k, 8k] * factor``;
scales are ``1 / amax``. So at ``global_step`` s (one forward and backward per step) the monitor must log
``fwd_amax = 4 s f``, ``fwd_scale_min = 1 / (4 s f)``, ``fwd_scale_max = 1 / (s f)``, ``bwd_amax = 8 s f``, ...
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_llama_fp8.callbacks.fp8_monitor as monitor_mod
from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
from tests import helpers

STATS = ("fwd_amax", "fwd_scale_min", "fwd_scale_max", "bwd_amax", "bwd_scale_min", "bwd_scale_max")


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


class MemoryLogger(helpers.MemoryLogger):
    """Keeps what log_metrics receives; ``fp8_records`` picks the monitor's metrics per step."""

    def fp8_records(self) -> dict[int | None, dict[str, float]]:
        out: dict[int | None, dict[str, float]] = {}
        for step, metrics in self.records:
            fp8 = {k: v for k, v in metrics.items() if k.startswith("fp8/")}
            if fp8:
                assert step not in out, f"step {step} logged twice"
                out[step] = fp8
        return out


def fit(module: LightningModule, callback: FP8StatsMonitor, max_steps: int, **kwargs: Any) -> Trainer:
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


def expected(name_factor: dict[str, float], step: int) -> dict[str, float]:
    metrics = {}
    for name, factor in name_factor.items():
        k = step * factor
        values = (4 * k, 1 / (4 * k), 1 / k, 8 * k, 1 / (8 * k), 1 / k)
        metrics.update(
            {f"fp8/{name}/{stat}": pytest.approx(v, rel=1e-6) for stat, v in zip(STATS, values, strict=True)}
        )
    return metrics


@pytest.fixture
def count_summaries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the summary the monitor uses; returns the list of call counts per call."""
    calls: list[int] = []
    real = monitor_mod.scaling_summary

    def counting(named_modules: Any) -> dict[str, dict[str, float]]:
        calls.append(len(calls) + 1)
        return real(named_modules)

    monkeypatch.setattr(monitor_mod, "scaling_summary", counting)
    return calls


# ---------------------------------------------------------------------------------------------- tests
def test_logs_every_n_steps_with_the_right_values_and_does_nothing_in_between(count_summaries: list[int]) -> None:
    CountingDict.lookups = 0
    lookups_at_step: dict[int, int] = {}

    class Spy(FP8StatsMonitor):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            super().on_train_batch_end(trainer, *args)
            lookups_at_step[trainer.global_step] = CountingDict.lookups

    monitor = Spy(every_n_steps=3)
    trainer = fit(TinyFP8Module(), monitor, max_steps=7)
    records = trainer.logger.fp8_records()  # type: ignore[union-attr]

    assert sorted(records) == [3, 6]
    factors = {"layer1": 1.0, "block.fc": 0.5}
    assert records[3] == expected(factors, 3)
    assert records[6] == expected(factors, 6)
    assert count_summaries == [1, 2]  # steps 1, 2, 4, 5, 7 did not call it
    # fp8_meta was read only on logging steps (the counter moves at 3 and 6 only).
    changes = [s for s in range(1, 8) if lookups_at_step[s] != lookups_at_step.get(s - 1, 0)]
    assert changes == [3, 6]
    assert monitor.last_summary["layer1"]["fwd_amax"] == pytest.approx(24.0)
    assert monitor.last_summary["layer1"]["history_len"] == 4


def test_module_filter_and_lazily_created_state(count_summaries: list[int]) -> None:
    # lazy=True: like TE, the scaling state appears only in the first forward, after fit start.
    monitor = FP8StatsMonitor(every_n_steps=2, modules=["block."])
    trainer = fit(TinyFP8Module(lazy=True), monitor, max_steps=4)
    records = trainer.logger.fp8_records()  # type: ignore[union-attr]
    assert sorted(records) == [2, 4]
    assert records[4] == expected({"block.fc": 0.5}, 4)
    assert all("layer1" not in key for metrics in records.values() for key in metrics)


def test_logging_is_independent_of_log_every_n_steps() -> None:
    # Values logged with self.log would only reach the logger every 50 steps; the monitor writes directly.
    trainer = fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=1), max_steps=3, log_every_n_steps=50)
    assert sorted(trainer.logger.fp8_records()) == [1, 2, 3]  # type: ignore[union-attr]


def test_accumulated_batches_log_once_per_optimizer_step(count_summaries: list[int]) -> None:
    trainer = fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=1), max_steps=2, accumulate_grad_batches=2)
    assert sorted(trainer.logger.fp8_records()) == [1, 2]  # type: ignore[union-attr]
    assert count_summaries == [1, 2]


def test_csv_logger_gets_the_columns(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=2), max_steps=4, logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("fp8/layer1/fwd_amax")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert float(rows[1]["fp8/layer1/fwd_amax"]) == pytest.approx(16.0)
    assert float(rows[1]["fp8/block.fc/bwd_amax"]) == pytest.approx(16.0)


def test_bf16_model_warns_once_and_logs_nothing(count_summaries: list[int]) -> None:
    with pytest.warns(UserWarning, match="no Transformer Engine module with FP8 state") as record:
        trainer = fit(TinyFP8Module(fp8=False), FP8StatsMonitor(every_n_steps=1), max_steps=3)
    assert sum("FP8StatsMonitor" in str(w.message) for w in record) == 1
    assert trainer.logger.fp8_records() == {}  # type: ignore[union-attr]
    assert count_summaries == []


def test_te_modules_without_delayed_state_warn_once_at_the_first_logging_step(count_summaries: list[int]) -> None:
    module = TinyFP8Module()
    for fake in (module.layer1, module.block["fc"]):
        # e.g. current scaling: fp8_meta exists, its recipe states have no amax history.
        fake.fp8_meta = CountingDict(recipe=None, scaling_fwd=object(), scaling_bwd=object())
        fake._publish_state = lambda: None  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="none of the 2 TE modules holds delayed-scaling state") as record:
        trainer = fit(module, FP8StatsMonitor(every_n_steps=2), max_steps=6)
    assert sum("FP8StatsMonitor" in str(w.message) for w in record) == 1
    assert count_summaries == [1]  # tried at step 2, then switched itself off
    assert trainer.logger.fp8_records() == {}  # type: ignore[union-attr]


def test_filter_matching_nothing_warns(count_summaries: list[int]) -> None:
    with pytest.warns(UserWarning, match=r"none of the 2 modules with FP8 state matches modules=\['decoder'\]"):
        fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=1, modules=["decoder"]), max_steps=2)
    assert count_summaries == []


def test_only_global_rank_zero_logs(monkeypatch: pytest.MonkeyPatch, count_summaries: list[int]) -> None:
    monkeypatch.setattr(Trainer, "is_global_zero", property(lambda self: False))
    trainer = fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=1), max_steps=2)
    assert count_summaries == []
    assert trainer.logger.fp8_records() == {}  # type: ignore[union-attr]


def test_no_logger_warns(count_summaries: list[int]) -> None:
    with pytest.warns(UserWarning, match="no logger"):
        fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=1), max_steps=2, logger=False)
    assert count_summaries == []


def test_debug_api_hint_only_when_nvdlfw_inspect_is_installed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_find_spec = monitor_mod.importlib.util.find_spec
    for installed in (False, True):
        caplog.clear()
        monkeypatch.setattr(
            monitor_mod.importlib.util,
            "find_spec",
            lambda name, *a, installed=installed: (
                (object() if installed else None) if name == "nvdlfw_inspect" else real_find_spec(name, *a)
            ),
        )
        with caplog.at_level(logging.INFO, logger=monitor_mod.__name__):
            fit(TinyFP8Module(), FP8StatsMonitor(every_n_steps=5), max_steps=1)
        hints = [r for r in caplog.records if "LogFp8TensorStats" in r.getMessage()]
        assert len(hints) == (1 if installed else 0)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_every_n_steps_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        FP8StatsMonitor(every_n_steps=bad)


@pytest.mark.parametrize("bad", [[], [""], "layers"])
def test_modules_filter_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="modules must be a non-empty list"):
        FP8StatsMonitor(modules=bad)
