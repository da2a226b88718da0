"""Megatron-LM's side of the benchmarks' tests: its training log lines, field by field, and stand-ins for the
benchmark runs that would produce them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest


def iteration_line(
    iteration: int,
    elapsed_ms: float,
    loss: float | None,
    *,
    train_iters: int = 30,
    gbs: int = 8,
    tflops: float | None = 401.3,
    skipped_samples: int = 0,
    grad_norm: float = 3.14159,
    timestamp: str = "2026-08-23 10:15:42.123456",
) -> str:
    """One training log line, field by field in Megatron-LM's format (numbers made up)."""
    line = f" [{timestamp}]"
    line += f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {iteration * gbs:12d} |"
    if skipped_samples > 0:
        line += f" skipped samples: {skipped_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    if tflops is not None:
        line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
    line += f" learning rate: {1.5e-4 * min(1.0, iteration / 2):.6E} |"
    line += f" global batch size: {gbs:5d} |"
    if loss is not None:
        line += f" lm loss: {loss:.6E} |"
    line += f" loss scale: {1.0:.1f} |"
    line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {0:3d} |"
    line += f" number of nan iterations: {0:3d} |"
    return line


def record_launches(monkeypatch: pytest.MonkeyPatch, code: int = 0) -> list[dict[str, Any]]:
    """Stand-in for the runs ``benchmarks.lib.launch.run_logged`` starts: records them and writes what each side reads
    back (a result file, a Megatron-LM log)."""
    calls: list[dict[str, Any]] = []

    def fake_run(cmd: list[str], *, env: dict[str, str], stdout: Any, stderr: int, check: bool) -> Any:
        calls.append({"cmd": cmd, "env": env, "log": Path(stdout.name), "stderr": stderr, "check": check})
        if "--out" in cmd:  # benchmarks.throughput's result file
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"tokens_per_sec_per_gpu": 1.0}))
        stdout.write("".join(iteration_line(i, 1000.0, 10.0, train_iters=30) + "\n" for i in range(1, 31)))
        return subprocess.CompletedProcess(cmd, code)

    # run_logged (benchmarks/lib/launch.py) starts them with subprocess.run, looked up when it runs
    monkeypatch.setattr("benchmarks.lib.launch.subprocess.run", fake_run)
    return calls
