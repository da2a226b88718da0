"""Every parallel layout trains like one GPU: same seed, same data, per-step losses and grad norms compared.

Runs ``benchmarks.throughput --arch small`` once on one GPU and once per layout (through ``torch.distributed.run``),
then checks, as issue 3 asks:
  * BF16: each of the first ``--compared-steps`` (20) losses within 1% of the one-GPU run, grad norm after
    step 1 within 1%;
  * FP8: no NaN/Inf over the ``--steps`` (50) steps, and each loss within 3% of the same layout's BF16 loss.

    python -m benchmarks.parallel_equivalence --out-dir $OUT/layouts --gpus 4 --fp8
    python -m benchmarks.parallel_equivalence --out-dir $OUT/masked --gpus 2 --document-masking --only tp2 dp2 pp2

Writes ``equivalence.json`` and one JSON/log per run into ``--out-dir``; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    cp: int = 1
    dp: int = 1
    cp_comm_type: str = "p2p"
    pp: int = 1
    vpp: int | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp * self.pp


LAYOUTS = [
    Layout("tp2", tp=2),
    Layout("cp2-p2p", cp=2),
    Layout("cp2-a2a", cp=2, cp_comm_type="a2a"),
    Layout("cp2-all_gather", cp=2, cp_comm_type="all_gather"),
    Layout("dp2", dp=2),
    Layout("tp2xcp2", tp=2, cp=2),
    Layout("cp2xdp2", cp=2, dp=2),
    # Pipeline stages draw their initial weights from their own RNG streams: these layouts and their one-GPU
    # reference start from the same Hugging Face weights instead (written once by this script).
    Layout("pp2", pp=2),
    Layout("pp2-vpp2", pp=2, vpp=2),
    Layout("tp2xpp2", tp=2, pp=2),
    Layout("pp2xdp2", pp=2, dp=2),
]


def train(
    layout: Layout,
    precision: str,
    args: argparse.Namespace,
    cpu_init: bool = False,
    gpu: int | None = None,
    init_weights: Path | None = None,
) -> dict:
    """One ``benchmarks.throughput`` run; ``gpu`` pins a one-GPU run to that card so two can run side by side."""
    tag = f"{layout.name}_{precision}{'_cpuinit' if cpu_init else ''}{'_hfinit' if init_weights else ''}"
    out = args.out_dir / f"{tag}.json"
    if args.reuse and out.exists():
        print(f"reusing {out.name}", flush=True)
        return json.loads(out.read_text())
    cmd = [
        "-m", "benchmarks.throughput", "--arch", "small", "--layers", str(args.layers), "--seq", str(args.seq),
        "--gbs", str(args.gbs), "--mbs", "1", "--steps", str(args.steps), "--warmup", "2",
        "--lr-scale", str(args.lr_scale), "--precision", precision, "--tp", str(layout.tp), "--cp", str(layout.cp),
        "--cp-comm-type", layout.cp_comm_type, "--pp", str(layout.pp), "--out", str(out),
        *(["--vpp", str(layout.vpp)] if layout.vpp else []), *(["--cpu-init"] if cpu_init else []),
        *(["--init-weights", str(init_weights)] if init_weights else []),
        *(["--document-masking"] if getattr(args, "document_masking", False) else []),
    ]  # fmt: skip
    if layout.gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(layout.gpus)]
        cmd = [*launcher, "--master_port", str(29600 + sum(map(ord, layout.name)) % 300), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = dict(os.environ)
    if gpu is not None:
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), MASTER_PORT=str(29400 + gpu))
    log = args.out_dir / f"{tag}.log"
    start = time.time()
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    print(f"[{time.time() - start:5.0f} s] {tag}: exit {code}", flush=True)
    if code != 0 or not out.exists():
        return {"error": f"exit {code}; see {log.name}"}
    return json.loads(out.read_text())


def write_hf_weights(directory: Path, num_layers: int, seq_length: int) -> Path:
    """Random Hugging Face weights of ``benchmarks.throughput``'s small architecture (written with transformers)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=num_layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, vocab_size=32000, max_position_embeddings=seq_length,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(1234)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def compare(
    layout: Layout, reference: dict, bf16: dict, fp8: dict | None, fp8_bf16: dict | None, compared_steps: int
) -> dict:
    """One row of the report; ``*_ok`` are the issue's acceptance checks."""
    row: dict = {"layout": layout.name, "gpus": layout.gpus, "tp": layout.tp, "cp": layout.cp, "dp": layout.dp,
                 "pp": layout.pp, "vpp": layout.vpp}  # fmt: skip
    if layout.cp > 1:
        row["cp_comm_type"] = layout.cp_comm_type
    if "error" in bf16 or "error" in reference:
        row["error"] = bf16.get("error") or reference.get("error")
        return row
    first = slice(0, compared_steps)
    row["bf16_max_loss_rel_diff"] = max_rel_diff(bf16["losses"][first], reference["losses"][first])
    row["bf16_max_loss_rel_diff_all_steps"] = max_rel_diff(bf16["losses"], reference["losses"])
    row["bf16_grad_norm_step1_rel_diff"] = abs(bf16["grad_norms"][0] / reference["grad_norms"][0] - 1)
    row["bf16_ok"] = row["bf16_max_loss_rel_diff"] < 0.01 and row["bf16_grad_norm_step1_rel_diff"] < 0.01
    row["tokens_per_sec_per_gpu_bf16"] = bf16["tokens_per_sec_per_gpu"]
    row["losses_bf16"] = bf16["losses"]
    if fp8 is not None and fp8_bf16 is not None:
        if "error" in fp8 or "error" in fp8_bf16:
            row["fp8_error"] = fp8.get("error") or fp8_bf16.get("error")
            return row
        row["fp8_finite"] = all(math.isfinite(x) for x in fp8["losses"] + fp8["grad_norms"])
        row["fp8_vs_bf16_max_rel_diff"] = max_rel_diff(fp8["losses"], fp8_bf16["losses"])
        row["fp8_ok"] = row["fp8_finite"] and row["fp8_vs_bf16_max_rel_diff"] < 0.03
        row["tokens_per_sec_per_gpu_fp8"] = fp8["tokens_per_sec_per_gpu"]
        row["losses_fp8"] = fp8["losses"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=4, help="largest layout to run")
    parser.add_argument("--steps", type=int, default=50, help="steps each run trains (FP8 is compared over all)")
    parser.add_argument("--compared-steps", type=int, default=20, help="first steps compared with one GPU in BF16")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument(
        "--lr-scale",
        type=float,
        default=0.1,
        help="scales the recipe's learning rates; the default keeps the loss on mock data (counting sequences) "
        "well above zero, where per-step relative differences mean something",
    )
    parser.add_argument("--fp8", action="store_true", help="also run each layout in FP8 and compare with BF16")
    parser.add_argument("--reuse", action="store_true", help="reuse run JSONs already in --out-dir (resume)")
    parser.add_argument("--only", nargs="*", help="layout names to run (default: all that fit --gpus)")
    parser.add_argument(
        "--document-masking",
        action="store_true",
        help="every run (the one-GPU references too) masks documents; context parallelism refuses it",
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    layouts = [lay for lay in LAYOUTS if lay.gpus <= args.gpus and (not args.only or lay.name in args.only)]
    # Megatron draws each TP rank's slice from its own CUDA RNG stream, so TP layouts start from other weights
    # than one GPU; they and their reference use CPU initialisation (the same full weights, sliced). CP and DP
    # ranks draw exactly the one-GPU weights on the GPU. The two references run side by side on two cards.
    one_gpu = Layout("1gpu")
    with ThreadPoolExecutor(max_workers=2) as pool:
        ref_gpu = pool.submit(train, one_gpu, "bf16", args, False, 0)
        ref_cpu = pool.submit(train, one_gpu, "bf16", args, True, 1 if args.gpus > 1 else 0)
        references: dict[str, dict] = {"gpu": ref_gpu.result(), "cpu": ref_cpu.result()}
    init_dir = None
    if any(layout.pp > 1 for layout in layouts):
        init_dir = write_hf_weights(args.out_dir / "hf_init", args.layers, args.seq)
        references["hf"] = train(one_gpu, "bf16", args, init_weights=init_dir)
    rows, ok = [], all("error" not in ref for ref in references.values())
    for layout in layouts:
        init = "hf" if layout.pp > 1 else "cpu" if layout.tp > 1 else "gpu"
        cpu_init, weights = init == "cpu", init_dir if init == "hf" else None
        bf16 = train(layout, "bf16", args, cpu_init, init_weights=weights)
        fp8 = fp8_bf16 = None
        if args.fp8 and "error" not in bf16:
            # FP8 is compared with BF16 of the same layout and initialisation (GPU init, or the HF weights).
            fp8_bf16 = train(layout, "bf16", args, init_weights=weights) if cpu_init else bf16
            fp8 = train(layout, "fp8", args, init_weights=weights)
        row = compare(layout, references[init], bf16, fp8, fp8_bf16, args.compared_steps)
        row["initialisation"] = {"cpu": "cpu (sliced full weights)", "gpu": "gpu", "hf": "Hugging Face weights"}[init]
        ok = ok and row.get("bf16_ok", False) and (not args.fp8 or row.get("fp8_ok", False))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("losses")}), flush=True)

    summary = {
        "device": references["gpu"].get("device"),
        "config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "only")},
        "reference": {k: references["gpu"].get(k) for k in ("losses", "grad_norms", "error")},
        "reference_cpu_init": {k: references["cpu"].get(k) for k in ("losses", "grad_norms", "error")},
        "reference_hf_init": {k: references.get("hf", {}).get(k) for k in ("losses", "grad_norms", "error")},
        "rows": rows,
    }
    (args.out_dir / "equivalence.json").write_text(json.dumps(summary, indent=2, default=str))
    print("all layouts match one GPU" if ok else "SOME LAYOUTS DO NOT MATCH (see equivalence.json)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
