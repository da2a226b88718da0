"""Ours vs Megatron-LM's ``pretrain_gpt.py``, same config, same GPU(s), one run.

For each precision it runs ``benchmarks.throughput`` (this package) and ``scripts/megatron_lm_baseline.sh``
(Megatron-LM from the ignored ``.baseline/megatron-lm``), alternating so drift on the machine hits both,
takes the median iteration time after a warm-up from each, and prints tokens/s/GPU and the ratio.

    python -m benchmarks.compare_megatron_lm --out-dir $OUT --precisions fp8 bf16 --layers 4 --gbs 8

Writes ``compare.json`` plus each run's log into ``--out-dir``.

With ``--recompute none selective full`` it compares activation recompute instead (first precision only): each
row runs both sides with the same setting (Megatron-LM's ``--recompute-granularity/--recompute-method/
--recompute-num-layers/--recompute-modules``) and ``recompute.json`` gets seconds per step and peak allocated
memory of both, plus ``llama-fp8 plan``'s prediction:

    python -m benchmarks.compare_megatron_lm --out-dir $OUT --precisions fp8 --recompute none selective full

``--data-path PREFIX`` trains both sides on a corpus instead of mock data (the same samples: same seed and split);
``--document-masking`` masks documents on both sides (Megatron-LM's ``--dataloader-inter-document-masking``). With
``--masking-rows`` it measures document masking instead: per precision, Megatron-LM masked, ours masked and ours
unmasked, one after the other, into ``document_masking_speed.json`` (seconds per step, peak memory, losses):

    python -m benchmarks.compare_megatron_lm --out-dir $OUT --precisions fp8 bf16 --data-path /tmp/real_text \
        --masking-rows --steps 14 --warmup 6

``--fp8-recipe current`` runs the FP8 rows with current (per-tensor) scaling on both sides (ours ``--recipe current``,
Megatron-LM ``--fp8-recipe tensorwise``) instead of the recipe's delayed scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

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

HERE = Path(__file__).resolve().parent

# FP8 recipe -> (our benchmarks.throughput flags, Megatron-LM pretrain_gpt.py flags), for the FP8 rows.
FP8_RECIPE_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "delayed": ([], []),  # both sides' default: the recipe's delayed scaling
    "current": (["--recipe", "current"], ["--fp8-recipe", "tensorwise"]),
}

# Recompute rows: (our benchmarks.throughput flags, Megatron-LM pretrain_gpt.py flags), the same setting on each side.
RECOMPUTE_ROWS: dict[str, tuple[list[str], list[str]]] = {
    "none": ([], []),
    # Megatron's default selective modules (core_attn), i.e. Megatron-LM's --recompute-activations.
    "selective": (["--recompute", "selective"], ["--recompute-granularity", "selective"]),
    "selective-mlp": (
        ["--recompute", "selective", "--recompute-modules", "core_attn", "mlp"],
        ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    ),
    "full": (
        ["--recompute", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ),
}


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    code, wall = run_logged(cmd, env, log)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); log tail:\n{log_tail(log, 40)}")
    return wall


def _data_flags(args: argparse.Namespace, document_masking: bool | None) -> tuple[str | None, bool]:
    """The corpus (None: mock data) and whether documents are masked: ``document_masking`` if given, else the run's."""
    masking = getattr(args, "document_masking", False) if document_masking is None else document_masking
    return getattr(args, "data_path", None), masking


def ours(
    args: argparse.Namespace,
    precision: str,
    out_dir: Path,
    tag: str = "",
    extra: Sequence[str] = (),
    document_masking: bool | None = None,
) -> dict:
    result_file = out_dir / f"ours_{precision}{tag}.json"
    data_path, masking = _data_flags(args, document_masking)
    data = [*(["--data-path", data_path] if data_path else []), *(["--document-masking"] if masking else [])]
    module = [
        "-m",
        "benchmarks.throughput",
        "--precision",
        precision,
        "--layers",
        str(args.layers),
        "--gbs",
        str(args.gbs),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--tp",
        str(args.tp),
        "--cp",
        str(args.cp),
        "--out",
        str(result_file),
        *data,
        *extra,
    ]
    cmd = [*torchrun(args.nproc), *module] if args.nproc > 1 else [sys.executable, *module]
    wall = run(cmd, dict(os.environ), out_dir / f"ours_{precision}{tag}.log")
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    return result


