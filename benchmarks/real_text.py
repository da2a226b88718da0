"""Real text, offline: a corpus from installed files, preprocessing speed vs Megatron-LM, and the training summary.

    # JSON Lines of the text files (.py .md .rst .txt) under the given directories, one document per file:
    python -m benchmarks.real_text corpus --root .venv/lib/python3.12/site-packages --min-mb 100 --out text.jsonl

    # `llama-fp8 preprocess` vs Megatron-LM's tools/preprocess_data.py (a copy in .baseline/), same input,
    # tokenizer and --workers, alternating runs; wall time, tokens/s, peak memory, byte-identical output:
    python -m benchmarks.real_text speed --input text.jsonl --workers 2 --repeats 2 --out-dir RESULTS

    # real_text_training.json from two `llama-fp8 fit` CSV logs (real corpus and mock data, same config):
    python -m benchmarks.real_text training --real-csv A/metrics.csv --mock-csv B/metrics.csv \
        --corpus-json corpus.json --card "NVIDIA H200" --out RESULTS/real_text_training.json

    # document_masking_training.json and document_masking_val_loss.svg from two `llama-fp8 fit` CSV logs of the same
    # config on the same corpus, with data.document_masking on and off:
    python -m benchmarks.real_text masking --masked-csv A/metrics.csv --unmasked-csv B/metrics.csv \
        --card "NVIDIA H100" --out-dir RESULTS

    # moments_check.json and moments_val_loss.svg (issue 28) from `llama-fp8 fit` CSV logs of the 1B text example:
    # two runs of Megatron's default optimizer (other seeds: the run-to-run gap) and one with bf16 Adam moments:
    python -m benchmarks.real_text moments --run default=A/metrics.csv --run default_seed2=B/metrics.csv \
        --run bf16_moments=C/metrics.csv --card "NVIDIA H200" --out-dir RESULTS

Peak memory is read from outside the command: the largest resident set of a single process (the kernel's
accounting, ``wait4``) and the largest sum over the command's process tree (sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- corpus
def build_corpus(roots: list[Path], out: Path, min_bytes: int, max_bytes: int | None) -> dict[str, Any]:
    """Every text file under ``roots`` (sorted, UTF-8 only, non-empty) as one JSON line ``{"text", "path"}``."""
    written = files = skipped = 0
    with out.open("w", encoding="utf-8") as sink:
        for root in roots:
            for path in sorted(root.rglob("*")):
                if path.suffix not in TEXT_SUFFIXES or not path.is_file():
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    skipped += 1
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text, "path": str(path.relative_to(root))}, ensure_ascii=False) + "\n"
                sink.write(line)
                written += len(line.encode("utf-8"))
                files += 1
                if max_bytes is not None and written >= max_bytes:
                    break
            if max_bytes is not None and written >= max_bytes:
                break
    if written < min_bytes:
        raise SystemExit(f"only {written / 1e6:.1f} MB of text under {roots}; need {min_bytes / 1e6:.0f} MB")
    return {
        "roots": [str(r) for r in roots],
        "suffixes": list(TEXT_SUFFIXES),
        "documents": files,
        "bytes": written,
        "skipped_not_utf8": skipped,
    }


# ---------------------------------------------------------------------------------------------------- timing
def timed(command: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``command`` to completion: wall seconds, CPU seconds, peak RSS of one process and of the tree (GiB)."""
    import psutil

    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        handle = psutil.Process(proc.pid)
        tree_peak = 0
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:
                raise SystemExit(f"lost track of {command[:3]}") from None
            if pid:
                break
            try:
                procs = [handle, *handle.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed with exit status {proc.returncode}; see {log}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_process_gib": usage.ru_maxrss * 1024 / 2**30,  # ru_maxrss is in KiB on Linux
        "peak_tree_gib": tree_peak / 2**30,
    }


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from lightning_llama_fp8.data import read_sidecar, resolve_tokenizer

    out_dir: Path = args.out_dir
    work: Path = args.work_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer("llama3")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}"}
    ours_prefix, lm_prefix = work / "ours", work / "megatron_lm"
    ours = [
        sys.executable, "-m", "lightning_llama_fp8.cli.fit", "preprocess", "--input", str(args.input),
        "--output-prefix", str(ours_prefix), "--workers", str(args.workers), "--overwrite", "--no-progress",
        # Megatron-LM reads special-token strings in text as control tokens (package sources quote <|eot_id|>,
        # <|image|>): the byte-identity check compares that mode; the default encodes them as text.
        "--parse-special-tokens",
    ]  # fmt: skip
    lm_env = {**os.environ, "PYTHONPATH": str(args.megatron_lm)}
    lm = [
        sys.executable, str(args.megatron_lm / "tools" / "preprocess_data.py"), "--input", str(args.input),
        "--output-prefix", str(lm_prefix), "--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tokenizer.path.parent), "--append-eod", "--workers", str(args.workers),
    ]  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "megatron_lm": []}
    for repeat in range(args.repeats):  # alternate, so a drift in machine speed hits both
        runs["ours"].append(timed(ours, env, out_dir / f"ours_{repeat}.log"))
        runs["megatron_lm"].append(timed(lm, lm_env, out_dir / f"megatron_lm_{repeat}.log"))
        print(f"repeat {repeat}: ours {runs['ours'][-1]['wall_s']:.1f} s, megatron-lm "
              f"{runs['megatron_lm'][-1]['wall_s']:.1f} s", flush=True)  # fmt: skip
    lm_out = Path(f"{lm_prefix}_text_document")
    identical = all(filecmp.cmp(f"{ours_prefix}{ext}", f"{lm_out}{ext}", shallow=False) for ext in (".bin", ".idx"))
    sidecar = read_sidecar(ours_prefix) or {}
    tokens = int(sidecar["tokens"])

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    ours_wall, lm_wall = median("ours", "wall_s"), median("megatron_lm", "wall_s")
    return {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "input": str(args.input),
        "input_bytes": args.input.stat().st_size,
        "documents": int(sidecar["documents"]),
        "tokens": tokens,
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256},
        "workers": args.workers,
        "repeats": args.repeats,
        "ours_wall_s_median": ours_wall,
        "megatron_lm_wall_s_median": lm_wall,
        "ours_tokens_per_s": tokens / ours_wall,
        "megatron_lm_tokens_per_s": tokens / lm_wall,
        "speedup": lm_wall / ours_wall,
        "ours_peak_process_gib": max(run["peak_process_gib"] for run in runs["ours"]),
        "megatron_lm_peak_process_gib": max(run["peak_process_gib"] for run in runs["megatron_lm"]),
        "ours_peak_tree_gib": max(run["peak_tree_gib"] for run in runs["ours"]),
        "megatron_lm_peak_tree_gib": max(run["peak_tree_gib"] for run in runs["megatron_lm"]),
        "identical_output": identical,
        "runs": runs,
        "commands": {"ours": " ".join(ours), "megatron_lm": " ".join(lm)},
        "note": "wall time of the whole command, start-up (imports) included, as a user sees it",
    }


