"""Issue 5: the reference table's run, ours from the shipped YAML and Megatron-LM with the recipe's flags.

Full Llama 3 8B, seq 8192, MBS 1, GBS 128, FP8 delayed scaling, FP8 param gather, distributed optimizer with
overlapped grad reduce and param gather, mock data. Ours is ``examples/configs/llama3_8b_h100_fp8.yaml``
unchanged except for the number of steps (and the layout's CP size and GPU count when asked), run through the
``llama-fp8`` CLI under torchrun, with a CSV logger added so the numbers can be read back. One side per call, so
each fits a 10-minute device call; run the two sides back to back on the same machine, then ``compare``:

    python3 -m benchmarks.reference_run ours --out-dir OUT/ours_cp2 --gpus 8 --cp 2 --steps 30
    python3 -m benchmarks.reference_run megatron-lm --out-dir OUT/lm_cp2 --gpus 8 --cp 2 --steps 30
    python3 -m benchmarks.reference_run compare OUT/ours_cp2 OUT/lm_cp2 --warmup 10 --out OUT/compare_cp2.json

``--cp 1`` is the layout Megatron-LM's shipped script uses (DP8 on 8 GPUs). Step times are medians after
``--warmup`` steps; TFLOP/s/GPU is given in both FLOP counts of ``LlamaConfig.flops_per_token``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.lib.launch import (
    MEGATRON_LM_BASELINE,
    log_tail,
    max_allocated,
    megatron_lm_baseline_env,
    run_logged,
    torchrun,
)
from benchmarks.lib.megatron_log import parse_iteration_times, parse_losses

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "llama3_8b_h100_fp8.yaml"
GLOBAL_BATCH, SEQ = 128, 8192


def ours_command(gpus: int, cp: int, steps: int, out_dir: Path) -> list[str]:
    """torchrun + the CLI on the shipped YAML; only steps, layout size, logger and evaluation differ from it."""
    return [
        *torchrun(gpus),
        "-m",
        "lightning_llama_fp8.cli.fit",
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps",
        str(steps),
        "--trainer.devices",
        str(gpus),
        "--trainer.strategy.init_args.context_parallel_size",
        str(cp),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(out_dir),
        "--trainer.logger.init_args.name",
        "ours",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",  # no evaluation in a 30-step run, as Megatron-LM's side (--eval-iters 0)
        "0",
    ]


def megatron_lm_env(gpus: int, cp: int, steps: int) -> dict[str, str]:
    """``megatron_lm_baseline.sh`` settings for the full model and the recipe's global batch."""
    return megatron_lm_baseline_env(precision="fp8", nproc=gpus, layers=32, gbs=GLOBAL_BATCH, iters=steps, tp=1, cp=cp)