def megatron_lm(
    args: argparse.Namespace,
    precision: str,
    out_dir: Path,
    tag: str = "",
    extra: Sequence[str] = (),
    document_masking: bool | None = None,
) -> dict:
    log = out_dir / f"megatron_lm_{precision}{tag}.log"
    data_path, masking = _data_flags(args, document_masking)
    settings = megatron_lm_baseline_env(
        precision=precision,
        nproc=args.nproc,
        layers=args.layers,
        gbs=args.gbs,
        iters=args.steps,
        tp=args.tp,
        cp=args.cp,
        data_path=data_path,
        document_masking=masking,
    )
    wall = run(["bash", str(MEGATRON_LM_BASELINE), *extra], {**os.environ, **settings}, log)
    text = log.read_text()
    times = [t / 1000.0 for t in parse_iteration_times(text)]
    timed = times[args.warmup :]
    median = statistics.median(timed)
    return {
        "impl": "megatron-lm pretrain_gpt.py",
        "commit": (HERE.parent / ".baseline" / "COMMIT").read_text().strip()
        if (HERE.parent / ".baseline" / "COMMIT").exists()
        else "unknown",
        "precision": precision,
        "timed_steps": len(timed),
        "median_step_time_s": median,
        "step_times_s": times,
        "tokens_per_sec_per_gpu": args.gbs * 8192 / median / args.nproc,
        "losses": parse_losses(text),
        "peak_memory_gib": peak_allocated_gib(text),
        "wall_s": wall,
    }


def peak_allocated_gib(log_text: str) -> float | None:
    """Largest ``max allocated`` of Megatron-LM's memory reports, which it prints in MiB (``/ 1024 / 1024``)."""
    peaks = max_allocated(log_text)
    return max(peaks) / 1024 if peaks else None


def run_config(args: argparse.Namespace) -> dict:
    """The run's shape and step counts, as both ``compare.json`` and ``recompute.json`` record them."""
    return {
        "layers": args.layers,
        "seq_length": 8192,
        "micro_batch_size": 1,
        "global_batch_size": args.gbs,
        "tp": args.tp,
        "cp": args.cp,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "fp8_recipe": getattr(args, "fp8_recipe", "delayed"),
    }


