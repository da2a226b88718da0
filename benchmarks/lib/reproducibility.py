"""Issue 30: do two runs of one configuration train bitwise alike, and does a resumed run train like the one that
never stopped? Which default makes them differ, and what does deterministic mode cost?

    python -m benchmarks.lib.reproducibility run --out OUT/process_a.json [--reverse]
    python -m benchmarks.lib.reproducibility summarize OUT/process_a.json OUT/process_b.json --out-dir OUT

``run`` trains the issue's configuration (the small Llama of the checkpoint tests: 4 layers, hidden 1024, vocab
32000; seq 2048, GBS 4, FP8 delayed scaling with FP8 weights, 10 steps) once per *candidate*, one after the other
in this process: today's defaults, today's defaults with one setting switched (``CANDIDATES``), and deterministic
mode (``Trainer(deterministic=True)``). The two modes also save a checkpoint at step 5, from which a fresh Trainer
resumes to step 10. Every run starts from the same seed and data with a fresh Trainer, model and optimizer,
Transformer Engine's FP8 state reset and the environment and PyTorch's deterministic flags as they were before it.
Per step it records the loss, the gradient norm, the step's seconds and a fingerprint of every weight at the step's
start (one float64 sum per tensor: equal iff the weights are, for all practical purposes); each run's record is
written as soon as it ends, so a run that fails or a stage that runs out of time leaves the others.

The ``reproducibility`` stage runs ``run`` in two processes, the second in reverse order (a candidate's two runs
then differ in process and in what ran before them), and ``summarize`` compares them bitwise:
``reproducibility.json`` (issue 30's format: card, steps, rows of mode, runs_bitwise_equal, resume_bitwise_equal,
max_loss_gap, s_per_step) and ``reproducibility_candidates.json`` (every candidate: equal or not, the first step
that differs, the largest loss gap; the candidates whose one switch made the runs equal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

#: The modes of issue 30's rows, by the candidate that runs each.
MODES = {"default": "default", "deterministic": "deterministic"}
#: Steps of every run, and the step whose checkpoint the resumed runs start from.
STEPS, SAVE_AT = 10, 5
#: Steps left out of a run's speed: the first two (kernel compilation, cuDNN plans) and the one after the save.
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Candidate:
    """One configuration: today's defaults with the changes below (none for ``default``)."""

    name: str
    #: What is switched, in words (the summary's ``change``).
    change: str
    #: Environment variables for this run only.
    env: dict[str, str] = field(default_factory=dict)
    #: ``LlamaConfig`` fields.
    arch: dict[str, Any] = field(default_factory=dict)
    #: ``MegatronCPStrategy`` arguments.
    strategy: dict[str, Any] = field(default_factory=dict)
    #: ``TEFP8Precision`` arguments; ``None``: BF16 (``MegatronPrecision``).
    precision: dict[str, Any] | None = field(default_factory=dict)
    #: ``Trainer(deterministic=True)``.
    deterministic: bool = False

    @property
    def resumes(self) -> bool:
        """Whether this candidate's run saves at ``SAVE_AT`` and a fresh Trainer resumes from there (the two modes)."""
        return self.name in MODES.values()


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("default", "today's defaults"),
    Candidate(
        "nondeterministic_algo_off",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 alone: Transformer Engine's deterministic attention backward",
        env={"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"},
    ),
    Candidate(
        "no_cross_entropy_fusion",
        "cross_entropy_fusion=False (Megatron's unfused cross entropy)",
        arch={"cross_entropy_fusion": False},
    ),
    Candidate(
        "no_gradient_accumulation_fusion",
        "gradient_accumulation_fusion=False",
        strategy={"gradient_accumulation_fusion": False},
    ),
    Candidate(
        "no_fp8_param_gather",
        "TEFP8Precision(fp8_param_gather=False): BF16 weights",
        precision={"fp8_param_gather": False},
    ),
    Candidate(
        "no_overlap",
        "overlap_grad_reduce=False, overlap_param_gather=False",
        strategy={"overlap_grad_reduce": False, "overlap_param_gather": False},
    ),
    Candidate("no_rope_fusion", "apply_rope_fusion=False", arch={"apply_rope_fusion": False}),
    Candidate("bf16", "BF16 instead of FP8 (MegatronPrecision)", precision=None),
    Candidate("deterministic", "Trainer(deterministic=True): deterministic mode", deterministic=True),
)
CANDIDATES_BY_NAME = {candidate.name: candidate for candidate in CANDIDATES}


