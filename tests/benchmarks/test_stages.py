"""The GPU stage registry (benchmarks/stages.py), on the CPU.

The records are complete, every stage the shell script had is there, the commands a dry run prints name files of
this repository, and several stages' commands are those the shell script ran. (The runner itself:
tests/benchmarks/test_stage.py and tests/benchmarks/lib/test_stage_run.py.)
"""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.lib import stage_functions
from benchmarks.lib.stage_run import Command, Stage, StageSession, StageUsageError
from benchmarks.stages import STAGES, STAGES_BY_NAME
from tests.helpers import REPO_ROOT

#: The stages of the former benchmarks/gpu_stage.sh (people's notes and the README name them), and its suite.
SHELL_SCRIPT_STAGES = (
    "equivalence-2", "equivalence-4", "pipeline-2", "pipeline-4", "speed-2", "speed-tp2-32", "speed-8b-4",
    "speed-8b-2", "nan-safety", "gpu-tests", "recipes-1", "checkpoints", "recompute", "full-8b-1gpu", "hf-parity",
    "hf-convert-8b", "telemetry", "real-text", "checkpoint-stall", "profile-fp8", "speed-1", "lever-1", "fp8-casts",
    "offload-check", "weight-refresh", "ref8-ours-cp2", "ref8-lm-cp2", "ref8-ours-cp1", "ref8-lm-cp1", "suite",
)  # fmt: skip
#: The stages added since the shell script.
NEWER_STAGES = (
    "reproducibility",
    "document-masking",
    "document-masking-training",
    "sft",
    "one-gpu-8b",
    "moments-check",
)
#: Knobs without which a stage refuses to start.
REQUIRED_KNOBS = {"lever-1": {"LEVER_ARGS": "--grad-accum-fusion off"}}
#: Where commands name files of this repository.
REPO_PREFIXES = ("benchmarks/", "tests/", "examples/", "src/", "scripts/")


