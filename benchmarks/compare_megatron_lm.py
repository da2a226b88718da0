"""Ours vs Megatron-LM's ``pretrain_gpt.py``, same config, same GPU(s), one run.

For each precision it runs ``bench_throughput.py`` (this package) and ``megatron_lm_baseline.sh``
(Megatron-LM from the ignored ``.baseline/megatron-lm``), alternating so drift on the machine hits both,
takes the median iteration time after a warm-up from each, and prints tokens/s/GPU and the ratio.

    python benchmarks/compare_megatron_lm.py --out-dir $OUT --precisions fp8 bf16 --layers 4 --gbs 8

Writes ``compare.json`` plus each run's log into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parse_megatron_log import parse_iteration_times, parse_losses

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log tail:\n{tail}")
    return time.time() - start


def ours(args: argparse.Namespace, precision: str, out_dir: Path) -> dict:
    result_file = out_dir / f"ours_{precision}.json"
    cmd = [
        sys.executable,
        str(HERE / "bench_throughput.py"),
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
    ]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), *cmd[1:]]
    wall = run(cmd, dict(os.environ), out_dir / f"ours_{precision}.log")
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    return result


def megatron_lm(args: argparse.Namespace, precision: str, out_dir: Path) -> dict:
    log = out_dir / f"megatron_lm_{precision}.log"
    env = dict(
        os.environ,
        PRECISION=precision,
        NPROC=str(args.nproc),
        NUM_LAYERS=str(args.layers),
        GBS=str(args.gbs),
        ITERS=str(args.steps),
        TP=str(args.tp),
        CP=str(args.cp),
    )
    wall = run(["bash", str(HERE / "megatron_lm_baseline.sh")], env, log)
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
        "wall_s": wall,
    }


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
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for precision in args.precisions:
        theirs = megatron_lm(args, precision, args.out_dir)
        mine = ours(args, precision, args.out_dir)
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
        "config": {
            "layers": args.layers,
            "seq_length": 8192,
            "micro_batch_size": 1,
            "global_batch_size": args.gbs,
            "tp": args.tp,
            "cp": args.cp,
            "steps": args.steps,
            "warmup_steps_excluded": args.warmup,
        },
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