def speed_table(result: dict[str, Any]) -> str:
    rows = [
        ("wall time, median (s)", "ours_wall_s_median", "megatron_lm_wall_s_median", "{:.1f}"),
        ("tokens/s", "ours_tokens_per_s", "megatron_lm_tokens_per_s", "{:,.0f}"),
        ("peak RSS, largest process (GiB)", "ours_peak_process_gib", "megatron_lm_peak_process_gib", "{:.2f}"),
        ("peak RSS, process tree (GiB)", "ours_peak_tree_gib", "megatron_lm_peak_tree_gib", "{:.2f}"),
    ]
    lines = [
        f"Preprocessing {result['input_bytes'] / 1e6:.0f} MB of text ({result['documents']:,} documents, "
        f"{result['tokens']:,} tokens), Llama 3 tokenizer, --workers {result['workers']}, "
        f"{result['repeats']} alternating runs each; {result['machine']}.",
        "",
        "| | llama-fp8 preprocess | Megatron-LM tools/preprocess_data.py |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {fmt.format(result[a])} | {fmt.format(result[b])} |" for name, a, b, fmt in rows]
    lines += ["", f"Speed-up {result['speedup']:.2f}x; byte-identical .bin/.idx: {result['identical_output']}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- training
def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]


def steady(values: list[tuple[int, float]], skip_steps: int) -> float:
    """Median of a logged series after ``skip_steps`` (compilation, warm-up and the first window left out)."""
    kept = [value for step, value in values if step >= skip_steps and math.isfinite(value)]
    if not kept:
        raise SystemExit(f"no values after step {skip_steps}")
    return statistics.median(kept)


def _sidecar_counts(path: Path) -> dict[str, Any]:
    sidecar = json.loads(path.read_text())
    keep = ("documents", "tokens", "max_token_id", "dtype", "bin_bytes")
    return {**{key: sidecar.get(key) for key in keep}, "tokenizer": sidecar.get("tokenizer")}