def read_ours(out_dir: Path) -> dict[str, list[float]]:
    """Per-step series from the CSV logger's ``metrics.csv`` (rank zero's values; loss is the global one)."""
    files = sorted(out_dir.glob("ours/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no ours/version_*/metrics.csv under {out_dir}: did the 'ours' run finish?")
    series: dict[str, list[float]] = {}
    with files[-1].open() as fh:
        for row in csv.DictReader(fh):
            for key in ("train/loss", "train/step_time_s", "train/peak_memory_gib"):
                if row.get(key):
                    series.setdefault(key, []).append(float(row[key]))
    return series


def summarize(step_times: list[float], warmup: int, flops_per_token: float, causal_flops: float) -> dict[str, Any]:
    timed = step_times[warmup:]
    if not timed:
        raise ValueError(f"only {len(step_times)} timed steps, fewer than --warmup {warmup}")
    median = statistics.median(timed)
    tokens_per_sec = GLOBAL_BATCH * SEQ / median  # all GPUs together
    return {
        "timed_steps": len(timed),
        "median_step_time_s": median,
        "tokens_per_sec": tokens_per_sec,
        "tflops_total": flops_per_token * tokens_per_sec / 1e12,
        "tflops_total_causal": causal_flops * tokens_per_sec / 1e12,
    }


def compare(ours_dir: Path, lm_dir: Path, warmup: int) -> dict[str, Any]:
    from lightning_llama_fp8 import get_preset

    arch = get_preset("llama3_8b")
    meta = json.loads((ours_dir / "run.json").read_text())
    gpus = meta["gpus"]
    flops, causal = arch.flops_per_token(), arch.flops_per_token(causal=True)
    series = read_ours(ours_dir)
    # Step times start at the second step (the first has no previous step end); LM's line 2 averages 1 and 2.
    ours = summarize(series["train/step_time_s"], max(warmup - 1, 0), flops, causal)
    lm_log = (lm_dir / "megatron_lm.log").read_text()
    lm = summarize([t / 1000 for t in parse_iteration_times(lm_log)], warmup, flops, causal)
    rows: dict[str, Any] = {}
    for name, result in (("ours", ours), ("megatron_lm", lm)):
        rows[name] = {
            **result,
            "tokens_per_sec_per_gpu": result["tokens_per_sec"] / gpus,
            "tflops_per_gpu": result["tflops_total"] / gpus,
            "tflops_per_gpu_causal": result["tflops_total_causal"] / gpus,
        }
    rows["ours"]["losses"] = series.get("train/loss", [])
    rows["ours"]["peak_memory_gib"] = max(series.get("train/peak_memory_gib", [0.0]))
    rows["megatron_lm"]["losses"] = parse_losses(lm_log)
    rows["megatron_lm"]["peak_memory_gib"] = _lm_peak_memory_gib(lm_log)
    return {
        "gpus": gpus,
        "layout": {"tp": 1, "cp": meta["cp"], "dp": gpus // meta["cp"]},
        "global_batch_size": GLOBAL_BATCH,
        "seq_length": SEQ,
        "device": meta.get("device"),
        "warmup_steps_excluded": warmup,
        "ours": rows["ours"],
        "megatron_lm": rows["megatron_lm"],
        "ratio": rows["ours"]["tokens_per_sec_per_gpu"] / rows["megatron_lm"]["tokens_per_sec_per_gpu"],
        "reference_tokens_per_sec_per_gpu_h100": 13812,
    }


def _lm_peak_memory_gib(log_text: str) -> float | None:
    """Largest ``max allocated`` of Megatron-LM's per-rank memory reports, in GiB (Megatron-LM prints MiB: its
    ``report_memory`` divides by 1024 * 1024)."""
    peaks = max_allocated(log_text)
    return max(peaks) / 1024 if peaks else None


def run_side(side: str, args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    meta = {"side": side, "gpus": args.gpus, "cp": args.cp, "steps": args.steps, "device": device}
    (args.out_dir / "run.json").write_text(json.dumps(meta, indent=2))
    if side == "ours":
        cmd, env, log = ours_command(args.gpus, args.cp, args.steps, args.out_dir), dict(os.environ), "ours.log"
    else:
        cmd = [
            "bash",
            str(MEGATRON_LM_BASELINE),
            "--lr-warmup-iters",
            "30518",
            "--lr-decay-iters",
            "15228271",
        ]  # the YAML's schedule (recipe samples / 128), so both sides train alike
        env, log = {**os.environ, **megatron_lm_env(args.gpus, args.cp, args.steps)}, "megatron_lm.log"
    print(" ".join(cmd), flush=True)
    code, _ = run_logged(cmd, env, args.out_dir / log)
    if code:
        raise SystemExit(f"{side} run failed with exit code {code}; log tail:\n{log_tail(args.out_dir / log, 30)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for side in ("ours", "megatron-lm"):
        p = sub.add_parser(side)
        p.add_argument("--out-dir", type=Path, required=True)
        p.add_argument("--gpus", type=int, default=8)
        p.add_argument("--cp", type=int, default=2, choices=(1, 2))
        p.add_argument("--steps", type=int, default=30)
    p = sub.add_parser("compare")
    p.add_argument("ours_dir", type=Path)
    p.add_argument("lm_dir", type=Path)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "compare":
        result = compare(args.ours_dir, args.lm_dir, args.warmup)
        text = json.dumps(result, indent=2)
        if args.out:
            args.out.write_text(text)
        summary = {k: result[k] for k in ("gpus", "layout", "ratio")}
        for side in ("ours", "megatron_lm"):
            r = result[side]
            summary[side] = {k: r[k] for k in ("tokens_per_sec_per_gpu", "tflops_per_gpu", "peak_memory_gib")}
        print(json.dumps(summary, indent=2))
    else:
        run_side(args.command, args)


if __name__ == "__main__":
    main()
