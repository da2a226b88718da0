"""The fine-tuning evidence of issue 29: chat data in, a model out that answers in transformers.

The ``sft`` stage of ``benchmarks/stages.py`` runs these steps on one GPU, each a command as a user runs it:

    python -m benchmarks.sft prepare --out-dir OUT --work-dir WORK      # task, held-out set, configs
    llama-fp8 preprocess --chat --input WORK/train.jsonl --output-prefix WORK/chat --max-seq-length 1024
    python -m benchmarks.sft all-tokens-corpus --corpus WORK/chat --out-prefix WORK/chat_all_tokens
    llama-fp8 fit --config OUT/answer_only.yaml; llama-fp8 convert WORK/ckpt_answer_only/final.ckpt WORK/hf_answer_only
    llama-fp8 fit --config OUT/all_tokens.yaml;  llama-fp8 convert ... WORK/hf_all_tokens
    python -m benchmarks.sft evaluate --out-dir OUT --work-dir WORK    # transformers: apply_chat_template + generate
    python -m benchmarks.sft speed --data sft --corpus WORK/chat --out OUT/speed_sft.json
    python -m benchmarks.sft speed --data pretrain --out OUT/speed_pretrain.json
    python -m benchmarks.sft summarize --out-dir OUT                   # OUT/sft.json

The task (``benchmarks/lib/sft_task.py``): reverse words / sort numbers, phrased several ways, some conversations with
a system prompt or two turns; a disjoint held-out set graded by exact match. The fine-tuning
(``benchmarks/lib/sft_configs.py``): a ~144M-parameter Llama with the Llama 3 tokenizer, from scratch, packed
conversations and answer-only loss, against the same recipe with the loss on every token, and against the untrained
model. Speed (``benchmarks/lib/sft_speed.py``): the 8B-shaped 4-layer model on packed conversations against mock
pretraining, in the same stage call. ``OUT/sft.json`` holds the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.lib.sft_configs import RUNS, SFTPaths, SFTRecipe, write_fit_configs
from benchmarks.lib.sft_task import TaskSpec, generate, read_jsonl, write_jsonl

#: Conversations of the training set kept in OUT for reading (the whole set is regenerated from the seed).
TRAIN_SAMPLE = 20
#: ``SFTDataModule``'s log line for the training split's packing (``PackedSplit.describe("train")``).
_TRAIN_PACKING = re.compile(r"train: ([\d,]+) conversations in ([\d,]+) samples, fill ratio ([\d.]+)%")


# ---------------------------------------------------------------------------------------------- prepare
def prepare(paths: SFTPaths, spec: TaskSpec, recipe: SFTRecipe) -> dict[str, Any]:
    """The training set (WORK), the held-out set, the task's description and both fit configs (OUT)."""
    import shutil

    paths.out.mkdir(parents=True, exist_ok=True)
    paths.work.mkdir(parents=True, exist_ok=True)
    for run in RUNS:  # an earlier call's checkpoint would make ModelCheckpoint name this one final-v1.ckpt
        for stale in (paths.checkpoint(run).parent, paths.exported(run)):
            if stale.is_dir():
                shutil.rmtree(stale)
    train, heldout = generate(spec)
    write_jsonl(paths.train_jsonl, train)
    write_jsonl(paths.heldout_jsonl, heldout)
    write_jsonl(paths.out / "train_sample.jsonl", train[:TRAIN_SAMPLE])
    task = {**spec.describe(), "recipe": asdict(recipe)}
    paths.task_json.write_text(json.dumps(task, indent=2) + "\n")
    configs = write_fit_configs(recipe, paths)
    print(f"{len(train):,} training conversations in {paths.train_jsonl}, {len(heldout):,} held out in "
          f"{paths.heldout_jsonl}; configs {', '.join(map(str, configs))}")  # fmt: skip
    return task