def training(args: argparse.Namespace) -> dict[str, Any]:
    real, mock = read_metrics(args.real_csv), read_metrics(args.mock_csv)
    key = "throughput/tokens_per_sec"
    tokens_real, tokens_mock = steady(series(real, key), args.skip_steps), steady(series(mock, key), args.skip_steps)
    val_loss = series(real, "val/loss")
    train_loss = series(real, "train/loss") or series(real, "loss")
    result = {
        "card": args.card,
        "corpus": {
            "extracted": "benchmarks.real_text corpus: every UTF-8 .py/.md/.rst/.txt file under the roots, one "
            "JSON line per file, sorted by path; then llama-fp8 preprocess with the Llama 3 tokenizer",
            **json.loads(args.corpus_json.read_text()),
            **({"preprocessed": _sidecar_counts(args.sidecar)} if args.sidecar else {}),
        },
        "config": args.config,
        "steps": max(step for step, _ in series(real, key)) + 1 if series(real, key) else None,
        "val_loss": [[step, loss] for step, loss in val_loss],
        "val_ppl": [[step, ppl] for step, ppl in series(real, "val/ppl")],
        "train_loss": [[step, loss] for step, loss in train_loss],
        "tokens_per_s_real": tokens_real,
        "tokens_per_s_mock": tokens_mock,
        "real_over_mock": tokens_real / tokens_mock,
        "data_wait_s_per_step": steady(series(real, "throughput/data_wait_s"), args.skip_steps),
        "data_wait_s_per_step_mock": steady(series(mock, "throughput/data_wait_s"), args.skip_steps),
        "step_time_s_real": steady(series(real, "throughput/step_time_s"), args.skip_steps),
        "step_time_s_mock": steady(series(mock, "throughput/step_time_s"), args.skip_steps),
        "measured_from_step": args.skip_steps,
        "note": "tokens/s and data wait: medians of ThroughputMonitor's windowed values from measured_from_step on",
    }
    if args.max_steps is not None:
        result["steps"] = args.max_steps
    return result


