"""Megatron-LM's side of the benchmarks' tests: its training log lines, field by field."""

from __future__ import annotations


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
