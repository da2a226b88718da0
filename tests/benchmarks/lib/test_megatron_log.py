"""CPU tests for benchmarks/lib/megatron_log.py on synthetic Megatron-LM training logs.

The iteration lines follow the field formats of Megatron-LM's ``training_log``
(megatron/training/training.py, commit recorded in .baseline/COMMIT); the numbers are made up.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from benchmarks.lib.megatron_log import (
    IterationRecord,
    main,
    parse_iteration_records,
    parse_iteration_times,
    parse_losses,
    parse_throughputs,
    summarize,
)
from tests.helpers.megatron_lm import iteration_line

# A line as Megatron-LM prints it, spelled out so the exact spacing is pinned down.
LITERAL_LINE = (
    " [2026-08-23 10:15:47.000001] iteration        3/      30 | consumed samples:           24 |"
    " elapsed time per iteration (ms): 2345.6 | throughput per GPU (TFLOP/s/GPU): 432.1 |"
    " learning rate: 1.500000E-04 | global batch size:     8 | lm loss: 1.176543E+01 |"
    " loss scale: 1.0 | grad norm: 4.321 | number of skipped iterations:   0 |"
    " number of nan iterations:   0 |"
)

TIMES = [9876.5, 5123.4, 2345.6, 2344.9, 2346.2, 2343.8]
LOSSES = [11.93, 11.91, 11.76543, 11.52, 11.31, 11.02]


def _log() -> str:
    lines = [
        "> PyTorch version ................ 2.11.0",
        "> Megatron-Core version .......... 0.20.0",
        "> compiling dataset index builder ...",
        ">>> done with dataset index builder. Compilation time: 4.321 seconds",
        "[before the start of training step] datetime: 2026-08-23 10:15:20",
    ]
    for i, (ms, loss) in enumerate(zip(TIMES, LOSSES, strict=True), start=1):
        lines.append(LITERAL_LINE if i == 3 else iteration_line(i, ms, loss))
        if i == 1:
            lines.append(
                "[Rank 0] (after 1 iterations) memory (MB) | allocated: 31234.56 | max allocated: 45678.90"
                " | reserved: 47000.00 | max reserved: 47000.00"
            )
    lines.append(
        f" validation loss at iteration 6 on validation set | lm loss value: {10.5:.6E} | lm loss PPL: {36315.5:.6E} | "
    )
    lines.append("[after training is done] datetime: 2026-08-23 10:16:40")
    return "\n".join(lines) + "\n"


def test_literal_line_matches_format() -> None:
    line = iteration_line(3, 2345.6, 11.76543, tflops=432.1, grad_norm=4.321, timestamp="2026-08-23 10:15:47.000001")
    assert line == LITERAL_LINE


def test_iteration_times_and_losses() -> None:
    log = _log()
    assert parse_iteration_times(log) == TIMES
    assert parse_losses(log) == pytest.approx(LOSSES, rel=1e-6)
    assert parse_throughputs(log) == [401.3, 401.3, 432.1, 401.3, 401.3, 401.3]


def test_records() -> None:
    records = parse_iteration_records(_log())
    assert [r.iteration for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2] == IterationRecord(
        iteration=3, train_iters=30, elapsed_ms=2345.6, tflops_per_gpu=432.1, lm_loss=11.76543
    )


def test_validation_and_memory_lines_are_ignored() -> None:
    log = (
        f" validation loss at iteration 10 on validation set | lm loss value: {7.25:.6E} |"
        f" lm loss PPL: {1408.1:.6E} | \n"
        "[Rank 0] (after 1 iterations) memory (MB) | allocated: 1.00 | max allocated: 2.00\n"
    )
    assert parse_iteration_records(log) == []
    assert parse_losses(log) == []


def test_missing_loss_skipped_samples_no_throughput_and_prefix() -> None:
    log = "\n".join(
        [
            iteration_line(7, 12345.6, None, train_iters=100, tflops=None),
            "[default0]:" + iteration_line(8, 2300.0, 9.5, train_iters=100, skipped_samples=16),
        ]
    )
    records = parse_iteration_records(log)
    assert records == [
        IterationRecord(iteration=7, train_iters=100, elapsed_ms=12345.6, tflops_per_gpu=None, lm_loss=None),
        IterationRecord(iteration=8, train_iters=100, elapsed_ms=2300.0, tflops_per_gpu=401.3, lm_loss=9.5),
    ]
    assert parse_losses(log) == [9.5]
    assert parse_iteration_times(log) == [12345.6, 2300.0]


def test_summarize_skips_warmup_by_iteration_number() -> None:
    summary = summarize(_log(), warmup=2)
    assert summary["timed_iterations"] == 4
    assert summary["median_ms"] == pytest.approx((2345.6 + 2344.9) / 2)
    assert summary["min_ms"] == 2343.8
    assert summary["max_ms"] == 2346.2
    assert summary["last_lm_loss"] == pytest.approx(11.02)
    with pytest.raises(ValueError, match="no Megatron-LM training iterations"):
        summarize(_log(), warmup=6)


def test_main(tmp_path: Path) -> None:
    path = tmp_path / "megatron.log"
    path.write_text(_log())
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([str(path), "--warmup", "2"]) == 0
    assert out.getvalue().startswith("median 2345.2 ms/iteration over 4 iterations")
    assert main([str(path), "--warmup", "99"]) == 1
