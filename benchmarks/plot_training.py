"""Plot loss and tokens/s/GPU over steps, ours against Megatron-LM's, into one PNG (for the results READMEs).

Runs on any machine with matplotlib (``pip install matplotlib``; the GPU machine has none: copy the logs over).
Each ``--ours`` / ``--megatron-lm`` is one run; give several of either, with ``--label`` per run in that order
(ours first):

    python -m benchmarks.plot_training --out loss_speed.png \\
        --ours OUT/ours_fp8.json --megatron-lm OUT/megatron_lm_fp8.log --title "Llama 3 8B, TP2 + SP, 2 x H200"

What each run can be:

* ours: a ``python -m benchmarks.throughput --out`` JSON (``losses``, ``step_times_s``), a Lightning CSV log
  (``metrics.csv``, or a directory holding ``version_*/metrics.csv``) or a TensorBoard log directory. From Lightning
  logs, tokens/s/GPU is ``throughput/tokens_per_sec_per_gpu`` (``ThroughputMonitor``, averaged over its window) where
  logged, else the module's per-step ``train/tokens_per_sec_per_gpu``; loss is ``train/loss``.
* Megatron-LM: its ``pretrain_gpt.py`` log (``benchmarks/lib/megatron_log.py`` reads it): ``lm loss`` and
  ``elapsed time per iteration`` per logged iteration, tokens/s/GPU = global batch x ``seq_length`` / time /
  ``world_size`` (the last two from the arguments Megatron-LM prints at start).

Steps are 1-based optimizer steps (Megatron-LM's iterations); Lightning's logged step numbers are one less.
``--skip N`` leaves the first N steps out of the speed panel (warm-up, compilation).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lib.megatron_log import parse_iteration_records

Series = dict[int, float]  # step -> value


@dataclass
class Run:
    label: str
    loss: Series = field(default_factory=dict)
    tokens_per_sec_per_gpu: Series = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- ours
def read_bench_json(path: Path) -> Run:
    """A ``benchmarks.throughput`` record: losses of steps 1.., step times of steps 2.. (step 1 has no start)."""
    record = json.loads(path.read_text())
    tokens_per_step = record["global_batch_size"] * record["seq_length"]
    speed = {step: tokens_per_step / t / record["gpus"] for step, t in enumerate(record["step_times_s"], start=2)}
    return Run(path.stem, dict(enumerate(record["losses"], start=1)), speed)


def read_lightning_csv(path: Path) -> Run:
    if path.is_dir():
        files = sorted(path.glob("**/metrics.csv"))
        if not files:
            raise FileNotFoundError(f"no metrics.csv under {path}")
        path = files[-1]
    columns: dict[str, Series] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key != "step" and value not in (None, "") and row.get("step") not in (None, ""):
                    columns.setdefault(key, {})[int(row["step"]) + 1] = float(value)
    return _lightning_run(path.parent.name, columns)


def read_tensorboard(path: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(path.glob("**/events.out.tfevents.*")) if path.is_dir() else [path]
    if not events:
        raise FileNotFoundError(f"no TensorBoard event file under {path}")
    accumulator = EventAccumulator(str(events[-1].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    columns = {
        tag: {event.step + 1: float(event.value) for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }
    return _lightning_run(events[-1].parent.name, columns)


def _lightning_run(label: str, columns: dict[str, Series]) -> Run:
    speed = columns.get("throughput/tokens_per_sec_per_gpu") or columns.get("train/tokens_per_sec_per_gpu") or {}
    return Run(label, columns.get("train/loss", {}), speed)


def read_ours(path: Path) -> Run:
    if path.suffix == ".json":
        return read_bench_json(path)
    if path.suffix == ".csv" or (path.is_dir() and any(path.glob("**/metrics.csv"))):
        return read_lightning_csv(path)
    return read_tensorboard(path)


# ---------------------------------------------------------------------------------------------- Megatron-LM
def _argument(log_text: str, name: str) -> int:
    """An integer from the argument list Megatron-LM prints at start (``  seq_length ....... 8192``)."""
    match = re.search(rf"^\s*{name} \.+ (\d+)\s*$", log_text, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"the Megatron-LM log does not list its {name} argument")
    return int(match.group(1))


_GLOBAL_BATCH = re.compile(r"\|\s*global batch size:\s*(\d+)\s*\|")


def read_megatron_lm(path: Path) -> Run:
    text = path.read_text(errors="replace")
    seq_length, world_size = _argument(text, "seq_length"), _argument(text, "world_size")
    run = Run(path.stem)
    for line in text.splitlines():
        records, batch = parse_iteration_records(line), _GLOBAL_BATCH.search(line)
        if not records:
            continue
        record = records[0]
        if record.lm_loss is not None:
            run.loss[record.iteration] = record.lm_loss
        if batch is not None:
            tokens = int(batch.group(1)) * seq_length
            run.tokens_per_sec_per_gpu[record.iteration] = tokens / (record.elapsed_ms / 1e3) / world_size
    if not run.loss and not run.tokens_per_sec_per_gpu:
        raise ValueError(f"{path}: no Megatron-LM training iteration lines")
    return run


# ---------------------------------------------------------------------------------------------- plot
def plot(runs: list[tuple[str, Run]], out: Path, title: str | None, skip: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit(
            "plot_training.py needs matplotlib, which is not installed here: `pip install matplotlib` (the logs it "
            "reads can be copied from the GPU machine, which has none)."
        ) from None
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for side, run in runs:
        style = {"linestyle": "-" if side == "ours" else "--", "marker": "." if len(run.loss) <= 60 else None}
        if run.loss:
            steps = sorted(run.loss)
            loss_axis.plot(steps, [run.loss[s] for s in steps], label=run.label, **style)
        speed = {s: v for s, v in run.tokens_per_sec_per_gpu.items() if s > skip}
        if speed:
            steps = sorted(speed)
            speed_axis.plot(steps, [speed[s] for s in steps], label=run.label, **style)
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    speed_axis.set(xlabel="step", ylabel="tokens/s per GPU", title=f"throughput (steps > {skip})")
    for axis in (loss_axis, speed_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=Path, action="append", default=[], help="bench JSON, metrics.csv or TB dir")
    parser.add_argument("--megatron-lm", type=Path, action="append", default=[], help="pretrain_gpt.py log")
    parser.add_argument("--label", action="append", default=[], help="one per run, ours first (default: file names)")
    parser.add_argument("--skip", type=int, default=2, help="steps left out of the speed panel (default: 2)")
    parser.add_argument("--title")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if not args.ours and not args.megatron_lm:
        parser.error("give at least one --ours or --megatron-lm run")
    runs = [("ours", read_ours(p)) for p in args.ours] + [("lm", read_megatron_lm(p)) for p in args.megatron_lm]
    if args.label:
        if len(args.label) != len(runs):
            parser.error(f"{len(args.label)} --label for {len(runs)} runs")
        for (_, run), label in zip(runs, args.label, strict=True):
            run.label = label
    plot(runs, args.out, args.title, args.skip)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
