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
import math
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

import lightning_llama_fp8.callbacks.fp8_monitor as monitor_mod
from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
from lightning_llama_fp8.validate import SettingError
from tests.helpers.fp8_fakes import CountingDict, TinyFP8Module, fit

STATS = ("fwd_amax", "fwd_scale_min", "fwd_scale_max", "bwd_amax", "bwd_scale_min", "bwd_scale_max")


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


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, math.nan, "ten"])
def test_every_n_steps_is_validated(bad: Any) -> None:
    with pytest.raises(SettingError, match=r"^FP8StatsMonitor every_n_steps must be a whole number >= 1; got ") as err:
        FP8StatsMonitor(every_n_steps=bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("whole", [10, 10.0, "10"])
def test_every_n_steps_takes_whole_numbers_from_yaml(whole: Any) -> None:
    monitor = FP8StatsMonitor(every_n_steps=whole)
    assert monitor.every_n_steps == 10 and type(monitor.every_n_steps) is int


@pytest.mark.parametrize("bad", [[], [""], "layers"])
def test_modules_filter_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="modules must be a non-empty list"):
        FP8StatsMonitor(modules=bad)
