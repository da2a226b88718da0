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
    site = session.capture(
        ["python3", "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        placeholder="<site-packages>",
    ).rstrip("\n")
    session.run(
        session.words(
            "python3 -m benchmarks.real_text corpus --root {site} --min-mb 100 --max-mb 200 --out /tmp/real_text.jsonl "
            "--describe {t}/corpus.json",
            site=site,
            t=t,
        )
    )
    code = session.run(
        session.words(
            "python3 -m lightning_llama_fp8.cli preprocess --input /tmp/real_text.jsonl --output-prefix /tmp/real_text "
            "--workers 16 --overwrite"
        ),
        log=t / "preprocess.log",
    )
    session.say(f"preprocess exit {code}")
    session.say(_tail(t / "preprocess.log", 2))
    session.copy(Path("/tmp/real_text.corpus.json"), t / "real_text.corpus.json")
    session.call(write_real_text_configs, t)
    for name in ("real", "mock"):
        code = session.run(
            ["python3", "-m", "lightning_llama_fp8.cli", "fit", "--config", t / f"{name}.yaml"],
            stdout=t / f"fit_{name}.stdout",
            stderr=t / f"fit_{name}.stderr",
        )
        session.say(f"fit {name} exit {code}")
        session.say(_tail_bytes(t / f"fit_{name}.stderr", 400))
    card = session.capture(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], max_lines=1, placeholder="<GPU name>"
    ).rstrip("\n")
    session.run(
        session.words(
            "python3 -m benchmarks.real_text training --real-csv {t}/real_csv/run/version_0/metrics.csv "
            "--mock-csv {t}/mock_csv/run/version_0/metrics.csv --corpus-json {t}/corpus.json "
            "--sidecar {t}/real_text.corpus.json --max-steps 300 --card {card} --out {t}/real_text_training.json",
            t=t,
            card=card,
        )
    )


def write_real_text_configs(t: Path) -> None:
    """The two example configs as a user runs them, minus checkpoints (time), with CSV logs for the summary."""
    import yaml

    for name, source, steps in (("real", "llama3_1b_text", 300), ("mock", "llama3_1b_1gpu_fp8", 200)):
        config = yaml.safe_load(Path(f"examples/configs/{source}.yaml").read_text())
        trainer = config["trainer"]
        trainer.update(max_steps=steps, val_check_interval=50, enable_checkpointing=False)
        trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": f"{t}/{name}_csv", "name": "run"},
        }
        if name == "real":
            config["data"]["init_args"].update(data_path=["/tmp/real_text"], path_to_cache="/tmp/real_text_cache")
        (t / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


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
                steps=str(2 * every),
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
            }
        )
    _write_summary(summary_path, {"card": card, "rows": rows})


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
    environment assignments of LEVER_ENV, for levers that are settings of a dependency.
    """
    flags = session.knob("LEVER_ARGS") if lever_args is None else lever_args
    env = session.knob("LEVER_ENV")
    if not flags and not env:
        raise StageUsageError("lever-1 needs LEVER_ARGS and/or LEVER_ENV")
    runs = session.out / "lever"
    session.mkdir(runs)
    for run in ("a1", "b1", "a2", "b2"):
        lever_flags, lever_env = (flags, env) if run.startswith("b") else ("", "")
        code = session.run(
            session.words(
                "env {*env} python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps 20 --warmup 8 "
                "{*flags} --out {runs}/{run}.json",
                env=lever_env,
                flags=lever_flags,
                runs=runs,
                run=run,
            ),
            log=runs / f"{run}.log",
        )
        session.say(f"{run} ({lever_env} {lever_flags}) exit {code}")
    session.call(summarize_lever, runs, f"{env} {flags}" if env else flags)


def lever_weight_refresh(session: StageSession) -> None:
    """lever-1 with B = Transformer Engine's own FP8 weight refresh (``--weight-refresh te``)."""
    lever(session, lever_args="--weight-refresh te")


def summarize_lever(runs_dir: Path, lever_setting: str) -> None:
    """``lever/summary.json``: s/step of A and B, the speed-up, and the loss differences A-A and A-B."""
    runs = {path.stem: json.loads(path.read_text()) for path in runs_dir.glob("[ab][12].json")}

    def side(tag: str) -> dict[str, list[Any]]:
        records = [record for name, record in sorted(runs.items()) if name.startswith(tag)]
        return {
            "s_per_step": [record["median_step_time_s"] for record in records],
            "losses": [record["losses"] for record in records],
        }

    a, b = side("a"), side("b")
    noise = max(abs(x - y) for x, y in zip(*a["losses"], strict=False)) if len(a["losses"]) == 2 else None
    diff = (
        max(abs(x - y) for x, y in zip(a["losses"][0], b["losses"][0], strict=False))
        if a["losses"] and b["losses"]
        else None
    )
    speedup = (
        statistics.mean(a["s_per_step"]) / statistics.mean(b["s_per_step"])
        if a["s_per_step"] and b["s_per_step"]
        else None
    )
    summary = {
        "card": next(iter(runs.values()), {}).get("device"),
        "lever": lever_setting,
        "default_s_per_step": a["s_per_step"],
        "lever_s_per_step": b["s_per_step"],
        "speedup": speedup,
        "max_loss_diff_default_vs_default": noise,
        "max_loss_diff_default_vs_lever": diff,
    }
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
                "python3 -m benchmarks.throughput --precision {precision} --layers 4 --steps 13 --warmup 10 "
                "--profile-steps 3 --out {profiles}/{precision}.json",
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
