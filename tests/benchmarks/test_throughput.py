"""benchmarks/throughput.py on the CPU: what its checkpoint-stall record makes of the strategy's background saves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.throughput import CheckpointStall
from lightning_llama_fp8.checkpoint.background import SaveTiming


def test_checkpoint_stall_records_the_wait_for_the_previous_write_and_the_interval_that_avoids_it(
    tmp_path: Path,
) -> None:
    """Saves at steps 8 and 16 of 1 s steps; the first write took 24 s, so the second save waited 16 s of it."""
    timings = [SaveTiming(tmp_path / "s8", 8, 0.0, 24.0), SaveTiming(tmp_path / "s16", 16, 16.0, 23.5)]
    saver = SimpleNamespace(timings=[])
    strategy: Any = SimpleNamespace(
        pending_checkpoint=None,
        checkpointing=SimpleNamespace(async_saver=saver, host_reserve=None),
        on_train_end=lambda: None,
    )

    def save(checkpoint: dict, path: str) -> None:
        saver.timings.append(timings[len(saver.timings)])

    strategy.save_checkpoint, strategy.on_train_batch_start = save, lambda *args: None
    trainer: Any = SimpleNamespace(strategy=strategy, global_step=8)
    stall = CheckpointStall(warmup=2)
    stall.setup(trainer, None, "fit")
    strategy.save_checkpoint({}, "s8")
    trainer.global_step = 16
    strategy.checkpointing.async_saver = None  # the strategy's teardown drops its saver: the record keeps it
    strategy.save_checkpoint({}, "s16")
    stall.steps = [(step, 1.0, False, False) for step in range(1, 25)]
    summary = stall.summary("async", tmp_path / "none", tokens_per_step=8192)
    assert summary["waited_for_previous_s"] == [0.0, 16.0]
    assert summary["write_s"] == [24.0, 23.5]
    assert summary["shortest_nonblocking_interval_steps"] == 24  # the longest write, in 1 s steps
    assert [save["step"] for save in summary["saves"]] == [8, 16]
    assert summary["saves"][1]["waited_for_previous_s"] == 16.0 and summary["saves"][1]["write_s"] == 23.5


def test_host_peak_rss_is_the_kernels_high_water_mark_and_follows_an_allocation() -> None:
    from benchmarks.throughput import host_peak_rss_gib

    def status_gib(field: str) -> float:  # Linux's own counts, /proc/self/status "VmHWM: N kB" (peak), "VmRSS" (now)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
        return int(line.split()[1]) / 2**20

    before = host_peak_rss_gib()
    assert before == pytest.approx(status_gib("VmHWM"), abs=0.01)
    # Enough to lift the peak by 0.25 GiB from where the process is now, every page written (zeroed).
    block = bytearray(int((before - status_gib("VmRSS") + 0.25) * 2**30))
    assert host_peak_rss_gib() >= before + 0.2
    del block


def test_the_record_counts_the_modules_that_held_cuda_graphs_at_the_end() -> None:
    import torch

    from benchmarks.throughput import StepLog

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].cuda_graphs = ["graph"]  # as Megatron's TECudaGraphHelper leaves them on each captured layer
    model[1].cuda_graphs = []  # a layer not (or no longer) captured
    log = StepLog()
    log.on_train_end(SimpleNamespace(), model)  # type: ignore[arg-type]
    assert log.graphed_modules == 1
