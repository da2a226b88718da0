"""benchmarks/plot_training.py on the CPU: it reads Megatron-LM logs, benchmark records and the values
ThroughputMonitor logs to CSV and TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_llama_fp8.callbacks import ThroughputMonitor
from tests.helpers import REPO_ROOT, cpu_trainer
from tests.helpers.timed import BATCH, FETCH_S, SEQ, STEP_S, FakeClock, TimedModule


def _plot_module() -> Any:
    import importlib.util

    path = REPO_ROOT / "benchmarks" / "plot_training.py"
    spec = importlib.util.spec_from_file_location("plot_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


MEGATRON_LM_LOG = """\
  seq_length ...................................... 8192
  world_size ...................................... 2
 [2026-01-01 12:00:00] iteration        1/       3 | consumed samples:            8 | elapsed time per iteration (ms): 4096.0 | throughput per GPU (TFLOP/s/GPU): 100.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 1.200000E+01 | loss scale: 1.0 |
 [2026-01-01 12:00:02] iteration        2/       3 | consumed samples:           16 | elapsed time per iteration (ms): 2048.0 | throughput per GPU (TFLOP/s/GPU): 200.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 1.100000E+01 | loss scale: 1.0 |
"""  # noqa: E501


def test_plot_reads_megatron_lm_logs_and_bench_records(tmp_path: Path) -> None:
    plot = _plot_module()
    (tmp_path / "lm.log").write_text(MEGATRON_LM_LOG)
    lm = plot.read_megatron_lm(tmp_path / "lm.log")
    assert lm.loss == {1: 12.0, 2: 11.0}
    assert lm.tokens_per_sec_per_gpu == {1: 8 * 8192 / 4.096 / 2, 2: 8 * 8192 / 2.048 / 2}
    record = {"global_batch_size": 8, "seq_length": 8192, "gpus": 2, "losses": [12.0, 11.5], "step_times_s": [2.0]}
    (tmp_path / "ours.json").write_text(json.dumps(record))
    ours = plot.read_ours(tmp_path / "ours.json")
    assert ours.loss == {1: 12.0, 2: 11.5} and ours.tokens_per_sec_per_gpu == {2: 8 * 8192 / 2.0 / 2}


def test_plot_reads_the_monitors_values_from_csv_and_tensorboard_logs(tmp_path: Path) -> None:
    """A real fit with both loggers: the plot takes tokens/s/GPU from ThroughputMonitor, loss from the module."""
    from lightning.pytorch.loggers import TensorBoardLogger

    class LossLogging(TimedModule):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("train/loss", float(self.global_step + 1))
            return loss

    clock = FakeClock()
    monitor = ThroughputMonitor(window=1, clock=clock)
    trainer = cpu_trainer(max_steps=4, callbacks=[monitor], limit_val_batches=0, log_every_n_steps=1)
    trainer.loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer.fit(LossLogging(clock, STEP_S))
    plot = _plot_module()
    speed = {k: BATCH * SEQ / (BATCH * FETCH_S + STEP_S[k - 1]) for k in (2, 3, 4)}
    for run in (plot.read_ours(tmp_path / "csv"), plot.read_ours(tmp_path / "tb")):
        assert run.loss == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
        assert run.tokens_per_sec_per_gpu == pytest.approx(speed)
    pytest.importorskip("matplotlib")
    log, png = tmp_path / "lm.log", tmp_path / "p.png"
    log.write_text(MEGATRON_LM_LOG)
    args = ["--ours", str(tmp_path / "csv"), "--megatron-lm", str(log), "--out", str(png)]
    assert plot.main(args) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
