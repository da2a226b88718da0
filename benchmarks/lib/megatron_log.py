"""Parse Megatron-LM ``pretrain_gpt.py`` training logs (the baseline run by ``scripts/megatron_lm_baseline.sh``).

Megatron-LM's ``training_log`` prints one line per logged iteration (from the last rank only), with
``|``-separated fields, for example::

     [2026-01-01 12:00:00.000000] iteration        5/      30 | consumed samples:           40 |
     elapsed time per iteration (ms): 2345.6 | throughput per GPU (TFLOP/s/GPU): 432.1 |
     learning rate: 1.500000E-04 | global batch size:     8 | lm loss: 1.176543E+01 |
     loss scale: 1.0 | grad norm: 3.210 | number of skipped iterations:   0 |
     number of nan iterations:   0 |

(all on one line). Only lines of this shape are read; validation lines (``lm loss value: ...``), memory
reports and everything else are ignored. Caveats of the source format:

* Each value is an average over the iterations since the previous logged line. The very first
  iteration is always logged but does not restart that window, so with ``--log-interval 1`` the line
  for iteration 2 averages iterations 1 and 2; drop at least two iterations as warm-up.
* Times are printed with one decimal (``{:.1f}`` ms) and losses as ``{:.6E}``.
* ``lm loss`` is left out of a line when its average is negative or NaN.

Command line::

    python3 -m benchmarks.lib.megatron_log megatron.log --warmup 10
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IterationRecord",
    "parse_iteration_records",
    "parse_iteration_times",
    "parse_losses",
    "parse_throughputs",
    "summarize",
]

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
_ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|")
_ELAPSED_MS = re.compile(rf"\|\s*elapsed time per iteration \(ms\):\s*({_FLOAT})\s*\|")
_THROUGHPUT = re.compile(rf"\|\s*throughput per GPU \(TFLOP/s/GPU\):\s*({_FLOAT})\s*\|")
_LM_LOSS = re.compile(rf"\|\s*lm loss:\s*({_FLOAT})\s*\|")


@dataclass(frozen=True)
class IterationRecord:
    """One Megatron-LM training log line.

    Attributes:
        iteration: 1-based iteration number the line was printed at.
        train_iters: Total number of training iterations of the run.
        elapsed_ms: ``elapsed time per iteration (ms)``.
        tflops_per_gpu: ``throughput per GPU (TFLOP/s/GPU)`` (only with ``--log-throughput``).
        lm_loss: ``lm loss`` (absent when skipped or NaN).
    """

    iteration: int
    train_iters: int
    elapsed_ms: float
    tflops_per_gpu: float | None
    lm_loss: float | None


def _optional_float(pattern: re.Pattern[str], line: str) -> float | None:
    match = pattern.search(line)
    return float(match.group(1)) if match else None


def parse_iteration_records(log_text: str) -> list[IterationRecord]:
    """Return every training-iteration log line of ``log_text`` in order of appearance.

    A line counts when it has both ``iteration N/M |`` and ``elapsed time per iteration (ms): X |``;
    prefixes added by launchers (such as ``[default0]:``) are tolerated.
    """
    records: list[IterationRecord] = []
    for line in log_text.splitlines():
        iteration = _ITERATION.search(line)
        elapsed = _ELAPSED_MS.search(line)
        if iteration is None or elapsed is None:
            continue
        records.append(
            IterationRecord(
                iteration=int(iteration.group(1)),
                train_iters=int(iteration.group(2)),
                elapsed_ms=float(elapsed.group(1)),
                tflops_per_gpu=_optional_float(_THROUGHPUT, line),
                lm_loss=_optional_float(_LM_LOSS, line),
            )
        )
    return records


def parse_iteration_times(log_text: str) -> list[float]:
    """Return the ``elapsed time per iteration (ms)`` values of all training log lines, in order."""
    return [record.elapsed_ms for record in parse_iteration_records(log_text)]


def parse_losses(log_text: str) -> list[float]:
    """Return the ``lm loss`` values of the training log lines that have one, in order."""
    return [record.lm_loss for record in parse_iteration_records(log_text) if record.lm_loss is not None]


def parse_throughputs(log_text: str) -> list[float]:
    """Return the ``throughput per GPU (TFLOP/s/GPU)`` values of the training log lines, in order."""
    return [record.tflops_per_gpu for record in parse_iteration_records(log_text) if record.tflops_per_gpu is not None]


def summarize(log_text: str, warmup: int) -> dict[str, float | int | None]:
    """Summarize the iterations numbered above ``warmup``.

    Returns a dict with ``timed_iterations``, ``median_ms``, ``mean_ms``, ``min_ms``, ``max_ms``,
    ``median_tflops_per_gpu`` and ``last_lm_loss`` (``None`` where unavailable).

    Raises:
        ValueError: if no training iteration above ``warmup`` is in the log.
    """
    records = [record for record in parse_iteration_records(log_text) if record.iteration > warmup]
    if not records:
        raise ValueError(f"no Megatron-LM training iterations after the first {warmup} in the log")
    times = [record.elapsed_ms for record in records]
    tflops = [record.tflops_per_gpu for record in records if record.tflops_per_gpu is not None]
    losses = [record.lm_loss for record in records if record.lm_loss is not None]
    return {
        "timed_iterations": len(times),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "median_tflops_per_gpu": statistics.median(tflops) if tflops else None,
        "last_lm_loss": losses[-1] if losses else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the median ms/iteration of a Megatron-LM log after ``--warmup`` iterations."""
    parser = argparse.ArgumentParser(description="Median iteration time of a Megatron-LM training log.")
    parser.add_argument("log", help="log file written by megatron_lm_baseline.sh, or '-' for stdin")
    parser.add_argument("--warmup", type=int, default=10, help="ignore iterations numbered up to this (default: 10)")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.log == "-" else Path(args.log).read_text(errors="replace")
    try:
        summary = summarize(text, args.warmup)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tflops = summary["median_tflops_per_gpu"]
    loss = summary["last_lm_loss"]
    print(
        f"median {summary['median_ms']:.1f} ms/iteration over {summary['timed_iterations']} iterations "
        f"(warm-up {args.warmup}; mean {summary['mean_ms']:.1f}, min {summary['min_ms']:.1f}, "
        f"max {summary['max_ms']:.1f})"
        + (f"; median {tflops:.1f} TFLOP/s/GPU" if tflops is not None else "")
        + (f"; last lm loss {loss:.4f}" if loss is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
