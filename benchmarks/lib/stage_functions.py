"""The GPU stages that loop over runs or summarise them, as functions of a ``StageSession``.

Each function is one step of a stage of ``benchmarks/stages.py``. It runs its commands through the session (so
time limits, logs and dry runs work alike in every stage) and writes the stage's summary JSON with a function of
its own, run in the runner's process (``session.call``); the summaries read the records the runs wrote.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.lib.stage_run import StageSession, StageUsageError

MEGATRON_LM_BASELINE = "benchmarks/scripts/megatron_lm_baseline.sh"
CAST_PROBE = "benchmarks/scripts/cast_probe.py"
UNGUARDED_SCRIPT = "benchmarks/scripts/train_unguarded.py"
#: The environment of the checkpoint-stall run ``async_host_register``: torch's cudaHostRegister-based pinned
#: allocator (it pins faster but copies slower than the default one, so it is not among the default runs).
#: The GPU test files, run one pytest process each: in one process, earlier tests' GPU memory, environment variables
#: and ports stay behind and fail later tests on an 80 GB card
#: (benchmarks/results/2026-12-07-h100-gpu-tests-after-layout/).
GPU_TESTS = Path(__file__).resolve().parents[2] / "tests" / "gpu"

HOST_REGISTER_ALLOC_CONF = "PYTORCH_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


# ---------------------------------------------------------------------------------------------- console helpers
def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log (``tail -N``); empty when there is none."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def _tail_bytes(path: Path, size: int) -> str:
    """The last ``size`` bytes of a file (``tail -c N``)."""
    return path.read_bytes()[-size:].decode(errors="replace").rstrip("\n") if path.is_file() else ""


def _grep(path: Path, pattern: str) -> str:
    """The lines of a log that match ``pattern`` (``grep -E``)."""
    if not path.is_file():
        return ""
    return "\n".join(line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line))


def _count_warnings(path: Path) -> str:
    """How many lines of a log mention a warning (``grep -c -i warn``)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return str(sum(1 for line in text.splitlines() if "warn" in line.lower()))