# ---------------------------------------------------------------------------------------------- all-tokens corpus
def all_tokens_corpus(corpus: Path, out_prefix: Path) -> int:
    """A copy of the chat corpus ``corpus`` whose loss mask is all ones: the same conversations, the loss on every
    token (the comparison run). The ``.bin`` and ``.idx`` are hard links (copies across file systems); the sidecar is
    the original's with the answer count and its binding to the new mask renewed, so the copy is trusted as the
    original is. Returns the number of tokens."""
    import os
    import shutil

    import numpy

    from benchmarks.lib.internals import corpus_binding, loss_mask_path

    sources = {suffix: Path(f"{corpus}{suffix}") for suffix in (".bin", ".idx")}
    targets = {suffix: Path(f"{out_prefix}{suffix}") for suffix in sources}
    for suffix, source in sources.items():
        targets[suffix].unlink(missing_ok=True)
        try:
            os.link(source, targets[suffix])
        except OSError:
            shutil.copyfile(source, targets[suffix])
    original_mask = loss_mask_path(corpus)
    tokens = original_mask.stat().st_size  # one byte per token
    mask = loss_mask_path(out_prefix)
    with mask.open("wb") as file:
        block = numpy.ones(min(tokens, 1 << 24), dtype=numpy.uint8).tobytes()
        written = 0
        while written < tokens:
            written += file.write(block[: tokens - written])
    sidecar = json.loads(Path(f"{corpus}.corpus.json").read_text())
    sidecar["answer_tokens"] = tokens
    sidecar["loss_mask_bytes"] = tokens
    sidecar["binding"] = corpus_binding(sidecar, targets[".bin"], targets[".idx"], mask)
    Path(f"{out_prefix}.corpus.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"{out_prefix}: the conversations of {corpus} with the loss on all {tokens:,} tokens")
    return tokens


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate(paths: SFTPaths, seed: int, batch_size: int) -> dict[str, Any]:
    """Held-out answers of both exported models and of the untrained architecture (``OUT/evaluation.json``); models
    whose export is missing are named, not evaluated."""
    import torch

    from benchmarks.lib.sft_eval import answer_heldout, template_matches_corpus

    heldout = read_jsonl(paths.heldout_jsonl)
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "missing": []}
    for run in RUNS:
        model = paths.exported(run)
        if (model / "config.json").is_file():
            record[run] = answer_heldout(model, heldout, batch_size=batch_size)
            print(f"{run}: exact match {record[run]['exact_match']:.3f}", flush=True)
        else:
            record["missing"].append(str(model))
    reference = next((paths.exported(run) for run in RUNS if (paths.exported(run) / "config.json").is_file()), None)
    if reference is not None:
        record["untrained"] = answer_heldout(reference, heldout, untrained_seed=seed, batch_size=batch_size)
        print(f"untrained: exact match {record['untrained']['exact_match']:.3f}", flush=True)
        # The grades are written before the cross-check below, so a failure there does not lose them.
        (paths.out / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
        if Path(f"{paths.corpus}.idx").is_file():
            train = read_jsonl(paths.train_jsonl)[:200]
            record["chat_template_matches_corpus"] = template_matches_corpus(reference, str(paths.corpus), train)
    (paths.out / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------- summarize
def pack_fill_ratio(log: Path) -> dict[str, Any] | None:
    """The training split's packing as ``SFTDataModule`` logged it (conversations, samples, fill ratio)."""
    if not log.is_file():
        return None
    found = _TRAIN_PACKING.findall(log.read_text(errors="replace"))
    if not found:
        return None
    conversations, samples, percent = found[-1]
    return {
        "conversations": int(conversations.replace(",", "")),
        "samples": int(samples.replace(",", "")),
        "fill_ratio": float(percent) / 100,
    }


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of each column of a Lightning CSV log (empty when there is none)."""
    if not metrics_csv.is_file():
        return {}
    last: dict[str, float] = {}
    with metrics_csv.open(newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if value not in ("", None):
                    try:
                        last[key] = float(value)
                    except ValueError:
                        continue
    return last


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _card(out: Path, *records: dict[str, Any] | None) -> str | None:
    for record in records:
        if record and record.get("device"):
            return str(record["device"])
    device = out / "device.txt"  # nvidia-smi's CSV, written by every stage
    lines = device.read_text().splitlines()[1:] if device.is_file() else []
    return lines[0].split(",")[0].strip() if lines else None


def summarize(paths: SFTPaths) -> dict[str, Any]:
    """``OUT/sft.json`` from what the steps left in OUT; a missing part is null and named under ``missing``."""
    task = _read(paths.task_json) or {}
    evaluation = _read(paths.out / "evaluation.json") or {}
    speed_sft, speed_pretrain = _read(paths.out / "speed_sft.json"), _read(paths.out / "speed_pretrain.json")
    packing = pack_fill_ratio(paths.fit_log("answer_only"))
    missing = list(evaluation.get("missing", []))
    parts = {"task.json": task, "evaluation.json": evaluation, "speed_sft.json": speed_sft}
    parts |= {"speed_pretrain.json": speed_pretrain, "the packing line of fit_answer_only.log": packing}
    for name, part in parts.items():
        if not part:
            missing.append(name)

    def exact(run: str) -> float | None:
        return evaluation.get(run, {}).get("exact_match")

    sft_speed = speed_sft["tokens_per_s"] if speed_sft else None
    pretrain_speed = speed_pretrain["tokens_per_s"] if speed_pretrain else None
    record = {
        "card": _card(paths.out, speed_sft, speed_pretrain, evaluation),
        "task": {key: value for key, value in task.items() if key != "recipe"},
        "train_conversations": task.get("train_conversations"),
        "heldout_conversations": task.get("heldout_conversations"),
        "exact_match": exact("answer_only"),
        "exact_match_loss_on_all_tokens": exact("all_tokens"),
        "exact_match_untrained": exact("untrained"),
        "pack_fill_ratio": packing["fill_ratio"] if packing else None,
        "sft_tokens_per_s": sft_speed,
        "pretrain_tokens_per_s": pretrain_speed,
        "sft_over_pretrain_tokens_per_s": sft_speed / pretrain_speed if sft_speed and pretrain_speed else None,
        "fine_tune": {
            "recipe": task.get("recipe"),
            "packing": packing,
            "runs": {run: last_metrics(paths.metrics_csv(run)) for run in RUNS},
            "exact_match_by_kind": {
                run: evaluation.get(run, {}).get("exact_match_by_kind") for run in (*RUNS, "untrained")
            },
            "answers_ending_at_a_stop_token": {
                run: evaluation.get(run, {}).get("stopped_at_stop_token") for run in (*RUNS, "untrained")
            },
            "stop_token_ids": evaluation.get("answer_only", {}).get("stop_token_ids"),
            "chat_template_matches_corpus": evaluation.get("chat_template_matches_corpus"),
            "samples": evaluation.get("answer_only", {}).get("samples"),
        },
        "speed": {
            name: None if part is None else {key: value for key, value in part.items() if key != "step_times_s"}
            for name, part in (("sft", speed_sft), ("pretrain", speed_pretrain))
        },
        "missing": missing,
    }
    (paths.out / "sft.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({key: record[key] for key in list(record)[:3] + list(record)[4:11]}, indent=2))
    return record


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    defaults, recipe_defaults = TaskSpec(seed=29, train_conversations=100_000, heldout_conversations=400), SFTRecipe()

    def with_dirs(command: argparse.ArgumentParser) -> None:
        command.add_argument("--out-dir", type=Path, required=True, help="the evidence (kept under results/)")
        command.add_argument("--work-dir", type=Path, default=Path("/tmp/sft_work"), help="bulk files")

    step = commands.add_parser("prepare", help="training and held-out conversations, task.json, the fit configs")
    with_dirs(step)
    step.add_argument("--train", type=int, default=defaults.train_conversations, help="training conversations")
    step.add_argument("--heldout", type=int, default=defaults.heldout_conversations, help="held-out conversations")
    step.add_argument("--seed", type=int, default=defaults.seed)
    step.add_argument("--steps", type=int, default=recipe_defaults.steps, help="fine-tuning steps of each run")
    step.add_argument("--precision", choices=("fp8", "bf16"), default=recipe_defaults.precision)
    step.add_argument("--lr", type=float, default=recipe_defaults.lr, help="peak learning rate (min_lr: a tenth)")

    step = commands.add_parser("all-tokens-corpus", help="a copy of a chat corpus with the loss on every token")
    step.add_argument("--corpus", type=Path, required=True)
    step.add_argument("--out-prefix", type=Path, required=True)

    step = commands.add_parser("evaluate", help="held-out exact match of the exported models and the untrained one")
    with_dirs(step)
    step.add_argument("--seed", type=int, default=defaults.seed, help="the untrained model's initialisation")
    step.add_argument("--batch-size", type=int, default=100, help="prompts per generate call")

    step = commands.add_parser("speed", help="tokens/s of the 8B-shaped 4-layer model, packed SFT or pretraining")
    step.add_argument("--data", choices=("sft", "pretrain"), required=True)
    step.add_argument("--corpus", help="the chat corpus prefix (--data sft)")
    step.add_argument("--steps", type=int, default=15)
    step.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    step.add_argument("--layers", type=int, default=4)
    step.add_argument("--out", type=Path, required=True)

    step = commands.add_parser("summarize", help="OUT/sft.json from the steps' records")
    with_dirs(step)

    args = parser.parse_args(argv)
    if args.command == "prepare":
        spec = replace(defaults, seed=args.seed, train_conversations=args.train, heldout_conversations=args.heldout)
        recipe = replace(
            recipe_defaults, steps=args.steps, precision=args.precision, seed=args.seed, lr=args.lr, min_lr=args.lr / 10
        )
        prepare(SFTPaths(args.out_dir, args.work_dir), spec, recipe)
    elif args.command == "all-tokens-corpus":
        all_tokens_corpus(args.corpus, args.out_prefix)
    elif args.command == "evaluate":
        evaluate(SFTPaths(args.out_dir, args.work_dir), args.seed, args.batch_size)
    elif args.command == "speed":
        from benchmarks.lib.sft_speed import run_speed

        run_speed(args.data, args.out, corpus=args.corpus, layers=args.layers, steps=args.steps, warmup=args.warmup)
    else:
        record = summarize(SFTPaths(args.out_dir, args.work_dir))
        return 1 if record["missing"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
