"""ThroughputMonitor through Lightning's fit loop on the CPU, on a fake clock that only the test moves.

The dataset moves the clock by ``FETCH_S`` per sample it hands out (inside the training loop's fetch) and each
training step by its entry in ``STEP_S``, so every logged number has an exact hand-computed value: step ``k`` (from
the second on) lasts ``BATCH * FETCH_S + STEP_S[k - 1]`` from the previous step end, of which ``BATCH * FETCH_S``
was spent waiting for data.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_llama_fp8.callbacks import ThroughputMonitor
from lightning_llama_fp8.callbacks.throughput import bf16_dense_peak
from lightning_llama_fp8.validate import SettingError
from tests.helpers import MemoryLogger, cpu_trainer, run_distributed
from tests.helpers.timed import ARCH, BATCH, FETCH_S, SEQ, STEP_S, FakeClock, TimedModule


def expected(steps: list[int], world_size: int = 1, tokens_per_step: int = BATCH * SEQ) -> dict[str, float]:
    """Hand computation over the timed steps ``steps`` (1-based) of one rank, ``peak_tflops=1e-4``."""
    times = [BATCH * FETCH_S + STEP_S[k - 1] for k in steps]
    tokens_per_s = tokens_per_step * len(steps) / sum(times)
    full, causal = (ARCH.flops_per_token(causal=c) * tokens_per_s / world_size / 1e12 for c in (False, True))
    return {
        "throughput/step_time_s": sum(times) / len(steps),
        "throughput/data_wait_s": BATCH * FETCH_S,
        "throughput/tokens_per_sec": tokens_per_s,
        "throughput/tokens_per_sec_per_gpu": tokens_per_s / world_size,
        "throughput/tflops_per_gpu": full,
        "throughput/tflops_per_gpu_causal": causal,
        "throughput/mfu": full / 1e-4,
        "throughput/mfu_causal": causal / 1e-4,
    }


def fit(
    tmp_path: Path, window: int, max_steps: int = 6, module_kwargs: dict[str, Any] | None = None, **trainer_kwargs: Any
) -> tuple[FakeClock, ThroughputMonitor, MemoryLogger]:
    clock = FakeClock()
    monitor = ThroughputMonitor(window=window, log_every_n_steps=1, peak_tflops=1e-4, clock=clock)
    logger = MemoryLogger()
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer = cpu_trainer(max_steps=max_steps, callbacks=[monitor], default_root_dir=tmp_path, **trainer_kwargs)
    trainer.loggers = [logger]
    trainer.fit(TimedModule(clock, STEP_S, **(module_kwargs or {})))
    return clock, monitor, logger


def logged(logger: MemoryLogger) -> dict[int, dict[str, float]]:
    """The monitor's records by optimizer step (1-based; loggers get Lightning's step number, one less)."""
    return {step + 1: values for step, values in logger.records if any(k.startswith("throughput/") for k in values)}


def assert_metrics(actual: dict[str, float], wanted: dict[str, float]) -> None:
    assert set(actual) == set(wanted)
    for name, value in wanted.items():
        assert actual[name] == pytest.approx(value, rel=1e-12), name


def test_window_averages_match_hand_computation(tmp_path: Path) -> None:
    _, monitor, logger = fit(tmp_path, window=3)
    records = logged(logger)
    assert sorted(records) == [2, 3, 4, 5, 6]  # step 1 has no start to be timed from
    assert_metrics(records[2], expected([2]))
    assert_metrics(records[3], expected([2, 3]))
    assert_metrics(records[6], expected([4, 5, 6]))  # the window keeps the last three
    # e.g. step 6: (4.25 + 5.25 + 6.25) / 3 s per step, 3 * 32 tokens in 15.75 s
    assert records[6]["throughput/step_time_s"] == 5.25
    assert records[6]["throughput/tokens_per_sec"] == 96 / 15.75
    assert monitor.last_metrics == records[6]


def test_steps_with_validation_or_a_checkpoint_save_are_left_out(tmp_path: Path) -> None:
    """Validation after steps 2, 4 and 6 (100 s each), a checkpoint saved at step 4 (1000 s)."""
    clock = FakeClock()
    monitor = ThroughputMonitor(window=10, log_every_n_steps=1, peak_tflops=1e-4, clock=clock)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=4, save_top_k=-1)
    logger = MemoryLogger()
    trainer = cpu_trainer(
        max_steps=6,
        callbacks=[monitor, saver],
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    )
    trainer.loggers = [logger]
    trainer.fit(TimedModule(clock, STEP_S))
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch=0-step=4.ckpt"]
    # The validation runs after steps 2 and 4 and the save at step 4 fall into steps 3 and 5: left out.
    assert_metrics(logged(logger)[6], expected([2, 4, 6]))


def test_logs_every_n_steps_only(tmp_path: Path) -> None:
    clock = FakeClock()
    monitor = ThroughputMonitor(window=2, log_every_n_steps=3, peak_tflops=1e-4, clock=clock)
    logger = MemoryLogger()
    trainer = cpu_trainer(max_steps=6, callbacks=[monitor], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.loggers = [logger]
    trainer.fit(TimedModule(clock, STEP_S))
    records = logged(logger)
    assert sorted(records) == [3, 6]
    assert_metrics(records[6], expected([5, 6]))


def test_csv_rows_share_the_step_numbers_of_the_modules_own_metrics(tmp_path: Path) -> None:
    """The monitor's values of a step land at the step number Lightning gives that step's ``self.log`` values."""

    class LoggingModule(TimedModule):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.log("train/step_seen", float(self.global_step + 1))  # 1-based optimizer step
            return super().training_step(batch, batch_idx)

    clock = FakeClock()
    monitor = ThroughputMonitor(window=1, clock=clock)
    csv_logger = CSVLogger(tmp_path, name="run")
    trainer = cpu_trainer(max_steps=4, callbacks=[monitor], limit_val_batches=0, log_every_n_steps=1)
    trainer.loggers = [csv_logger]
    trainer.fit(LoggingModule(clock, STEP_S))
    rows = list(csv.DictReader((Path(csv_logger.log_dir) / "metrics.csv").open()))
    seen = {int(r["step"]): float(r["train/step_seen"]) for r in rows if r.get("train/step_seen")}
    timed = {int(r["step"]): float(r["throughput/step_time_s"]) for r in rows if r.get("throughput/step_time_s")}
    assert seen == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    # window=1: the value at a step number is that very step's time (optimizer step seen[n])
    assert timed == {n: BATCH * FETCH_S + STEP_S[int(seen[n]) - 1] for n in (1, 2, 3)}


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    """Two batches per optimizer step: a step lasts two fetches and two training_step calls, holds both batches."""
    clock = FakeClock()
    monitor = ThroughputMonitor(window=5, log_every_n_steps=1, peak_tflops=1e-4, clock=clock)
    logger = MemoryLogger()
    trainer = cpu_trainer(
        max_steps=3, callbacks=[monitor], limit_val_batches=0, accumulate_grad_batches=2, default_root_dir=tmp_path
    )
    trainer.loggers = [logger]
    trainer.fit(TimedModule(clock, [1.0] * 12))  # indexed by global_step: 1 s per batch
    records = logged(logger)
    step = 2 * (BATCH * FETCH_S + 1.0)  # 2.5 s
    assert records[3]["throughput/step_time_s"] == step
    assert records[3]["throughput/data_wait_s"] == 2 * BATCH * FETCH_S
    assert records[3]["throughput/tokens_per_sec"] == 2 * BATCH * SEQ / step


def test_data_wait_is_measured_around_the_real_fetch(tmp_path: Path) -> None:
    """Real clock: a dataset that sleeps 30 ms per sample (60 ms per batch) gives ~60 ms of data wait per step."""
    monitor = ThroughputMonitor(window=10, log_every_n_steps=1)
    logger = MemoryLogger()
    trainer = cpu_trainer(max_steps=5, callbacks=[monitor], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.loggers = [logger]
    trainer.fit(TimedModule(None, STEP_S, sleep_s=0.03))
    metrics = monitor.last_metrics
    assert 0.06 <= metrics["throughput/data_wait_s"] < 0.2
    assert metrics["throughput/data_wait_s"] < metrics["throughput/step_time_s"]
    assert "throughput/mfu" not in metrics  # CPU: no peak
    assert trainer.profiler.start.__func__ is type(trainer.profiler).start  # the profiler is restored after fit


def _dp2_worker(rank: int, world_size: int, root: str) -> dict[str, float]:
    from tests.helpers import megatron_cpu_trainer
    from tests.helpers.models import mock_data

    clock = FakeClock()

    class MegatronBatches(TimedModule):
        train_dataloader = None  # type: ignore[assignment]  # the data module's
        val_dataloader = None  # type: ignore[assignment]

    monitor = ThroughputMonitor(window=10, log_every_n_steps=1, peak_tflops=1e-4, clock=clock)
    trainer = megatron_cpu_trainer(world_size, max_steps=4, limit_val_batches=0, callbacks=[monitor])
    data = mock_data(SEQ, 4)
    trainer.fit(MegatronBatches(clock, STEP_S), datamodule=data)
    return monitor.last_metrics


@pytest.mark.multiprocess
def test_two_data_parallel_ranks_count_the_global_batch(tmp_path: Path) -> None:
    """MegatronCPStrategy on two gloo ranks: each rank's batch is [2 micro batches, 1, SEQ] of a global batch of 4."""
    results = run_distributed(_dp2_worker, 2, tmp_path / "workers", str(tmp_path))
    times = STEP_S[1:4]  # steps 2-4; the mock data takes no time on the fake clock
    global_tokens_per_s = 4 * SEQ * 3 / sum(times)
    for metrics in results:
        assert metrics["throughput/data_wait_s"] == 0.0
        assert metrics["throughput/step_time_s"] == pytest.approx(sum(times) / 3)
        assert metrics["throughput/tokens_per_sec"] == pytest.approx(global_tokens_per_s)
        assert metrics["throughput/tokens_per_sec_per_gpu"] == pytest.approx(global_tokens_per_s / 2)
        tflops = ARCH.flops_per_token() * global_tokens_per_s / 2 / 1e12
        assert metrics["throughput/tflops_per_gpu"] == pytest.approx(tflops)