def masking(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs' validation curves (and training losses, step times), from their CSV logs."""
    runs = {"masked": read_metrics(args.masked_csv), "unmasked": read_metrics(args.unmasked_csv)}

    def summary(rows: list[dict[str, str]]) -> dict[str, Any]:
        step_times = series(rows, "throughput/step_time_s")
        return {
            "val_loss": [[step, loss] for step, loss in series(rows, "val/loss")],
            "val_ppl": [[step, ppl] for step, ppl in series(rows, "val/ppl")],
            "train_loss": [[step, loss] for step, loss in series(rows, "train/loss")],
            "step_time_s": steady(step_times, args.skip_steps) if step_times else None,
            "tokens_per_s": steady(series(rows, "throughput/tokens_per_sec"), args.skip_steps) if step_times else None,
        }

    result: dict[str, Any] = {"card": args.card, "config": args.config, "steps": args.max_steps}
    result.update({name: summary(rows) for name, rows in runs.items()})
    masked, unmasked = result["masked"]["val_loss"], result["unmasked"]["val_loss"]
    if masked and unmasked:
        result["final_val_loss"] = {"masked": masked[-1][1], "unmasked": unmasked[-1][1]}
    if result["masked"]["step_time_s"] and result["unmasked"]["step_time_s"]:
        result["masked_s_over_unmasked_s"] = result["masked"]["step_time_s"] / result["unmasked"]["step_time_s"]
    if args.corpus_json:
        result["corpus"] = json.loads(args.corpus_json.read_text())
    result["note"] = (
        "val/loss every val_check_interval steps (Lightning's 0-based step numbers); step time and tokens/s: medians "
        f"of ThroughputMonitor's windowed values from step {args.skip_steps} on"
    )
    return result


def curve_summary(rows: list[dict[str, str]], skip_steps: int) -> dict[str, Any]:
    """Validation and training curves and the steady step time of one run's CSV log."""
    step_times = series(rows, "throughput/step_time_s")
    return {
        "val_loss": [[step, loss] for step, loss in series(rows, "val/loss")],
        "train_loss": [[step, loss] for step, loss in series(rows, "train/loss")],
        "step_time_s": steady(step_times, skip_steps) if step_times else None,
    }


def moments(args: argparse.Namespace) -> dict[str, Any]:
    """BF16 Adam moments against Megatron's default optimizer: final validation losses, and the gap between two
    default runs that differ only in their seed (the noise the bf16 run is judged against)."""
    runs = dict(item.split("=", 1) for item in args.run)
    missing = {"default", "default_seed2", "bf16_moments"} - set(runs)
    if missing:
        raise SystemExit(f"moments: --run {', '.join(sorted(missing))}=CSV missing")
    curves = {name: curve_summary(read_metrics(Path(path)), args.skip_steps) for name, path in runs.items()}
    final = {name: curve["val_loss"][-1][1] if curve["val_loss"] else None for name, curve in curves.items()}
    if None in final.values():
        raise SystemExit(f"moments: a run has no validation loss: {final}")
    gap = abs(final["default"] - final["default_seed2"])
    bf16_gap = abs(final["bf16_moments"] - final["default"])
    steps = max(curve["val_loss"][-1][0] for curve in curves.values()) + 1
    return {
        "card": args.card,
        "config": args.config,
        "steps": steps,
        "final_val_loss_default": final["default"],
        "final_val_loss_default_seed2": final["default_seed2"],
        "final_val_loss_bf16_moments": final["bf16_moments"],
        "default_run_to_run_gap": gap,
        "bf16_moments_gap_to_default": bf16_gap,
        "bf16_moments_within_noise": bf16_gap <= gap,
        "runs": curves,
        "note": "default and bf16_moments: the same seed (weights, data order); default_seed2: another seed "
        "(seed_everything), Megatron's default optimizer. val/loss every val_check_interval steps (0-based steps).",
    }


def moments_chart(result: dict[str, Any]) -> str:
    from benchmarks.lib.svg_chart import line_chart

    labels = {
        "default": "fp32 moments (default)",
        "default_seed2": "fp32 moments, other seed",
        "bf16_moments": "bf16 moments",
    }
    return line_chart(
        {
            label: [(step + 1, loss) for step, loss in result["runs"][name]["val_loss"]]
            for name, label in labels.items()
        },
        title=f"Validation loss, {result['config']} on real text ({result['card']})",
        x_label="training step",
        y_label="validation loss",
    )


def masking_chart(result: dict[str, Any]) -> str:
    from benchmarks.lib.svg_chart import line_chart

    return line_chart(
        {
            f"document masking {name}": [(step + 1, loss) for step, loss in result[key]["val_loss"]]
            for name, key in (("on", "masked"), ("off", "unmasked"))
        },
        title=f"Validation loss, {result['config']} on real text ({result['card']})",
        x_label="training step",
        y_label="validation loss",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="JSON Lines from installed text files")
    corpus.add_argument("--root", type=Path, action="append", required=True)
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--min-mb", type=float, default=0)
    corpus.add_argument("--max-mb", type=float)
    corpus.add_argument("--describe", type=Path, help="also write what was collected (JSON)")
    bench = sub.add_parser("speed", help="llama-fp8 preprocess vs Megatron-LM's tools/preprocess_data.py")
    bench.add_argument("--input", type=Path, required=True)
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--megatron-lm", type=Path, default=REPO / ".baseline")
    bench.add_argument("--work-dir", type=Path, default=Path("/tmp/real_text_speed"))
    bench.add_argument("--out-dir", type=Path, required=True)
    train = sub.add_parser("training", help="real_text_training.json from two CSV logs")
    train.add_argument("--real-csv", type=Path, required=True)
    train.add_argument("--mock-csv", type=Path, required=True)
    train.add_argument("--corpus-json", type=Path, required=True)
    train.add_argument("--sidecar", type=Path, help="the corpus's <prefix>.corpus.json")
    train.add_argument("--card", required=True)
    train.add_argument("--config", default="examples/configs/llama3_1b_text.yaml")
    train.add_argument("--skip-steps", type=int, default=50)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--out", type=Path, required=True)
    masked = sub.add_parser("masking", help="document masking on vs off: both validation curves, as JSON and SVG")
    masked.add_argument("--masked-csv", type=Path, required=True)
    masked.add_argument("--unmasked-csv", type=Path, required=True)
    masked.add_argument("--card", required=True)
    masked.add_argument("--config", default="examples/configs/llama3_1b_text.yaml")
    masked.add_argument("--corpus-json", type=Path)
    masked.add_argument("--skip-steps", type=int, default=50)
    masked.add_argument("--max-steps", type=int)
    masked.add_argument("--out-dir", type=Path, required=True)
    moment = sub.add_parser("moments", help="bf16 vs fp32 Adam moments: validation curves and the run-to-run gap")
    moment.add_argument("--run", action="append", required=True, help="NAME=metrics.csv (default, default_seed2, ...)")
    moment.add_argument("--card", required=True)
    moment.add_argument("--config", default="examples/configs/llama3_1b_text.yaml")
    moment.add_argument("--skip-steps", type=int, default=50)
    moment.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "corpus":
        max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
        described = build_corpus(args.root, args.out, int(args.min_mb * 1e6), max_bytes)
        print(json.dumps(described))
        if args.describe:
            args.describe.write_text(json.dumps(described, indent=2) + "\n")
    elif args.command == "speed":
        result = speed(args)
        (args.out_dir / "preprocess_speed.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "preprocess_speed.md").write_text(speed_table(result))
        print(speed_table(result))
    elif args.command == "moments":
        result = moments(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "moments_check.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "moments_val_loss.svg").write_text(moments_chart(result))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    elif args.command == "masking":
        result = masking(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "document_masking_training.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "document_masking_val_loss.svg").write_text(masking_chart(result))
        print(json.dumps({name: result[name]["val_loss"] for name in ("masked", "unmasked")}))
    else:
        result = training(args)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("val_loss", "train_loss", "val_ppl")}))


if __name__ == "__main__":
    main()