# ---------------------------------------------------------------------------------------------- comparisons (CPU)
@dataclass(frozen=True)
class Comparison:
    """Two runs' per-step values side by side."""

    bitwise_equal: bool
    #: The largest absolute loss difference over the compared steps (0.0 when bitwise equal).
    max_loss_gap: float
    #: The first step (1-based, as training counts) whose loss, gradient norm or starting weights differ; None: none.
    first_differing_step: int | None


def compare_runs(a: dict[str, Any], b: dict[str, Any], first_step: int = 1) -> Comparison:
    """Compare two run records step by step from ``first_step`` on (a resumed run starts later): losses, gradient
    norms and the weights at each step's start, exactly; and the weights after the last step."""

    def steps_of(run: dict[str, Any], key: str) -> list[Any]:
        values = run.get(key) or []
        return values[first_step - run.get("first_step", 1) :]

    losses_a, losses_b = steps_of(a, "losses"), steps_of(b, "losses")
    length = min(len(losses_a), len(losses_b))
    gap = max((abs(x - y) for x, y in zip(losses_a, losses_b, strict=False)), default=0.0)
    first = None
    for key in ("fingerprints", "losses", "grad_norms"):  # the weights at a step's start come before its loss
        values_a, values_b = steps_of(a, key), steps_of(b, key)
        for index, (x, y) in enumerate(zip(values_a, values_b, strict=False)):
            if x != y:
                first = index + first_step if first is None else min(first, index + first_step)
                break
    same_length = len(losses_a) == len(losses_b) and length > 0
    final_equal = a.get("final_fingerprint") == b.get("final_fingerprint")
    equal = first is None and same_length and final_equal
    if first is None and not final_equal:
        first = first_step + length  # only the weights after the last step differ
    return Comparison(equal, gap, first)


def _ok(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if not run.get("error")]


def _step_seconds(runs: Iterable[dict[str, Any]], save_at: int) -> list[float]:
    """The step seconds of full runs, without the warm-up steps and the step after a save."""
    seconds = []
    for run in runs:
        start = run.get("first_step", 1)
        for index, value in enumerate(run.get("step_s") or []):
            step = start + index
            if step > WARMUP_STEPS and step != save_at + 1:
                seconds.append(value)
    return seconds