def compare_recompute(args: argparse.Namespace) -> None:
    """One row per recompute setting: both sides with the same flags, same precision, one after the other."""
    precision = args.precisions[0]
    # The memory report at the last iteration carries the whole run's max allocated.
    lm_memory = ["--log-memory-interval", str(args.steps)]
    rows = []
    for name in args.recompute:
        our_flags, lm_flags = RECOMPUTE_ROWS[name]
        tag = f"_recompute_{name}"
        theirs = megatron_lm(args, precision, args.out_dir, tag, [*lm_flags, *lm_memory])
        mine = ours(args, precision, args.out_dir, tag, our_flags)
        row = {
            "granularity": name,
            "ours_flags": our_flags,
            "megatron_lm_flags": lm_flags,
            "ours_s_per_step": mine["median_step_time_s"],
            "megatron_lm_s_per_step": theirs["median_step_time_s"],
            "ours_peak_gib": mine["peak_memory_gib"],
            "megatron_lm_peak_gib": theirs["peak_memory_gib"],
            "plan_gib": mine["plan_gib"],
            "ours_tokens_per_s": mine["tokens_per_sec_per_gpu"],
            "megatron_lm_tokens_per_s": theirs["tokens_per_sec_per_gpu"],
            "ratio": mine["tokens_per_sec_per_gpu"] / theirs["tokens_per_sec_per_gpu"],
            "ours_losses": mine["losses"],
            "megatron_lm_losses": theirs["losses"],
        }
        rows.append(row)
        print(
            f"{name}: ours {row['ours_s_per_step']:.3f} s/step {row['ours_peak_gib']:.2f} GiB (plan "
            f"{row['plan_gib']:.2f}), Megatron-LM {row['megatron_lm_s_per_step']:.3f} s/step "
            f"{row['megatron_lm_peak_gib'] or float('nan'):.2f} GiB",
            flush=True,
        )
    # Recompute must not change the numbers: each row's losses against the row without recompute (same seed, data).
    baseline = next((row for row in rows if row["granularity"] == "none"), None)
    for row in rows if baseline else []:
        for side in ("ours", "megatron_lm"):
            pairs = zip(row[f"{side}_losses"], baseline[f"{side}_losses"], strict=False)
            row[f"{side}_max_loss_diff_vs_none"] = max((abs(a - b) for a, b in pairs), default=None)
    summary = {
        "card": torch.cuda.get_device_name(),
        "config": {"precision": precision, **run_config(args), "megatron_lm_commit": theirs["commit"]},
        "rows": rows,
    }
    (args.out_dir / "recompute.json").write_text(json.dumps(summary, indent=2))
    print("\n| recompute | ours s/step | Megatron-LM s/step | ours peak GiB | Megatron-LM peak GiB | plan GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['granularity']} | {row['ours_s_per_step']:.3f} | {row['megatron_lm_s_per_step']:.3f} | "
            f"{row['ours_peak_gib']:.2f} | {row['megatron_lm_peak_gib'] or float('nan'):.2f} | {row['plan_gib']:.2f} |"
        )


