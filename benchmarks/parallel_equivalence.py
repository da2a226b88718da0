"""Every parallel layout trains like one GPU: same seed, same data, per-step losses and grad norms compared.

Runs ``bench_throughput.py --arch small`` once on one GPU and once per layout (through ``torch.distributed.run``),
then checks, as issue 3 asks:
  * BF16: each of the first ``--steps`` losses within 1% of the one-GPU run, grad norm after step 1 within 1%;
  * FP8: no NaN/Inf over the run, and each loss within 3% of the same layout's BF16 loss (``--fp8``).

    python benchmarks/parallel_equivalence.py --out-dir $OUT/layouts --gpus 4 --fp8

Writes ``equivalence.json`` and one JSON/log per run into ``--out-dir``; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    cp: int = 1
    dp: int = 1
    cp_comm_type: str = "p2p"

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp


LAYOUTS = [
    Layout("tp2", tp=2),
    Layout("cp2-p2p", cp=2),
    Layout("cp2-a2a", cp=2, cp_comm_type="a2a"),
    Layout("cp2-all_gather", cp=2, cp_comm_type="all_gather"),
    Layout("dp2", dp=2),
    Layout("tp2xcp2", tp=2, cp=2),
    Layout("cp2xdp2", cp=2, dp=2),
]


def train(layout: Layout, precision: str, args: argparse.Namespace) -> dict:
    out = args.out_dir / f"{layout.name}_{precision}.json"
    cmd = [
        str(HERE / "bench_throughput.py"), "--arch", "small", "--layers", str(args.layers), "--seq", str(args.seq),
        "--gbs", str(args.gbs), "--mbs", "1", "--steps", str(args.steps), "--warmup", "2",
        "--precision", precision, "--tp", str(layout.tp), "--cp", str(layout.cp),
        "--cp-comm-type", layout.cp_comm_type, "--out", str(out),
    ]  # fmt: skip
    if layout.gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(layout.gpus)]
        cmd = [*launcher, "--master_port", str(29600 + hash(layout.name) % 300), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    log = args.out_dir / f"{layout.name}_{precision}.log"
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not out.exists():
        return {"error": f"exit {code}; see {log.name}"}
    return json.loads(out.read_text())


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=4, help="largest layout to run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fp8-steps", type=int, default=50)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--fp8", action="store_true", help="also run each layout in FP8 and compare with BF16")
    parser.add_argument("--only", nargs="*", help="layout names to run (default: all that fit --gpus)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    layouts = [lay for lay in LAYOUTS if lay.gpus <= args.gpus and (not args.only or lay.name in args.only)]
    reference = train(Layout("1gpu"), "bf16", args)
    rows, ok = [], "error" not in reference
    for layout in layouts:
        bf16 = train(layout, "bf16", args)
        row: dict = {"layout": layout.name, "gpus": layout.gpus}
        if "error" in bf16 or "error" in reference:
            row["error"] = bf16.get("error") or reference.get("error")
        else:
            row["bf16_max_loss_rel_diff"] = max_rel_diff(bf16["losses"], reference["losses"])
            row["bf16_grad_norm_step1_rel_diff"] = abs(bf16["grad_norms"][0] / reference["grad_norms"][0] - 1)
            row["bf16_ok"] = row["bf16_max_loss_rel_diff"] < 0.01 and row["bf16_grad_norm_step1_rel_diff"] < 0.01
            row["tokens_per_sec_per_gpu_bf16"] = bf16["tokens_per_sec_per_gpu"]
        if args.fp8 and "error" not in bf16:
            fp8_args = argparse.Namespace(**{**vars(args), "steps": args.fp8_steps})
            fp8 = train(layout, "fp8", fp8_args)
            bf16_long = train(layout, "bf16", fp8_args) if args.fp8_steps != args.steps else bf16
            if "error" in fp8 or "error" in bf16_long:
                row["fp8_error"] = fp8.get("error") or bf16_long.get("error")
            else:
                row["fp8_finite"] = all(math.isfinite(x) for x in fp8["losses"])
                row["fp8_vs_bf16_max_rel_diff"] = max_rel_diff(fp8["losses"], bf16_long["losses"])
                row["fp8_ok"] = row["fp8_finite"] and row["fp8_vs_bf16_max_rel_diff"] < 0.03
        ok = ok and row.get("bf16_ok", False) and (not args.fp8 or row.get("fp8_ok", False))
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {"reference": {k: reference.get(k) for k in ("device", "losses", "grad_norms", "error")}, "rows": rows}
    (args.out_dir / "equivalence.json").write_text(json.dumps(summary, indent=2))
    print("all layouts match one GPU" if ok else "SOME LAYOUTS DO NOT MATCH (see equivalence.json)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