# ---------------------------------------------------------------------------------------------- full-8b-1gpu
def full_8b_one_gpu(session: StageSession) -> None:
    """All 32 layers on one GPU with full recompute and half the optimizer on the CPU; then without offload."""
    # One process per run (the 8B build dominates start-up: GPU init, no CPU init); expandable segments so a
    # fragmented cache does not decide whether it fits.
    session.export("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    runs = session.out / "full_8b"
    session.mkdir(runs)

    def run_8b(name: str, limit_s: int, flags: str) -> None:
        log = runs / f"{name}.log"
        code = session.run(
            session.words(
                "python3 -m benchmarks.throughput --layers 32 --gbs 8 --recompute full --recompute-method uniform "
                "--recompute-num-layers 1 --out {runs}/{name}.json {*flags}",
                runs=runs,
                name=name,
                flags=flags,
            ),
            log=log,
            limit_s=limit_s,
        )
        last = _tail_bytes(log, 600).splitlines()
        session.say(f"{name}: exit {code}, {last[-1] if last else ''}")

    run_8b("offload_0.5", 330, "--steps 6 --warmup 3 --optimizer-offload-fraction 0.5")
    session.note("only when offload_0.5 left no record and the stage is under 200 s in: the same with BF16 weights")
    if not (runs / "offload_0.5.json").is_file() and int(session.elapsed_s()) < 200:  # FP8 weights + offload failed
        bf16_weights = "--steps 6 --warmup 3 --optimizer-offload-fraction 0.5 --no-fp8-param-gather"
        run_8b("offload_0.5_bf16_weights", 300, bf16_weights)
    session.note("only when the stage is under 330 s in: no offload (expected not to fit), until 500 s in")
    if int(session.elapsed_s()) < 330:
        run_8b("no_offload", 500 - int(session.elapsed_s()), "--steps 4 --warmup 2 --allow-oom")
    session.call(summarize_full_8b, session.out)


def summarize_full_8b(out: Path) -> None:
    """``full_8b_one_gpu.json``: whether the offloaded 8B fits one GPU, its peak and speed, and every run's record."""
    runs = {path.stem: json.loads(path.read_text()) for path in (out / "full_8b").glob("*.json")}
    main = runs.get("offload_0.5") or runs.get("offload_0.5_bf16_weights")
    keys = (
        "fits", "peak_memory_gib", "peak_reserved_gib", "plan_gib", "plan_host_gib", "tokens_per_sec_per_gpu",
        "median_step_time_s", "fp8_param_gather", "error", "steps_done",
    )  # fmt: skip
    summary = {
        "card": (main or next(iter(runs.values()), {})).get("device"),
        "fits": bool(main and main.get("fits")),
        "recompute": (main or {}).get("recompute"),
        "cpu_offload": {"optimizer_offload_fraction": (main or {}).get("optimizer_offload_fraction")},
        "peak_gib": (main or {}).get("peak_memory_gib"),
        "plan_gib": (main or {}).get("plan_gib"),
        "tokens_per_s": (main or {}).get("tokens_per_sec_per_gpu"),
        "runs": {name: {key: run.get(key) for key in keys} for name, run in runs.items()},
    }
    _write_summary(out / "full_8b_one_gpu.json", summary)


# ---------------------------------------------------------------------------------------------- one-gpu-8b
#: Issue 28's settings of the full 8B on one GPU, by row name: what differs from the defaults (32 layers, seq 8192,
#: MBS 1, GBS 8, FP8 delayed, FP8 weights, Megatron's default optimizer, no recompute).
ONE_GPU_8B_ROWS: dict[str, str] = {
    "bf16_moments": "--no-fp8-param-gather --optimizer-precision bf16",
    "bf16_moments_current": "--no-fp8-param-gather --optimizer-precision bf16 --recipe current",
    "bf16_moments_block4": "--no-fp8-param-gather --optimizer-precision bf16 --recompute full --recompute-method block "
    "--recompute-num-layers 4",
    "offload_0.5": "--recompute full --recompute-method uniform --recompute-num-layers 1 "
    "--optimizer-offload-fraction 0.5",
}
#: Rows run only when another row did not fit: row -> the row it stands in for.
ONE_GPU_8B_FALLBACKS: dict[str, str] = {"bf16_moments_block4": "bf16_moments"}


def one_gpu_8b(session: StageSession) -> None:
    """The full 8B on one GPU in each setting of ONE_GPU_8B_ROWS, ONE_GPU_8B_STEPS steps each, while the stage has
    time for the next (its estimated seconds, ONE_GPU_8B_ROW_S; a fallback row only where the row it stands in for did
    not fit); then ``one_gpu_8b.json``."""
    session.export("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    runs = session.out / "one_gpu_8b"
    session.mkdir(runs)
    steps = int(session.knob("ONE_GPU_8B_STEPS"))
    estimates = dict(item.split("=") for item in session.knob("ONE_GPU_8B_ROW_S").split())
    for name in session.knob("ONE_GPU_8B_ROWS").split():
        instead_of = ONE_GPU_8B_FALLBACKS.get(name)
        if instead_of is not None and _fitted(runs / f"{instead_of}.json"):
            session.say(f"{name}: not needed, {instead_of} fits")
            continue
        needed = int(estimates.get(name, "240"))
        if session.elapsed_s() + needed > session.stage.limit_s - 10:
            session.say(f"{name}: skipped, {needed} s estimated and {session.elapsed_s():.0f} s of the stage spent")
            continue
        log = runs / f"{name}.log"
        code = session.run(
            session.words(
                "python3 -m benchmarks.throughput --layers 32 --gbs 8 --steps {steps} --warmup 4 --allow-oom "
                "--out {runs}/{name}.json {*flags}",
                steps=str(steps),
                runs=runs,
                name=name,
                flags=ONE_GPU_8B_ROWS[name],
            ),
            log=log,
            check=False,
        )
        last = _tail_bytes(log, 600).splitlines()
        session.say(f"{name}: exit {code}, {last[-1] if last else ''}")
    session.call(summarize_one_gpu_8b, session.out)


def _fitted(record: Path) -> bool:
    return record.is_file() and bool(json.loads(record.read_text()).get("fits"))


def summarize_one_gpu_8b(out: Path) -> None:
    """``one_gpu_8b.json``: the card and one row per setting run (settings, tokens/s, peak and planned memory)."""
    rows = []
    card = None
    for path in sorted((out / "one_gpu_8b").glob("*.json")):
        run = json.loads(path.read_text())
        card = card or run.get("device")
        rows.append(
            {
                "name": path.stem,
                "settings": ONE_GPU_8B_ROWS.get(path.stem, ""),
                "fits": run.get("fits"),
                "tokens_per_s": run.get("tokens_per_sec_per_gpu"),
                "median_step_time_s": run.get("median_step_time_s"),
                "timed_steps": run.get("timed_steps"),
                "peak_gib": run.get("peak_memory_gib"),
                "peak_reserved_gib": run.get("peak_reserved_gib"),
                "plan_gib": run.get("plan_gib"),
                "plan_host_gib": run.get("plan_host_gib"),
                "host_peak_rss_gib": run.get("host_peak_rss_gib"),
                "mfu_tflops_per_gpu": run.get("tflops_per_gpu"),
                "losses": run.get("losses"),
                "error": run.get("error"),
            }
        )
    _write_summary(out / "one_gpu_8b.json", {"card": card, "rows": rows})


# ---------------------------------------------------------------------------------------------- telemetry
def telemetry(session: StageSession) -> None:
    """ThroughputMonitor's CSV log and Megatron-LM's log of the same run; the 1B config as a user runs it; a script
    without a main guard that saves distributed checkpoints."""
    t = session.out / "telemetry"
    session.mkdir(t)
    session.run(
        session.words(
            "python3 -m benchmarks.throughput --precision fp8 --layers 4 --steps 30 --warmup 10 --log-dir {t}/ours_csv "
            "--out {t}/ours_fp8.json",
            t=t,
        ),
        log=t / "ours_fp8.log",
        tail=1,
    )
    lm_settings = {"PRECISION": "fp8", "NPROC": "1", "NUM_LAYERS": "4", "GBS": "8", "ITERS": "30"}
    session.run(["bash", MEGATRON_LM_BASELINE], env=lm_settings, log=t / "megatron_lm_fp8.log")
    session.say(_grep(t / "megatron_lm_fp8.log", r"iteration +30/"))
    # The console a user sees (stdout and stderr apart), and the TensorBoard log with throughput/* and fp8/*.
    # 30 steps: no validation, no checkpoint (the config saves every 100).
    code = session.run(
        session.words(
            "python3 -m lightning_llama_fp8.cli fit --config examples/configs/llama3_1b_1gpu_fp8.yaml "
            "--trainer.max_steps 30 --trainer.logger.init_args.save_dir {t}/tb",
            t=t,
        ),
        stdout=t / "fit_1b.stdout",
        stderr=t / "fit_1b.stderr",
    )
    session.say(f"fit exit {code}")
    session.say(_tail_bytes(t / "fit_1b.stdout", 600))
    session.say(_count_warnings(t / "fit_1b.stderr"))
    # A plain script without a main guard that saves distributed checkpoints (it hung before the fix); its
    # checkpoints outside OUT, where they would make the returned archive too large.
    script, checkpoints = t / "train_unguarded.py", Path("/tmp/unguarded_ckpts")
    session.copy(UNGUARDED_SCRIPT, script)
    session.remove_tree(checkpoints)
    code = session.run(["python3", script, checkpoints], log=t / "unguarded.log", limit_s=300)
    session.say(f"unguarded exit {code}")
    session.say(_grep(t / "unguarded.log", r"^(top level|saved)"))
    session.remove_tree(checkpoints)


# ---------------------------------------------------------------------------------------------- real-text
def real_text(session: StageSession) -> None:
    """Text files installed on the GPU machine -> ``llama-fp8 preprocess`` -> the 1B text example and the same
    config on mock data -> ``real_text_training.json``."""
    t = session.out / "real_text"
    session.mkdir(t)
    real_text_corpus(session, t)
    session.call(write_real_text_configs, t)
    fit_each(session, t, ("real", "mock"))
    card = card_name(session)
    session.run(
        session.words(
            "python3 -m benchmarks.real_text training --real-csv {t}/real_csv/run/version_0/metrics.csv "
            "--mock-csv {t}/mock_csv/run/version_0/metrics.csv --corpus-json {t}/corpus.json "
            "--sidecar {t}/real_text.corpus.json --max-steps 300 --card {card} --out {t}/real_text_training.json",
            t=t,
            card=card,
        )
    )


#: The real-text corpus (``real_text_corpus``): ``<prefix>.bin`` / ``.idx`` / ``.corpus.json``.
REAL_TEXT = "/tmp/real_text"


def real_text_corpus(session: StageSession, t: Path) -> None:
    """The real-text corpus at :data:`REAL_TEXT`: every UTF-8 .py/.md/.rst/.txt file of the machine's site-packages
    (100 to 200 MB, one document per file), tokenized with ``llama-fp8 preprocess``; what went in and the sidecar
    into ``t``."""
    site = session.capture(
        ["python3", "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        placeholder="<site-packages>",
    ).rstrip("\n")
    session.run(
        session.words(
            "python3 -m benchmarks.real_text corpus --root {site} --min-mb 100 --max-mb 200 --out {corpus}.jsonl "
            "--describe {t}/corpus.json",
            site=site,
            t=t,
            corpus=REAL_TEXT,
        )
    )
    code = session.run(
        session.words(
            "python3 -m lightning_llama_fp8.cli preprocess --input {corpus}.jsonl --output-prefix {corpus} "
            "--workers 16 --overwrite",
            corpus=REAL_TEXT,
        ),
        log=t / "preprocess.log",
    )
    session.say(f"preprocess exit {code}")
    session.say(_tail(t / "preprocess.log", 2))
    session.copy(Path(f"{REAL_TEXT}.corpus.json"), t / "real_text.corpus.json")


def example_run_config(source: str, d: Path, name: str, steps: int, real_text: bool = True) -> dict[str, Any]:
    """``examples/configs/<source>.yaml`` as a user runs it, for a timed run ``name``: ``steps`` steps, validation every
    50, no checkpoints (time), a CSV log under ``d/<name>_csv`` and, with ``real_text``, the real-text corpus."""
    import yaml

    config = yaml.safe_load(Path(f"examples/configs/{source}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=50, enable_checkpointing=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": f"{d}/{name}_csv", "name": "run"},
    }
    if real_text:
        config["data"]["init_args"].update(data_path=[REAL_TEXT], path_to_cache="/tmp/real_text_cache")
    return config


def write_config(d: Path, name: str, config: dict[str, Any]) -> None:
    import yaml

    (d / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def fit_each(session: StageSession, d: Path, names: list[str] | tuple[str, ...], *, concurrently: bool = False) -> None:
    """``llama-fp8 fit --config d/<name>.yaml`` for each name, its stdout and stderr beside the config; with
    ``concurrently`` all at once on the one GPU (for runs compared by their losses, not their speed)."""

    def fit(name: str) -> int:
        return session.run(
            ["python3", "-m", "lightning_llama_fp8.cli", "fit", "--config", d / f"{name}.yaml"],
            stdout=d / f"fit_{name}.stdout",
            stderr=d / f"fit_{name}.stderr",
        )

    if concurrently and names:
        if "MASTER_PORT" in session.env:  # each fit must find its own free port (Lightning does when it is unset)
            raise StageUsageError("runs started together cannot share the exported MASTER_PORT: unset it")
        # An interrupt stops the stage's main thread only; each run's own time limit (the stage's) ends the others.
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            codes = list(pool.map(fit, names))
    else:
        codes = [fit(name) for name in names]
    for name, code in zip(names, codes, strict=True):
        session.say(f"fit {name} exit {code}")
        session.say(_tail_bytes(d / f"fit_{name}.stderr", 400))


def card_name(session: StageSession) -> str:
    """The GPU's name as nvidia-smi gives it."""
    return session.capture(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], max_lines=1, placeholder="<GPU name>"
    ).rstrip("\n")


def write_real_text_configs(t: Path) -> None:
    """The two example configs as a user runs them, minus checkpoints (time), with CSV logs for the summary."""
    write_config(t, "real", example_run_config("llama3_1b_text", t, "real", 300))
    write_config(t, "mock", example_run_config("llama3_1b_1gpu_fp8", t, "mock", 200, real_text=False))


# ---------------------------------------------------------------------------------------------- document masking
def document_masking(session: StageSession) -> None:
    """Issue 27 in one call: the isolation and equivalence test on real documents (its record lands in OUT), the real
    corpus, then per precision Megatron-LM masked, ours masked and ours unmasked on it; ``document_masking.json``."""
    d = session.out / "document_masking"
    session.mkdir(d)
    session.run(
        session.words("python3 -m pytest -m gpu -q tests/gpu/test_document_masking.py -p no:cacheprovider"),
        log=d / "tests.log",
        tail=3,
    )
    real_text_corpus(session, d)
    session.run(
        session.words(
            "python3 -m benchmarks.compare_megatron_lm --out-dir {d}/speed --precisions {*MASKING_PRECISIONS} "
            "--data-path {corpus} --masking-rows --layers 4 --gbs 8 --steps {MASKING_STEPS} --warmup {MASKING_WARMUP}",
            d=d,
            corpus=REAL_TEXT,
        ),
        log=d / "speed.log",
        tail=8,
    )
    session.call(
        summarize_document_masking,
        session.out / "document_masking_isolation.json",
        d / "speed" / "document_masking_speed.json",
        session.out / "document_masking.json",
    )


def summarize_document_masking(isolation_path: Path, speed_path: Path, summary_path: Path) -> None:
    """``document_masking.json``: the isolation and equivalence numbers of the GPU test and the speed rows, with the
    card each came from (one call: the same card)."""
    isolation = json.loads(isolation_path.read_text()) if isolation_path.is_file() else {}
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    bitwise = {name: run for name, run in isolation.get("isolation", {}).items() if name != "fp8_current"}
    keep = ("precision", "masking", "ours_s_per_step", "megatron_lm_s_per_step", "ours_over_megatron_lm",
            "masked_s_over_unmasked_s", "ours_peak_gib", "megatron_lm_peak_gib", "plan_gib")  # fmt: skip
    summary = {
        "card": speed.get("card") or isolation.get("card"),
        "isolation_max_abs_diff": max((run["other_documents_max_abs_diff"] for run in bitwise.values()), default=None),
        "isolation_by_precision": isolation.get("isolation"),
        "alone_vs_packed_max_abs_diff": isolation.get("alone_vs_packed_max_abs_diff"),
        "bf16_vs_fp32_alone_max_abs_diff": isolation.get("bf16_vs_fp32_alone_max_abs_diff"),
        "documents": isolation.get("documents"),
        "rows": [{key: row.get(key) for key in keep} for row in speed.get("rows", [])],
        "speed_config": speed.get("config"),
        "isolation_card": isolation.get("card"),
        "note": "isolation_max_abs_diff: over BF16 and the FP8 recipes with per-token or fixed scales (delayed, "
        "blockwise); FP8 current scaling shares one per-tensor scale over all documents (isolation_by_precision). "
        "Rows: s/step medians after the warm-up steps, the same corpus for both sides.",
    }
    _write_summary(summary_path, summary)


def document_masking_training(session: StageSession) -> None:
    """Issue 27: the 1B text example on the real corpus with document masking on and off, MASKING_TRAIN_STEPS steps
    each with validation every 50; both validation curves as JSON and SVG."""
    d = session.out / "document_masking_training"
    session.mkdir(d)
    real_text_corpus(session, d)
    session.call(write_document_masking_configs, d, int(session.knob("MASKING_TRAIN_STEPS")))
    fit_each(session, d, ("masked", "unmasked"))
    card = card_name(session)
    session.run(
        session.words(
            "python3 -m benchmarks.real_text masking --masked-csv {d}/masked_csv/run/version_0/metrics.csv "
            "--unmasked-csv {d}/unmasked_csv/run/version_0/metrics.csv --corpus-json {d}/corpus.json "
            "--max-steps {MASKING_TRAIN_STEPS} --card {card} --out-dir {d}",
            d=d,
            card=card,
        )
    )


def write_document_masking_configs(d: Path, steps: int) -> None:
    """The 1B text example as a user runs it on the real corpus, masked and unmasked: no checkpoints (time), CSV
    logs, validation every 50 steps."""
    for name, masking in (("masked", True), ("unmasked", False)):
        config = example_run_config("llama3_1b_text", d, name, steps)
        config["data"]["init_args"]["document_masking"] = masking
        write_config(d, name, config)


# ---------------------------------------------------------------------------------------------- moments-check
#: Issue 28's loss check of bf16 Adam moments: run name -> (seed, optimizer_precision init_args or None).
MOMENTS_RUNS: dict[str, tuple[int, dict[str, str] | None]] = {
    "default": (1234, None),
    "default_seed2": (4321, None),
    "bf16_moments": (1234, {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}),
}


def moments_check(session: StageSession) -> None:
    """Issue 28: the 1B text example on the real corpus, MOMENTS_STEPS steps per run in MOMENTS_RUN_NAMES (validation
    every 50); each run's CSV log under ``moments/<name>_csv``; with all three here, ``moments_check.json`` + SVG."""
    d = session.out / "moments"
    session.mkdir(d)
    real_text_corpus(session, d)
    names = session.knob("MOMENTS_RUN_NAMES").split()
    session.call(write_moments_configs, d, int(session.knob("MOMENTS_STEPS")), " ".join(names))
    fit_each(session, d, names, concurrently=session.knob("MOMENTS_CONCURRENT") == "1")
    if set(names) != set(MOMENTS_RUNS):
        session.note("not all three runs here: summarize later with python -m benchmarks.real_text moments")
        return
    card = card_name(session)
    runs = [f"--run={name}={d}/{name}_csv/run/version_0/metrics.csv" for name in names]
    session.run(["python3", "-m", "benchmarks.real_text", "moments", *runs, "--card", card, "--out-dir", str(d)])


def write_moments_configs(d: Path, steps: int, names: str) -> None:
    """The 1B text example on the real corpus, one config per run of ``names``: its seed and optimizer state; no
    checkpoints (time), CSV logs, validation every 50 steps."""
    for name in names.split():
        seed, optimizer_precision = MOMENTS_RUNS[name]
        config = example_run_config("llama3_1b_text", d, name, steps)
        config["seed_everything"] = seed
        # Its own sample-index cache: runs started together would otherwise write the same files at once.
        config["data"]["init_args"]["path_to_cache"] = f"/tmp/real_text_cache_{name}"
        config["trainer"]["strategy"].setdefault("init_args", {})["optimizer_precision"] = optimizer_precision
        write_config(d, name, config)


# ---------------------------------------------------------------------------------------------- checkpoint-stall
def checkpoint_stall(session: StageSession) -> None:
    """Synchronous and background checkpoint saves of the 4-layer model: seconds blocked, tokens/s meanwhile."""
    c = session.out / "checkpoint_stall"
    session.mkdir(c)
    # The sync saves block for tens of seconds each, so they come 10 steps apart; the async ones far enough apart
    # for the first background write to be published before the second save (else that save waits for it, which
    # counts as blocked). /dev/shm (RAM) by default: the measured machine's disk held one checkpoint only.
    checkpoints = Path(session.knob("CKPT_STALL_DIR"))
    every = int(session.knob("CKPT_ASYNC_EVERY"))
    saves = int(session.knob("CKPT_ASYNC_SAVES"))
    for run in session.knob("CKPT_STALL_RUNS").split():
        session.remove_tree(checkpoints)  # one run's checkpoints at a time: the disk holds two of them at most
        if run == "sync":
            command = session.words(
                "python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps 22 --warmup 6 "
                "--save-every 10 --save-mode sync --ckpt-dir {checkpoints}/sync --out {c}/sync.json",
                checkpoints=checkpoints,
                c=c,
            )
        else:
            command = session.words(
                "env {*env} python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps {steps} "
                "--warmup 6 --save-every {every} --save-mode async --ckpt-dir {checkpoints}/async --out {c}/{run}.json",
                env=[HOST_REGISTER_ALLOC_CONF] if run == "async_host_register" else [],
                steps=str(saves * every),
                every=str(every),
                checkpoints=checkpoints,
                c=c,
                run=run,
            )
        code = session.run(command, log=c / f"{run}.log")
        session.say(f"{run} exit {code}")
    session.remove_tree(checkpoints)
    session.call(summarize_checkpoint_stall, c, session.out / "checkpoint_stall.json")


def summarize_checkpoint_stall(c: Path, summary_path: Path) -> None:
    """``checkpoint_stall.json``: one row per save mode, from the checkpoint part of each run's record."""
    rows, card = [], None
    settings = {"async_host_register": HOST_REGISTER_ALLOC_CONF}
    for name in ("sync", "async", "async_host_register"):
        mode = name.split("_")[0]
        path = c / f"{name}.json"
        if not path.is_file():
            if (c / f"{name}.log").is_file():
                rows.append({"mode": mode, "settings": settings.get(name), "error": f"no record; see {name}.log"})
            continue
        record = json.loads(path.read_text())
        card, checkpoint = record["device"], record["checkpoint"]
        rows.append(
            {
                "mode": mode,
                "settings": settings.get(name),
                "checkpoint_gib": checkpoint["checkpoint_gib"],
                "blocked_s": max(checkpoint["blocked_s"]) if checkpoint["blocked_s"] else None,  # the worse save
                "blocked_s_per_save": checkpoint["blocked_s"],
                # None for sync: no steps run during its write
                "tokens_per_s_during_write_ratio": checkpoint["tokens_per_s_during_write_ratio"],
                "tokens_per_s_normal": checkpoint["tokens_per_s_normal"],
                "tokens_per_s_during_write": checkpoint["tokens_per_s_during_write"],
                "steps_during_write": checkpoint["steps_during_write"],
                "exit_wait_s": checkpoint["exit_wait_s"],
                "saves": checkpoint["saves"],
                "host_reserve": checkpoint.get("host_reserve"),  # the pinning ahead of the first async save
                # Async: the part of each save's block that waited for the previous background write, each write's
                # seconds, its speed, and the save interval that would not have waited.
                "waited_for_previous_s_per_save": checkpoint.get("waited_for_previous_s"),
                "write_s_per_save": checkpoint.get("write_s"),
                "write_gib_per_s": _write_speed(checkpoint),
                "shortest_nonblocking_interval_steps": checkpoint.get("shortest_nonblocking_interval_steps"),
            }
        )
    _write_summary(summary_path, {"card": card, "rows": rows})


def _write_speed(checkpoint: dict[str, Any]) -> float | None:
    """GiB/s of the background writes: the checkpoint's size over the median write time (None: no write timed)."""
    writes = [seconds for seconds in checkpoint.get("write_s") or [] if seconds]
    return checkpoint["checkpoint_gib"] / statistics.median(writes) if writes else None


# ---------------------------------------------------------------------------------------------- reproducibility
#: The repro processes' environment: PyTorch checks the cuBLAS workspace setting of its deterministic mode once per
#: process, at the first GEMM, so it is set from the start for every run (a script with Trainer(deterministic=True)
#: has it before its first GEMM too); Transformer Engine logs which attention backend each selection picked.
REPRO_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_DEBUG": "1", "NVTE_DEBUG_LEVEL": "1"}


def reproducibility(session: StageSession) -> None:
    """Issue 30: the candidates of ``benchmarks.lib.reproducibility`` in two processes (the second in reverse order),
    compared bitwise; then deterministic mode against the default at the recipe's shapes (seconds per step)."""
    r = session.out / "reproducibility"
    session.mkdir(r)
    checkpoints = Path(session.knob("REPRO_CKPT_DIR"))
    records = []
    for process, order in (("a", []), ("b", ["--reverse"])):
        log = r / f"process_{process}.log"
        records.append(r / f"process_{process}.json")
        code = session.run(
            session.words(
                "python3 -m benchmarks.lib.reproducibility run --process {process} {*order} --ckpt-dir {ckpt} "
                "--out {record} {*REPRO_ARGS}",
                process=process,
                order=order,
                ckpt=checkpoints / process,
                record=records[-1],
            ),
            env=REPRO_ENV,
            log=log,
        )
        session.say(f"process {process} exit {code}")
        session.say(_grep(log, r"Running with|^\[[ab]\] "))
    session.remove_tree(checkpoints)
    session.run(["python3", "-m", "benchmarks.lib.reproducibility", "summarize", *records, "--out-dir", session.out])
    layers = session.knob("REPRO_COST_LAYERS")
    session.note("only when REPRO_COST_LAYERS is not 0: the cost of deterministic mode at the recipe's shapes")
    if layers != "0":
        for name, flags in (("default", []), ("deterministic", ["--deterministic"])):
            code = session.run(
                session.words(
                    "python3 -m benchmarks.throughput --precision fp8 --layers {layers} --gbs 8 --steps 12 --warmup 5 "
                    "{*flags} --out {r}/cost_{name}.json",
                    layers=layers,
                    flags=flags,
                    r=r,
                    name=name,
                ),
                log=r / f"cost_{name}.log",
            )
            session.say(f"cost {name} exit {code}")
        session.call(summarize_deterministic_cost, r, session.out / "reproducibility_cost.json")


def summarize_deterministic_cost(r: Path, summary_path: Path) -> None:
    """``reproducibility_cost.json``: s/step and tokens/s of the default and of deterministic mode at the recipe's
    shapes, their ratio, and the losses of both (what deterministic mode changes in the numbers)."""
    runs = {name: json.loads((r / f"cost_{name}.json").read_text()) for name in ("default", "deterministic")
            if (r / f"cost_{name}.json").is_file()}  # fmt: skip
    default, deterministic = runs.get("default"), runs.get("deterministic")
    keys = ("median_step_time_s", "tokens_per_sec_per_gpu", "peak_memory_gib", "deterministic", "losses")
    summary = {
        "card": next((run.get("device") for run in runs.values()), None),
        "shapes": "Llama-3-8B layers (recipe), seq 8192, MBS 1, GBS 8, FP8 delayed, FP8 weights",
        "runs": {name: {key: run.get(key) for key in keys} for name, run in runs.items()},
        "deterministic_over_default_s_per_step": deterministic["median_step_time_s"] / default["median_step_time_s"]
        if default and deterministic
        else None,
    }
    _write_summary(summary_path, summary)


# ---------------------------------------------------------------------------------------------- speed-1
def speed_summary(session: StageSession) -> None:
    """``speed_summary.json`` from the comparison the stage ran before."""
    compare = session.out / f"speed_{session.knob('SPEED_LAYERS')}l" / "compare.json"
    session.call(summarize_speed, compare, session.out / "speed_summary.json", session.knob("SPEED_SETTINGS"))


def summarize_speed(compare_path: Path, summary_path: Path, settings: str) -> None:
    """``speed_summary.json``: s/step of both sides per precision, labelled with ``settings``."""
    compare = json.loads(compare_path.read_text())
    rows = [
        {
            "layers": compare["config"]["layers"],
            "precision": row["precision"],
            "ours_s_per_step": row["ours"].get("median_step_time_s"),
            "megatron_lm_s_per_step": row["megatron_lm"].get("median_step_time_s"),
            "ours_over_megatron_lm": row.get("ratio"),
            "settings": settings,
        }
        for row in compare["results"]
    ]
    _write_summary(summary_path, {"card": compare["device"], "rows": rows})


# ---------------------------------------------------------------------------------------------- lever-1
def lever(session: StageSession, lever_args: str | None = None) -> None:
    """Today's defaults (A) against one lever (B), alternating A B A B in one call: s/step and loss difference.

    B adds ``lever_args`` (default: the knob LEVER_ARGS), flags of ``benchmarks.throughput``, and runs with the
    environment assignments of LEVER_ENV, for levers that are settings of a dependency. Both run LEVER_PRECISION with
    LEVER_LAYERS layers and the flags LEVER_BASE_ARGS. With LEVER_C_ARGS a third setting C (usually B plus one more
    lever; LEVER_ARGS are not added to it, LEVER_ENV is) runs after each B: A B C A B C, so two levers are measured
    against the same A runs in one call.
    """
    flags = session.knob("LEVER_ARGS") if lever_args is None else lever_args
    env = session.knob("LEVER_ENV")
    c_flags = session.knob("LEVER_C_ARGS") if lever_args is None else ""
    if not flags and not env:
        raise StageUsageError("lever-1 needs LEVER_ARGS and/or LEVER_ENV")
    runs = session.out / "lever"
    session.mkdir(runs)
    order = ("a1", "b1", "c1", "a2", "b2", "c2") if c_flags else ("a1", "b1", "a2", "b2")
    for run in order:
        lever_flags, lever_env = {"a": ("", ""), "b": (flags, env), "c": (c_flags, env)}[run[0]]
        code = session.run(
            session.words(
                "env {*env} python3 -m benchmarks.throughput --precision {LEVER_PRECISION} --layers {LEVER_LAYERS} "
                "--gbs 8 --steps {LEVER_STEPS} --warmup {LEVER_WARMUP} {*LEVER_BASE_ARGS} {*flags} "
                "--out {runs}/{run}.json",
                env=lever_env,
                flags=lever_flags,
                runs=runs,
                run=run,
            ),
            log=runs / f"{run}.log",
        )
        session.say(f"{run} ({lever_env} {lever_flags}) exit {code}")
    setting = f"{env} {flags}" if env else flags
    session.call(summarize_lever, runs, setting, f"{env} {c_flags}" if env and c_flags else c_flags)


def lever_weight_refresh(session: StageSession) -> None:
    """lever-1 with B = Transformer Engine's own FP8 weight refresh (``--weight-refresh te``)."""
    lever(session, lever_args="--weight-refresh te")


def summarize_lever(runs_dir: Path, lever_setting: str, lever_c_setting: str = "") -> None:
    """``lever/summary.json``: s/step of A and B (and C), the speed-ups over A, and the loss differences A-A, A-B
    (and A-C)."""
    runs = {path.stem: json.loads(path.read_text()) for path in runs_dir.glob("[abc][12].json")}

    def side(tag: str) -> dict[str, list[Any]]:
        records = [record for name, record in sorted(runs.items()) if name.startswith(tag)]
        return {
            "s_per_step": [record["median_step_time_s"] for record in records],
            "losses": [record["losses"] for record in records],
            "peak_gib": [record.get("peak_memory_gib") for record in records],
        }

    def largest_gap(first: list[float], second: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(first, second, strict=False))

    def against_default(other: dict[str, list[Any]]) -> tuple[float | None, float | None]:
        diff = largest_gap(a["losses"][0], other["losses"][0]) if a["losses"] and other["losses"] else None
        speedup = (
            statistics.mean(a["s_per_step"]) / statistics.mean(other["s_per_step"])
            if a["s_per_step"] and other["s_per_step"]
            else None
        )
        return speedup, diff

    a, b = side("a"), side("b")
    noise = largest_gap(*a["losses"]) if len(a["losses"]) == 2 else None
    speedup, diff = against_default(b)
    summary = {
        "card": next(iter(runs.values()), {}).get("device"),
        "lever": lever_setting,
        "default_s_per_step": a["s_per_step"],
        "lever_s_per_step": b["s_per_step"],
        "default_peak_gib": a["peak_gib"],
        "lever_peak_gib": b["peak_gib"],
        "speedup": speedup,
        "max_loss_diff_default_vs_default": noise,
        "max_loss_diff_default_vs_lever": diff,
    }
    if lever_c_setting:
        c = side("c")
        speedup_c, diff_c = against_default(c)
        summary.update(
            lever_c=lever_c_setting,
            lever_c_s_per_step=c["s_per_step"],
            lever_c_peak_gib=c["peak_gib"],
            speedup_c=speedup_c,
            max_loss_diff_default_vs_lever_c=diff_c,
        )
    _write_summary(runs_dir / "summary.json", summary)


# ---------------------------------------------------------------------------------------------- profile-fp8
def profile_fp8(session: StageSession) -> None:
    """Three steps profiled after ten, per precision; with PROFILE_STACKS one more FP8 step with Python stacks
    (``fp8_stacks.json``: which code launched the FP8 casts; its step times are slower)."""
    profiles = session.out / "profile"
    session.mkdir(profiles)
    for precision in session.knob("PROFILE_PRECISIONS").split():
        code = session.run(
            session.words(
                "python3 -m benchmarks.throughput --precision {precision} --layers {PROFILE_LAYERS} --steps 13 "
                "--warmup 10 --profile-steps 3 --out {profiles}/{precision}.json",
                precision=precision,
                profiles=profiles,
            ),
            log=profiles / f"{precision}.log",
        )
        session.say(f"{precision} exit {code}")
    session.note("only with PROFILE_STACKS set:")
    if session.knob("PROFILE_STACKS") or session.dry_run:
        code = session.run(
            session.words(
                "python3 -m benchmarks.throughput --precision fp8 --layers 4 --steps 11 --warmup 10 --profile-steps 1 "
                "--profile-stacks --out {profiles}/fp8_stacks.json",
                profiles=profiles,
            ),
            log=profiles / "fp8_stacks.log",
        )
        session.say(f"fp8 with stacks exit {code}")
    session.call(print_kernel_profiles, profiles)


def print_kernel_profiles(profiles: Path) -> None:
    """Print each profile's step time, idle time, kernel time by kind and the code behind the costliest launches."""
    rows = {path.stem: json.loads(path.read_text()).get("kernel_profile") for path in profiles.glob("*.json")}
    for name, summary in sorted(rows.items()):
        if not summary:
            continue
        by_kind = {kind: round(seconds, 4) for kind, seconds in summary["kernel_s_per_step_by_kind"].items()}
        print(
            name,
            f"wall {summary['wall_s_per_step']:.3f} s/step, idle {summary['gpu_idle_s_per_step']:.3f}",
            by_kind,
        )
        for site in summary.get("launch_sites", [])[:6]:
            print(f"  {site['s']:.4f} s {site['calls']} calls {site['kernel'][:90]} grids {site['grids'][:2]}")
            print("     " + "\n     ".join(site["frames"][:6]))


# ---------------------------------------------------------------------------------------------- fp8-casts
TE_INCLUDE_DIR_PROBE = (
    "import os, transformer_engine.pytorch; "
    'print("NVTE_CUDA_INCLUDE_DIR after import:", os.environ.get("NVTE_CUDA_INCLUDE_DIR"))'
)


def fp8_casts(session: StageSession) -> None:
    """Which FP8 cast-transpose kernel Transformer Engine runs, and how fast, by setting.

    TE casts activations and gradients to FP8 (with the transpose the wgrad GEMM needs) in a kernel tuned at run
    time with NVRTC, or else in a statically compiled general one; a profile showed only the general one. So:
    where are the CUDA headers NVRTC needs, which kernel runs, and its GB/s by setting: default, NVRTC off, each
    header directory found (at most three).
    """
    casts = session.out / "fp8_casts"
    session.mkdir(casts)
    session.run(["python3", "-c", TE_INCLUDE_DIR_PROBE], log=casts / "te_env.txt")
    # The first 20 of each, as `timeout 60 find ... 2>/dev/null | head -20`.
    headers = session.capture(
        session.words("find / -xdev -name cuda_runtime.h -path '*include*'"), limit_s=60, max_lines=20, hide_errors=True
    )
    session.write_text(casts / "cuda_runtime_h.txt", headers)
    libraries = session.capture(
        session.words("find / -xdev -name 'libnvrtc*.so*'"), limit_s=60, max_lines=20, hide_errors=True
    )
    session.write_text(casts / "libnvrtc.txt", libraries)
    for name in ("te_env.txt", "cuda_runtime_h.txt", "libnvrtc.txt"):
        session.say(_tail(casts / name, 1 << 20))
    probe = casts / "cast_probe.py"
    session.copy(CAST_PROBE, probe)
    session.run(["python3", probe, casts / "default.json", "default"], tail=2)
    session.run(["python3", probe, casts / "nvrtc_off.json", "nvrtc_off"], env={"NVTE_DISABLE_NVRTC": "1"}, tail=2)
    session.note("then, for each of the first three cuda_runtime.h found, its CUDA directory as NVTE_CUDA_INCLUDE_DIR")
    for index, header in enumerate(headers.split()[:3], start=1):
        directory = os.path.dirname(header).removesuffix("/include")
        session.run(
            ["python3", probe, casts / f"include_{index}.json", f"include {directory}"],
            env={"NVTE_CUDA_INCLUDE_DIR": directory},
            tail=2,
        )


# ---------------------------------------------------------------------------------------------- offload-check
def offload_check(session: StageSession) -> None:
    """Does optimizer CPU offload (with FP8 weights) train like the GPU optimizer? 8 layers fit both ways: the
    offloaded run against two runs without (their difference is the run-to-run noise), same seed and data."""
    runs = session.out / "offload"
    session.mkdir(runs)
    for run in ("gpu_a", "offload", "gpu_b"):
        fraction = "0.5" if run == "offload" else "0.0"
        code = session.run(
            session.words(
                "python3 -m benchmarks.throughput --precision fp8 --layers 8 --gbs 8 --steps 12 --warmup 4 "
                "--optimizer-offload-fraction {fraction} --out {runs}/{run}.json",
                fraction=fraction,
                runs=runs,
                run=run,
            ),
            log=runs / f"{run}.log",
        )
        session.say(f"{run} (offload {fraction}) exit {code}")
    session.call(summarize_offload, runs)


def summarize_offload(runs_dir: Path) -> None:
    """``offload/summary.json``: losses, s/step and peaks of the runs, and the largest loss gaps between them."""
    runs = {path.stem: json.loads(path.read_text()) for path in runs_dir.glob("*.json")}

    def gap(a: str, b: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        return max(abs(x - y) for x, y in zip(runs[a]["losses"], runs[b]["losses"], strict=False))

    summary = {
        "card": next(iter(runs.values()), {}).get("device"),
        "losses": {name: run.get("losses") for name, run in runs.items()},
        "s_per_step": {name: run.get("median_step_time_s") for name, run in runs.items()},
        "peak_gib": {name: run.get("peak_memory_gib") for name, run in runs.items()},
        "max_loss_gap_gpu_vs_gpu": gap("gpu_a", "gpu_b"),
        "max_loss_gap_offload_vs_gpu": gap("gpu_a", "offload"),
    }
    _write_summary(runs_dir / "summary.json", summary)


# ---------------------------------------------------------------------------------------------- recipes-1
#: (precision, FP8 recipe, NaNGuard policy) of each recipes-1 run.
RECIPE_RUNS = (
    ("bf16", "delayed", None),
    ("fp8", "delayed", None),
    ("fp8", "delayed", "skip"),
    ("fp8", "current", None),
    ("fp8", "blockwise", None),
)


def recipes(session: StageSession) -> None:
    """Tokens/s of BF16 and each FP8 recipe (one with NaNGuard): the speed comparisons' shapes, one process each."""
    records = session.out / "recipes"
    session.mkdir(records)
    for precision, recipe, guard in RECIPE_RUNS:
        name = "bf16" if precision == "bf16" else f"{precision}_{recipe}" + (f"_guard_{guard}" if guard else "")
        session.run(
            session.words(
                "python3 -m benchmarks.throughput --precision {precision} --recipe {recipe} {*guard} --layers 4 "
                "--steps 20 --warmup 8 --out {records}/{name}.json",
                precision=precision,
                recipe=recipe,
                guard=["--nan-guard", guard] if guard else [],
                records=records,
                name=name,
            ),
            log=records / f"{name}.log",
            tail=1,
        )


# ---------------------------------------------------------------------------------------------- suite
def gpu_test_files(ignore: tuple[str, ...] = ()) -> list[str]:
    """``tests/gpu/test_*.py`` as repository paths, in name order, less the file names in ``ignore``."""
    return [f"tests/gpu/{path.name}" for path in sorted(GPU_TESTS.glob("test_*.py")) if path.name not in ignore]


def run_gpu_tests(session: StageSession, ignore: tuple[str, ...] = (), stop_at_failure: bool = False) -> None:
    """Each GPU test file in its own pytest process (``{out}/gpu_tests_<file>.log``), then one line per file with
    its exit status in ``{out}/gpu_tests.log``."""
    lines = []
    for path in gpu_test_files(ignore):
        name = Path(path).stem
        flags = ["-x"] if stop_at_failure else []
        status = session.run(
            ["python3", "-m", "pytest", "-m", "gpu", "-q", *flags, path, "-p", "no:cacheprovider"],
            log=session.out / f"gpu_tests_{name}.log",
            tail=3,
        )
        lines.append(f"{path}: exit status {status}")
    session.write_text(session.out / "gpu_tests.log", "\n".join(lines) + "\n")


def gpu_tests(session: StageSession) -> None:
    """``tests/gpu`` but the checkpoint tests (their own stage), each file in its own process."""
    run_gpu_tests(session, ignore=("test_checkpoint_resume.py", "test_checkpoint_layouts.py"))


def suite(session: StageSession) -> None:
    """The GPU test suite (each file in its own process), then ours against Megatron-LM (the stage's arguments go
    to the comparison)."""
    if session.knob("SKIP_TESTS") != "1":
        run_gpu_tests(session, stop_at_failure=True)
    if session.knob("SKIP_BENCH") != "1":
        session.run(
            ["python3", "-m", "benchmarks.compare_megatron_lm", "--out-dir", session.out / "bench", *session.args],
            tail=20,
        )


# ---------------------------------------------------------------------------------------------- shared
def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write a stage's summary JSON and print it, as every summary step does."""
    path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