def candidate_summary(runs: Sequence[dict[str, Any]], resumes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One candidate: its runs compared pairwise, each resumed run against the full run of its own process."""
    good = _ok(runs)
    pairs = [compare_runs(a, b) for a, b in combinations(good, 2)]
    resumed = []
    for resume in resumes:
        full = next((run for run in good if run.get("process") == resume.get("process")), None)
        if full is None or resume.get("error"):
            resumed.append(None)
            continue
        resumed.append(compare_runs(full, resume, first_step=resume.get("first_step", 1)))
    seconds = _step_seconds(good, max((r.get("first_step", 1) - 1 for r in resumes), default=0))
    first_steps = [pair.first_differing_step for pair in pairs if pair.first_differing_step is not None]
    compared = [c for c in resumed if c is not None]  # a resume that failed is an error, not a difference
    resume_first = [c.first_differing_step for c in compared if c.first_differing_step is not None]
    return {
        "runs": len(good),
        "errors": [run["error"] for run in runs if run.get("error")] + [r["error"] for r in resumes if r.get("error")],
        # None: fewer than two runs finished, nothing to compare.
        "runs_bitwise_equal": all(pair.bitwise_equal for pair in pairs) if pairs else None,
        "max_loss_gap": max((pair.max_loss_gap for pair in pairs), default=None),
        "first_differing_step": min(first_steps, default=None),
        "resumes": len(compared),
        # None: no resumed run finished (or none was made), nothing to compare.
        "resume_bitwise_equal": all(c.bitwise_equal for c in compared) if compared else None,
        "resume_max_loss_gap": max((c.max_loss_gap for c in compared), default=None),
        "resume_first_differing_step": min(resume_first, default=None),
        "s_per_step": statistics.median(seconds) if seconds else None,
        "losses": [run.get("losses") for run in good],
    }


def summarize(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(reproducibility.json, reproducibility_candidates.json)`` from the processes' records."""
    runs = [dict(run, process=record.get("process")) for record in records for run in record.get("runs", [])]
    card = next((record.get("device") for record in records if record.get("device")), None)
    steps = next((record.get("steps") for record in records if record.get("steps")), STEPS)
    names = [c.name for c in CANDIDATES] + sorted({r["candidate"] for r in runs} - set(CANDIDATES_BY_NAME))
    candidates = {}
    for name in names:
        full = [run for run in runs if run["candidate"] == name and run["kind"] == "run"]
        resumes = [run for run in runs if run["candidate"] == name and run["kind"] == "resume"]
        if full or resumes:
            summary = candidate_summary(full, resumes)
            known = CANDIDATES_BY_NAME.get(name)
            candidates[name] = {"change": known.change if known else None, **summary}
    rows = []
    for mode, name in MODES.items():
        summary = candidates.get(name, {})
        rows.append(
            {
                "mode": mode,
                "runs_bitwise_equal": summary.get("runs_bitwise_equal"),
                "resume_bitwise_equal": summary.get("resume_bitwise_equal"),
                "max_loss_gap": summary.get("max_loss_gap"),
                "s_per_step": summary.get("s_per_step"),
            }
        )
    default = candidates.get("default", {})
    switches = [name for name in candidates if name not in MODES.values()]
    culprits = (
        [name for name in switches if candidates[name]["runs_bitwise_equal"]]
        if default.get("runs_bitwise_equal") is False
        else []
    )
    det, base = candidates.get("deterministic", {}).get("s_per_step"), default.get("s_per_step")
    details = {
        "card": card,
        "steps": steps,
        "config": next((record.get("config") for record in records if record.get("config")), None),
        "processes": [
            {"process": r.get("process"), "order": r.get("order"), "seconds": r.get("seconds")} for r in records
        ],
        # Today's defaults made the runs differ, and switching only these made them bitwise equal.
        "culprits": culprits,
        "deterministic_over_default_s_per_step": det / base if det and base else None,
        "candidates": candidates,
    }
    return {"card": card, "steps": steps, "rows": rows}, details


def write_summary(record_paths: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Read the processes' records, write ``reproducibility.json`` and ``reproducibility_candidates.json``, print the
    rows and the candidates' verdicts; returns the first."""
    records = [json.loads(path.read_text()) for path in record_paths if path.is_file()]
    missing = [str(path) for path in record_paths if not path.is_file()]
    reproducibility, details = summarize(records)
    details["missing_records"] = missing
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reproducibility.json").write_text(json.dumps(reproducibility, indent=2) + "\n")
    (out_dir / "reproducibility_candidates.json").write_text(json.dumps(details, indent=2) + "\n")
    print(json.dumps(reproducibility, indent=2))
    for name, summary in details["candidates"].items():
        print(
            f"{name:32} runs equal: {summary['runs_bitwise_equal']!s:5} first differing step: "
            f"{summary['first_differing_step']!s:4} max loss gap: {summary['max_loss_gap']} s/step: "
            f"{summary['s_per_step']} {summary['errors'] or ''}"
        )
    print(f"culprits: {details['culprits']}; missing records: {missing}")
    return reproducibility


# ---------------------------------------------------------------------------------------------- runs (GPU)
def _fingerprint(module: Any) -> list[float]:
    """One float64 sum per weight tensor (``float()`` dequantizes FP8 weights): equal iff nothing moved."""
    import torch

    with torch.no_grad():
        sums = torch.stack([p.detach().float().double().sum() for p in module.parameters()])
    return [float(value) for value in sums.cpu()]


def _probe() -> Any:
    """A callback recording per step the weights' fingerprint at its start, its loss, gradient norm and seconds."""
    from lightning.pytorch import Callback

    class StepRecord(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.grad_norms: list[float | None] = []
            self.step_s: list[float] = []
            self.fingerprints: list[list[float]] = []
            self.final_fingerprint: list[float] | None = None
            self.env: dict[str, str | None] = {}
            self._start = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # What the run trains with, after the strategy and Lightning set what their modes need.
            self.env = {name: os.environ.get(name) for name in _WATCHED}

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.fingerprints.append(_fingerprint(pl_module))  # before the clock starts (it waits for the GPU)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # Before ModelCheckpoint's save (Lightning runs checkpoint callbacks last); reading the loss waits for
            # the step's kernels.
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            self.step_s.append(time.perf_counter() - self._start)
            norm = trainer.callback_metrics.get("train/grad_norm")
            self.grad_norms.append(None if norm is None else float(norm))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.final_fingerprint = _fingerprint(pl_module)

    return StepRecord()


@dataclass
class RunSettings:
    """What every run of a process shares."""

    arch: str = "small"
    layers: int = 4
    seq: int = 2048
    gbs: int = 4
    steps: int = STEPS
    save_at: int = SAVE_AT
    lr_scale: float = 1.0
    ckpt_dir: Path = Path("/dev/shm/reproducibility")


def _train(candidate: Candidate, settings: RunSettings, save: bool, ckpt_path: Path | None) -> dict[str, Any]:
    """One ``fit`` of ``candidate``; ``save``: checkpoints every ``save_at`` steps; ``ckpt_path``: resume from it."""
    import dataclasses

    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from benchmarks.throughput import recipe_arch, small_arch
    from lightning_llama_fp8 import (
        LlamaLightningModule,
        MegatronCPStrategy,
        MegatronPrecision,
        MockDataModule,
        OptimizerSettings,
        TEFP8Precision,
    )

    seed_everything(1234)
    arch = (small_arch if settings.arch == "small" else recipe_arch)(settings.layers, settings.seq)
    arch = dataclasses.replace(arch, **candidate.arch)
    plugin = (
        MegatronPrecision()
        if candidate.precision is None
        else TEFP8Precision(**{"fp8_param_gather": True, **candidate.precision})
    )
    probe = _probe()
    callbacks: list[Any] = [probe]
    if save:
        callbacks.append(
            ModelCheckpoint(settings.ckpt_dir / candidate.name, every_n_train_steps=settings.save_at, save_top_k=-1)
        )
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy=MegatronCPStrategy(**candidate.strategy),
        plugins=[plugin],
        max_steps=settings.steps,
        callbacks=callbacks,
        deterministic=True if candidate.deterministic else None,
        logger=False,
        enable_checkpointing=save,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    scale = settings.lr_scale
    optimizer = OptimizerSettings(
        lr=1.5e-4 * scale,
        min_lr=1e-5 * scale,
        warmup_steps=2,
        decay_steps=settings.steps,
        decoupled_lr=5e-4 * scale,
        decoupled_min_lr=4.5e-5 * scale,
    )
    module = LlamaLightningModule(arch, optimizer)
    data = MockDataModule(seq_length=settings.seq, vocab_size=arch.vocab_size, global_batch_size=settings.gbs)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    record = {
        "first_step": settings.save_at + 1 if ckpt_path is not None else 1,
        "steps_done": trainer.global_step,
        "losses": probe.losses,
        "grad_norms": probe.grad_norms,
        "step_s": probe.step_s,
        "fingerprints": probe.fingerprints,
        "final_fingerprint": probe.final_fingerprint,
        "env_during_run": probe.env,
        "deterministic_mode": getattr(trainer.strategy, "deterministic_mode", None) is not None
        and trainer.strategy.deterministic_mode.on,
        "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
        "cross_entropy": arch.cross_entropy_impl,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del trainer, module
    return record


def _isolated_run(candidate: Candidate, settings: RunSettings, kind: str, process: str) -> dict[str, Any]:
    """One run with the process state put back afterwards: environment, PyTorch's deterministic flags, TE's FP8
    state, freed GPU memory. A failure is recorded, not raised."""
    import gc

    import torch

    environ = dict(os.environ)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    resume_from = None
    if kind == "resume":
        resume_from = settings.ckpt_dir / candidate.name / f"epoch=0-step={settings.save_at}.ckpt"
    record: dict[str, Any] = {"candidate": candidate.name, "kind": kind, "process": process}
    start = time.perf_counter()
    try:
        _reset_transformer_engine_fp8_state()
        torch.cuda.reset_peak_memory_stats()
        os.environ.update(candidate.env)
        record["env"] = {name: os.environ.get(name) for name in sorted({*candidate.env, *_WATCHED})}
        record.update(_train(candidate, settings, save=candidate.resumes and kind == "run", ckpt_path=resume_from))
        record["error"] = None
    except Exception as err:  # one candidate failing must not cost the others their evidence
        record["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        record["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        _reset_transformer_engine_fp8_state()
        gc.collect()
        torch.cuda.empty_cache()
    record["seconds"] = time.perf_counter() - start
    return record


#: Variables worth seeing in each run's record.
_WATCHED = (
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO",
    "CUBLAS_WORKSPACE_CONFIG",
    "NCCL_ALGO",
    "NVTE_FLASH_ATTN",
    "NVTE_FUSED_ATTN",
)


def _reset_transformer_engine_fp8_state() -> None:
    """Transformer Engine's global FP8 state as a fresh process has it (as the GPU tests do between fits)."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()


def run_plan(candidates: Sequence[Candidate], settings: RunSettings, reverse: bool) -> list[str]:
    """The runs :func:`run_candidates` makes, in order, one line each (what ``run --dry-run`` prints)."""
    lines = []
    for candidate in reversed(candidates) if reverse else candidates:
        lines.append(f"{candidate.name}: {settings.steps} steps; {candidate.change}")
        if candidate.resumes:
            where = settings.ckpt_dir / candidate.name
            lines[-1] += f"; checkpoints every {settings.save_at} steps into {where}"
            lines.append(f"{candidate.name}: resumed from step {settings.save_at} to {settings.steps}")
    return lines


def run_candidates(
    candidates: Sequence[Candidate], settings: RunSettings, out: Path, process: str, reverse: bool
) -> dict[str, Any]:
    """Every candidate once (the modes with a resume after their run), writing ``out`` after each run."""
    import torch

    order = list(reversed(candidates)) if reverse else list(candidates)
    record: dict[str, Any] = {
        "process": process,
        "device": torch.cuda.get_device_name(),
        "steps": settings.steps,
        "order": [candidate.name for candidate in order],
        "config": {
            "arch": settings.arch,
            "layers": settings.layers,
            "seq_length": settings.seq,
            "global_batch_size": settings.gbs,
            "micro_batch_size": 1,
            "steps": settings.steps,
            "save_at": settings.save_at,
            "lr_scale": settings.lr_scale,
            "precision": "fp8 delayed, fp8_param_gather",
        },
        "runs": [],
    }
    start = time.perf_counter()
    shutil.rmtree(settings.ckpt_dir, ignore_errors=True)
    for candidate in order:
        kinds = ("run", "resume") if candidate.resumes else ("run",)
        for kind in kinds:
            run = _isolated_run(candidate, settings, kind, process)
            record["runs"].append(run)
            record["seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(record, indent=1) + "\n")
            print(
                f"[{process}] {candidate.name} {kind}: {run['seconds']:.1f} s, losses {run.get('losses')}, "
                f"error {run.get('error')}",
                flush=True,
            )
        shutil.rmtree(settings.ckpt_dir / candidate.name, ignore_errors=True)
    return record


# ---------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lib.reproducibility", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every candidate once in this process; one JSON record")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--process", default="a", help="this process's name in the record")
    run.add_argument("--reverse", action="store_true", help="the candidates in reverse order")
    run.add_argument("--only", nargs="+", choices=sorted(CANDIDATES_BY_NAME), help="these candidates only")
    run.add_argument(
        "--arch",
        choices=("small", "recipe"),
        default="small",
        help="small: the checkpoint tests' Llama (the issue's); recipe: Llama-3-8B layer shapes",
    )
    run.add_argument("--layers", type=int, default=4)
    run.add_argument("--seq", type=int, default=2048)
    run.add_argument("--gbs", type=int, default=4)
    run.add_argument("--steps", type=int, default=STEPS)
    run.add_argument("--save-at", type=int, default=SAVE_AT, help="the step the resumed runs start from")
    run.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the recipe's learning rates")
    run.add_argument("--ckpt-dir", type=Path, default=RunSettings.ckpt_dir)
    run.add_argument("--dry-run", action="store_true", help="print the runs in order; train nothing")
    summary = commands.add_parser("summarize", help="compare the processes' records; write the two summaries")
    summary.add_argument("records", nargs="+", type=Path)
    summary.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "summarize":
        write_summary(args.records, args.out_dir)
        return 0
    if not 0 < args.save_at < args.steps:
        parser.error(f"--save-at must be between 1 and --steps - 1 ({args.steps - 1}); got {args.save_at}")
    # PyTorch reads the cuBLAS workspace setting its deterministic mode checks once, at the first GEMM of the
    # process: set before any run, as Trainer(deterministic=True) would set it before a training script's first GEMM.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # the recipe's setting, before CUDA starts
    settings = RunSettings(
        args.arch, args.layers, args.seq, args.gbs, args.steps, args.save_at, args.lr_scale, args.ckpt_dir
    )
    candidates = [CANDIDATES_BY_NAME[name] for name in args.only] if args.only else list(CANDIDATES)
    if args.dry_run:
        print(f"settings: {settings}")
        for line in run_plan(candidates, settings, args.reverse):
            print(line)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = run_candidates(candidates, settings, args.out, args.process, args.reverse)
    return 1 if any(run.get("error") for run in record["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