def compare_document_masking(args: argparse.Namespace) -> None:
    """Per precision: Megatron-LM with document masking, ours with it, ours without, one after the other (so drift on
    the machine hits all three); ``document_masking_speed.json`` has one row per (precision, masking)."""
    lm_memory = ["--log-memory-interval", str(args.steps)]  # the report at the last iteration has the run's peak
    rows = []
    for precision in args.precisions:
        theirs = megatron_lm(args, precision, args.out_dir, "_masked", lm_memory, document_masking=True)
        masked = ours(args, precision, args.out_dir, "_masked", document_masking=True)
        unmasked = ours(args, precision, args.out_dir, "_unmasked", document_masking=False)
        for mine, lm in ((masked, theirs), (unmasked, None)):
            row = {
                "precision": precision,
                "masking": mine is masked,
                "ours_s_per_step": mine["median_step_time_s"],
                "megatron_lm_s_per_step": lm["median_step_time_s"] if lm else None,
                "ours_over_megatron_lm": lm["median_step_time_s"] / mine["median_step_time_s"] if lm else None,
                "ours_tokens_per_s_per_gpu": mine["tokens_per_sec_per_gpu"],
                "megatron_lm_tokens_per_s_per_gpu": lm["tokens_per_sec_per_gpu"] if lm else None,
                "ours_peak_gib": mine["peak_memory_gib"],
                "megatron_lm_peak_gib": lm["peak_memory_gib"] if lm else None,
                "plan_gib": mine["plan_gib"],
                "ours_losses": mine["losses"],
                "megatron_lm_losses": lm["losses"] if lm else None,
            }
            rows.append(row)
        masked_row, unmasked_row = rows[-2], rows[-1]
        masked_row["masked_s_over_unmasked_s"] = masked_row["ours_s_per_step"] / unmasked_row["ours_s_per_step"]
        print(
            f"{precision}: ours masked {masked_row['ours_s_per_step']:.3f} s/step, unmasked "
            f"{unmasked_row['ours_s_per_step']:.3f} (x{masked_row['masked_s_over_unmasked_s']:.3f}); Megatron-LM "
            f"masked {masked_row['megatron_lm_s_per_step']:.3f} (ours x{masked_row['ours_over_megatron_lm']:.3f} "
            "as fast)",
            flush=True,
        )
    summary = {
        "card": torch.cuda.get_device_name(),
        "config": {
            **run_config(args),
            "data": args.data_path or "mock",
            "megatron_lm_commit": theirs["commit"],
            "megatron_lm_flags": "the recipe's (scripts/megatron_lm_baseline.sh) + --dataloader-inter-document-masking",
        },
        "rows": rows,
    }
    (args.out_dir / "document_masking_speed.json").write_text(json.dumps(summary, indent=2))
    print("\n| precision | masking | ours s/step | Megatron-LM s/step | ours peak GiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        lm_s = "-" if row["megatron_lm_s_per_step"] is None else f"{row['megatron_lm_s_per_step']:.3f}"
        print(
            f"| {row['precision']} | {'on' if row['masking'] else 'off'} | {row['ours_s_per_step']:.3f} | {lm_s} | "
            f"{row['ours_peak_gib']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp8", "bf16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--recompute", nargs="+", choices=tuple(RECOMPUTE_ROWS), help="compare recompute settings")
    parser.add_argument("--data-path", help="both sides train on this corpus prefix instead of mock data")
    parser.add_argument("--document-masking", action="store_true", help="both sides mask documents")
    parser.add_argument(
        "--fp8-recipe", choices=tuple(FP8_RECIPE_FLAGS), default="delayed", help="FP8 rows: scaling on both sides"
    )
    parser.add_argument(
        "--masking-rows", action="store_true", help="measure document masking (document_masking_speed.json)"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.recompute:
        compare_recompute(args)
        return
    if args.masking_rows:
        compare_document_masking(args)
        return

    rows = []
    for precision in args.precisions:
        our_flags, lm_flags = FP8_RECIPE_FLAGS[args.fp8_recipe] if precision == "fp8" else ([], [])
        tag = "" if args.fp8_recipe == "delayed" or precision != "fp8" else f"_{args.fp8_recipe}"
        theirs = megatron_lm(args, precision, args.out_dir, tag, lm_flags)
        mine = ours(args, precision, args.out_dir, tag, our_flags)
        ratio = mine["tokens_per_sec_per_gpu"] / theirs["tokens_per_sec_per_gpu"]
        # Same model and tokens, so the same FLOPs per token: both FLOP conventions (see flops_per_token) for LM too.
        for key in ("tflops_per_gpu", "tflops_per_gpu_causal"):
            if key in mine:
                theirs[key] = mine[key] / ratio
        rows.append({"precision": precision, "ours": mine, "megatron_lm": theirs, "ratio": ratio})
        print(
            f"{precision} losses (first, last): ours {mine['losses'][0]:.4f} {mine['losses'][-1]:.4f}, "
            f"Megatron-LM {theirs['losses'][0]:.4f} {theirs['losses'][-1]:.4f}",
            flush=True,
        )
        print(
            f"{precision}: ours {mine['tokens_per_sec_per_gpu']:.0f} tok/s/GPU, Megatron-LM "
            f"{theirs['tokens_per_sec_per_gpu']:.0f} tok/s/GPU, ratio {ratio:.3f}",
            flush=True,
        )

    summary = {
        "device": torch.cuda.get_device_name(),
        "gpus": args.nproc,
        "config": run_config(args),
        "results": rows,
    }
    (args.out_dir / "compare.json").write_text(json.dumps(summary, indent=2))
    print("\n| precision | ours tok/s/GPU | Megatron-LM tok/s/GPU | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['precision']} | {row['ours']['tokens_per_sec_per_gpu']:.0f} | "
            f"{row['megatron_lm']['tokens_per_sec_per_gpu']:.0f} | {row['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