def dry_run(
    name: str, out: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> tuple[int, StageSession]:
    environ = {**os.environ, **REQUIRED_KNOBS.get(name, {}), **(env or {})}
    session = StageSession(STAGES_BY_NAME[name], out, dry_run=True, environ=environ, args=args)
    return session.run_stage(), session


def throughput_runs(session: StageSession) -> list[list[str]]:
    return [command for command in session.commands if "benchmarks.throughput" in command]


def test_every_stage_of_the_shell_script_is_there_once() -> None:
    names = [stage.name for stage in STAGES]
    assert len(names) == len(set(names)) == len(STAGES_BY_NAME)
    assert set(SHELL_SCRIPT_STAGES) | set(NEWER_STAGES) == set(names)


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_records_are_complete(stage: Stage) -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", stage.name)
    assert stage.gpus in (1, 2, 4, 8)
    assert stage.purpose.strip() and "\n" not in stage.purpose
    assert 0 < stage.limit_s <= 600  # the device allows 600 s per call, start-up included
    assert stage.steps and all(isinstance(step, Command) or callable(step) for step in stage.steps)
    assert stage.outputs and all(output and not output.startswith("/") for output in stage.outputs)
    assert all(isinstance(default, str) for default in stage.knobs.values())


@pytest.mark.parametrize("name", SHELL_SCRIPT_STAGES + NEWER_STAGES)
def test_dry_run_runs_nothing_and_names_only_files_of_this_repository(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, session = dry_run(name, out)
    assert code == 0 and not session.failures
    assert not out.exists()  # nothing made, nothing run
    commands = session.commands[2:]  # after nvidia-smi and git rev-parse, which every stage runs
    assert commands
    for words in commands:
        for index, word in enumerate(words):
            if word.startswith(REPO_PREFIXES):
                assert (REPO_ROOT / word).exists(), f"{name}: {shlex.join(words)} names {word}, not in the repository"
            if index and words[index - 1] == "-m" and word.startswith(("benchmarks", "lightning_llama_fp8")):
                module = word.replace(".", "/")
                package_root = REPO_ROOT / "src" if word.startswith("lightning_llama_fp8") else REPO_ROOT
                module_file = package_root / f"{module}.py"
                runnable = module_file.is_file() or (package_root / module / "__main__.py").is_file()
                assert runnable, f"{name}: no module {word}"


def test_the_shell_script_commands_with_default_knobs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    throughput = ["python3", "-m", "benchmarks.throughput"]
    _, session = dry_run("checkpoint-stall", out)
    model = ["--precision", "fp8", "--layers", "4", "--gbs", "8"]
    assert throughput_runs(session) == [
        [*throughput, *model, "--steps", "22", "--warmup", "6", "--save-every", "10", "--save-mode", "sync",
         "--ckpt-dir", "/dev/shm/checkpoint_stall/sync", "--out", f"{out}/checkpoint_stall/sync.json"],
        ["env", *throughput, *model, "--steps", "120", "--warmup", "6", "--save-every", "60", "--save-mode", "async",
         "--ckpt-dir", "/dev/shm/checkpoint_stall/async", "--out", f"{out}/checkpoint_stall/async.json"],
    ]  # fmt: skip

    _, session = dry_run("recompute", out)
    assert session.commands[2:] == [
        ["python3", "-m", "benchmarks.compare_megatron_lm", "--out-dir", f"{out}/recompute", "--precisions", "fp8",
         "--recompute", "none", "selective", "full", "--layers", "4", "--gbs", "8", "--steps", "14", "--warmup", "6"],
        ["cp", f"{out}/recompute/recompute.json", f"{out}/recompute.json"],
    ]  # fmt: skip

    _, session = dry_run("recipes-1", out)
    assert [run[run.index("--out") + 1] for run in throughput_runs(session)] == [
        f"{out}/recipes/{name}.json"
        for name in ("bf16", "fp8_delayed", "fp8_delayed_guard_skip", "fp8_current", "fp8_blockwise")
    ]
    assert throughput_runs(session)[2][3:11] == ["--precision", "fp8", "--recipe", "delayed", "--nan-guard", "skip",
                                                 "--layers", "4"]  # fmt: skip

    _, session = dry_run("ref8-lm-cp1", out)
    assert session.commands[2:] == [
        ["python3", "-m", "benchmarks.reference_run", "megatron-lm", "--out-dir", f"{out}/ref8_lm-cp1", "--gpus", "8",
         "--cp", "1", "--steps", "30"],
    ]  # fmt: skip

    # Each GPU test file in its own process (one process leaves memory, environment and ports to the next test).
    _, session = dry_run("gpu-tests", out)
    files = sorted(f"tests/gpu/{p.name}" for p in (REPO_ROOT / "tests" / "gpu").glob("test_*.py"))
    expected = [f for f in files if "checkpoint" not in f]
    assert expected and session.commands[2:] == [
        ["python3", "-m", "pytest", "-m", "gpu", "-q", path, "-p", "no:cacheprovider"] for path in expected
    ]


def test_knobs_change_the_commands(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, session = dry_run("speed-1", out, {"SPEED_LAYERS": "16", "SPEED_STEPS": "12", "SPEED_WARMUP": "5"})
    assert session.commands[2] == [
        "python3", "-m", "benchmarks.compare_megatron_lm", "--out-dir", f"{out}/speed_16l", "--precisions", "fp8",
        "bf16", "--layers", "16", "--gbs", "8", "--steps", "12", "--warmup", "5",
    ]  # fmt: skip

    runs = {"CKPT_STALL_RUNS": "async_host_register", "CKPT_ASYNC_EVERY": "30", "CKPT_STALL_DIR": "/scratch/c"}
    _, session = dry_run("checkpoint-stall", out, runs)
    (run,) = throughput_runs(session)
    assert run[:2] == ["env", stage_functions.HOST_REGISTER_ALLOC_CONF]
    assert run[run.index("--steps") + 1] == "60" and run[run.index("--save-every") + 1] == "30"
    assert run[run.index("--ckpt-dir") + 1] == "/scratch/c/async"

    # B runs get LEVER_ENV as `env` assignments and LEVER_ARGS as flags; A runs neither.
    _, session = dry_run("lever-1", out, {"LEVER_ARGS": "--cross-entropy native", "LEVER_ENV": "NVTE_X=1 NVTE_Y=2"})
    a1, b1, a2, b2 = throughput_runs(session)
    assert a1[:2] == ["env", "python3"] and "--cross-entropy" not in a1
    assert [w.replace("a1", "a2") for w in a1] == a2 and [w.replace("b1", "b2") for w in b1] == b2
    assert b1[:4] == ["env", "NVTE_X=1", "NVTE_Y=2", "python3"]
    assert b1[-4:] == ["--cross-entropy", "native", "--out", f"{out}/lever/b1.json"]

    # With LEVER_C_ARGS a third setting runs after each B: A B C A B C.
    _, session = dry_run("lever-1", out, {"LEVER_ARGS": "--optimizer-precision fp32", "LEVER_C_ARGS": "--x"})
    a1, b1, c1, a2, b2, c2 = throughput_runs(session)
    assert "--optimizer-precision" not in a1 and b1[-4:-2] == ["--optimizer-precision", "fp32"]
    assert c1[-3:] == ["--x", "--out", f"{out}/lever/c1.json"] and c2[-1] == f"{out}/lever/c2.json"

    _, session = dry_run("suite", out, args=("--precisions", "fp8"))
    assert session.commands[-1][-3:] == [f"{out}/bench", "--precisions", "fp8"]
    _, session = dry_run("suite", out, {"SKIP_TESTS": "1"})
    assert not any("pytest" in command for command in session.commands)


def test_checkpoint_stall_at_issue_30s_interval(tmp_path: Path) -> None:
    """Three background saves 8 steps apart, the async run only."""
    settings = {"CKPT_STALL_RUNS": "async", "CKPT_ASYNC_EVERY": "8", "CKPT_ASYNC_SAVES": "3"}
    _, session = dry_run("checkpoint-stall", tmp_path / "out", settings)
    (run,) = throughput_runs(session)
    assert run[run.index("--steps") + 1] == "24" and run[run.index("--save-every") + 1] == "8"
    assert run[run.index("--save-mode") + 1] == "async"


def test_reproducibility_stage_runs_two_processes_the_second_reversed_then_compares(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, session = dry_run("reproducibility", out)
    run = ["python3", "-m", "benchmarks.lib.reproducibility", "run"]
    a, b, summarize, default, deterministic = session.commands[2:]
    assert a == [*run, "--process", "a", "--ckpt-dir", "/dev/shm/reproducibility/a", "--out",
                 f"{out}/reproducibility/process_a.json"]  # fmt: skip
    assert b == [*run, "--process", "b", "--reverse", "--ckpt-dir", "/dev/shm/reproducibility/b", "--out",
                 f"{out}/reproducibility/process_b.json"]  # fmt: skip
    assert summarize == ["python3", "-m", "benchmarks.lib.reproducibility", "summarize",
                         f"{out}/reproducibility/process_a.json", f"{out}/reproducibility/process_b.json",
                         "--out-dir", str(out)]  # fmt: skip
    assert deterministic == [
        *default[:-2],
        "--deterministic",
        "--out",
        f"{out}/reproducibility/cost_deterministic.json",
    ]
    assert default[default.index("--layers") + 1] == "4"

    _, session = dry_run(
        "reproducibility", out, {"REPRO_COST_LAYERS": "0", "REPRO_ARGS": "--only default deterministic"}
    )
    assert not throughput_runs(session)
    assert session.commands[2][-3:] == ["--only", "default", "deterministic"]


def test_the_repro_processes_get_the_cublas_setting_before_their_first_gemm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # PyTorch reads it once per process: deterministic runs after default runs in one process need it from the start.
    dry_run("reproducibility", tmp_path / "out")
    runs = [line for line in capsys.readouterr().out.splitlines() if "benchmarks.lib.reproducibility run" in line]
    assert len(runs) == 2
    assert all(
        line.startswith("$ CUBLAS_WORKSPACE_CONFIG=:4096:8 NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1 python3") for line in runs
    )


class _OverlapRecorder:
    """Stands in for a StageSession in fit_each: each run takes a moment; how many ran at once is recorded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.configs: list[str] = []
        self.env: dict[str, str] = {}

    def run(self, argv: list[str | Path], **_: object) -> int:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.configs.append(str(argv[-1]))
        time.sleep(0.3)
        with self.lock:
            self.running -= 1
        return 0

    def say(self, text: str) -> None:
        pass


@pytest.mark.parametrize(("concurrently", "most_at_once"), [(True, 3), (False, 1)])
def test_moments_runs_started_together_overlap_each_with_its_own_sample_index_cache(
    tmp_path: Path, concurrently: bool, most_at_once: int
) -> None:
    names = ("default", "bf16_moments", "default_seed2")
    stage_functions.write_moments_configs(tmp_path, 300, " ".join(names))
    caches = {yaml.safe_load((tmp_path / f"{n}.yaml").read_text())["data"]["init_args"]["path_to_cache"] for n in names}
    assert len(caches) == 3  # runs at once must not build the same index files together

    recorder = _OverlapRecorder()
    stage_functions.fit_each(recorder, tmp_path, names, concurrently=concurrently)  # type: ignore[arg-type]
    assert recorder.most_at_once == most_at_once
    assert sorted(recorder.configs) == sorted(str(tmp_path / f"{n}.yaml") for n in names)
    if concurrently:  # three fits cannot share one exported port
        recorder.env["MASTER_PORT"] = "29500"
        with pytest.raises(StageUsageError, match="cannot share the exported MASTER_PORT"):
            stage_functions.fit_each(recorder, tmp_path, names, concurrently=True)  # type: ignore[arg-type]


def test_moments_check_knob_runs_the_fits_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(stage_functions, "fit_each", lambda *a, concurrently=False: seen.append(concurrently))
    dry_run("moments-check", tmp_path / "out", {"MOMENTS_CONCURRENT": "1"})
    dry_run("moments-check", tmp_path / "out")
    assert seen == [True, False]


def test_profile_layers_knob_sets_the_depth_of_the_profiled_runs(tmp_path: Path) -> None:
    _, session = dry_run("profile-fp8", tmp_path / "out", {"PROFILE_PRECISIONS": "bf16", "PROFILE_LAYERS": "16"})
    (run, *_) = throughput_runs(session)
    assert run[run.index("--precision") + 1] == "bf16" and run[run.index("--layers") + 1] == "16"
    _, session = dry_run("profile-fp8", tmp_path / "out")
    assert all(run[run.index("--layers") + 1] == "4" for run in throughput_runs(session))