@pytest.mark.parametrize(
    "name,card,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H200", "H200", 989.0),
        ("NVIDIA B200", "B200", 2250.0),
        ("NVIDIA H100 NVL", None, None),  # lower peak than SXM: not guessed
        ("NVIDIA H200 NVL", None, None),
        ("NVIDIA GB200", None, None),  # GB200's B200 runs at a higher peak than HGX B200's
        ("NVIDIA A100-SXM4-80GB", None, None),
    ],
)
def test_known_cards(name: str, card: str | None, tflops: float | None) -> None:
    peak = bf16_dense_peak(name)
    assert (peak.card, peak.tflops) == (card, tflops) if peak else card is None


def test_the_card_and_its_peak_are_named_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = ThroughputMonitor()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak, _ = monitor._resolve_peak(trainer)  # type: ignore[arg-type]
    assert peak is not None and (peak.card, peak.tflops) == ("H200 (NVIDIA H200)", 989.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    peak, why = monitor._resolve_peak(trainer)  # type: ignore[arg-type]
    assert peak is None and "'NVIDIA L4'" in why and "peak_tflops" in why

    with caplog.at_level(logging.INFO):
        fit_trainer = cpu_trainer(max_steps=2, callbacks=[ThroughputMonitor()], limit_val_batches=0)
        fit_trainer.fit(TimedModule(None, STEP_S))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ThroughputMonitor")]
    assert lines == ["ThroughputMonitor: MFU is not computed: training on cpu, not a GPU."]


@pytest.mark.parametrize(
    ("kwargs", "setting", "accepted"),
    [
        ({"window": 0}, "window", "a whole number >= 1"),
        ({"window": 2.5}, "window", "a whole number >= 1"),
        ({"window": True}, "window", "a whole number >= 1"),
        ({"log_every_n_steps": 0}, "log_every_n_steps", "a whole number >= 1"),
        ({"log_every_n_steps": 1.5}, "log_every_n_steps", "a whole number >= 1"),
        ({"peak_tflops": -1.0}, "peak_tflops", "a finite number > 0"),
        ({"peak_tflops": math.nan}, "peak_tflops", "a finite number > 0"),
        ({"peak_tflops": math.inf}, "peak_tflops", "a finite number > 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], setting: str, accepted: str) -> None:
    with pytest.raises(SettingError, match=rf"^ThroughputMonitor {setting} must be {accepted}; got ") as err:
        ThroughputMonitor(**kwargs)
    assert repr(kwargs[setting]) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    monitor = ThroughputMonitor(window=20.0, log_every_n_steps="5", peak_tflops="989")
    assert (monitor.window, monitor.log_every_n_steps, monitor.peak_tflops) == (20, 5, 989.0)
    assert type(monitor.window) is int and type(monitor.log_every_n_steps) is int


# ---------------------------------------------------------------------------------------------- plot_training.py
