"""benchmarks/reference_run.py (issue 5) on the CPU: the command it runs and the numbers it reads back."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import reference_run
from lightning_llama_fp8.cli import main
from lightning_llama_fp8.config import get_preset
from tests.helpers import REPO_ROOT
from tests.helpers.megatron_lm import iteration_line, record_launches


def printed_config(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr("lightning_llama_fp8.cli.fit.preflight", lambda config: None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        main([*args, "--print_config"])
    assert excinfo.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_ours_runs_the_shipped_yaml_changing_only_steps_layout_and_logger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = reference_run.ours_command(gpus=8, cp=1, steps=30, out_dir=tmp_path)
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"]
    cli_args = command[command.index("lightning_llama_fp8.cli.fit") + 1 :]
    ours = printed_config(cli_args, capsys, monkeypatch)
    shipped = printed_config(["fit", "--config", str(reference_run.CONFIG)], capsys, monkeypatch)

    assert ours["trainer"]["max_steps"] == 30 and str(ours["trainer"]["devices"]) == "8"  # Lightning takes "8"
    assert ours["trainer"]["strategy"]["init_args"]["context_parallel_size"] == 1
    assert ours["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert ours["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
    # Everything else is the shipped recipe, value for value.
    for section in ("model", "data", "seed_everything"):
        assert ours[section] == shipped[section], section
    assert ours["trainer"]["plugins"] == shipped["trainer"]["plugins"]
    strategy, shipped_strategy = ours["trainer"]["strategy"]["init_args"], shipped["trainer"]["strategy"]["init_args"]
    assert {**strategy, "context_parallel_size": 2} == shipped_strategy
    assert ours["trainer"]["limit_val_batches"] == 0  # no evaluation, as Megatron-LM's side
    changed = {"max_steps", "devices", "strategy", "logger", "enable_progress_bar", "limit_val_batches"}
    assert {k: v for k, v in ours["trainer"].items() if k not in changed} == {
        k: v for k, v in shipped["trainer"].items() if k not in changed
    }


def test_megatron_lm_side_uses_the_full_model_and_the_recipe_batch() -> None:
    env = reference_run.megatron_lm_env(gpus=8, cp=2, steps=30)
    assert env == {"PRECISION": "fp8", "NPROC": "8", "NUM_LAYERS": "32", "GBS": "128", "ITERS": "30", "TP": "1",
                   "CP": "2"}  # fmt: skip


def write_ours(out_dir: Path, step_times: list[float], cp: int = 2) -> None:
    (out_dir / "ours" / "version_0").mkdir(parents=True)
    (out_dir / "run.json").write_text(json.dumps({"side": "ours", "gpus": 8, "cp": cp, "device": "NVIDIA H100"}))
    rows = ["epoch,step,train/loss,train/lr,train/step_time_s,train/tokens_per_sec_per_gpu,train/peak_memory_gib"]
    rows.append("0,0,12.0,1e-8,,,70.5")  # the first step has no step time
    for i, t in enumerate(step_times, start=1):
        rows.append(f"0,{i},{12.0 - 0.1 * i},1e-8,{t},{128 * 8192 / t / 8},{71.0 + 0.01 * i}")
    (out_dir / "ours" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_compare_reads_both_sides_and_does_the_arithmetic(tmp_path: Path) -> None:
    ours_dir, lm_dir = tmp_path / "ours", tmp_path / "lm"
    lm_dir.mkdir()
    # Ours: steps 2..30 timed; after dropping warm-up, 9.0 s per step except one outlier the median ignores.
    ours_times = [20.0] * 9 + [9.0] * 19 + [30.0]
    write_ours(ours_dir, ours_times)
    lm_lines = [iteration_line(i, 40000.0 if i <= 10 else 10000.0, 12.0 - 0.1 * i, train_iters=30, gbs=128)
                for i in range(1, 31)]  # fmt: skip
    memory = " [Rank 0] (after 1 iterations) memory (MB) | allocated: 7.0 | max allocated: 76000.5 | reserved: 8.0"
    (lm_dir / "megatron_lm.log").write_text("\n".join([memory, *lm_lines]) + "\n")

    result = reference_run.compare(ours_dir, lm_dir, warmup=10)

    assert result["layout"] == {"tp": 1, "cp": 2, "dp": 4} and result["gpus"] == 8
    ours, lm = result["ours"], result["megatron_lm"]
    assert ours["timed_steps"] == 20 and ours["median_step_time_s"] == 9.0  # steps 11..30
    assert lm["timed_steps"] == 20 and lm["median_step_time_s"] == 10.0
    assert ours["tokens_per_sec_per_gpu"] == pytest.approx(128 * 8192 / 9.0 / 8)
    assert result["ratio"] == pytest.approx(10.0 / 9.0)
    per_token = get_preset("llama3_8b").flops_per_token()
    assert ours["tflops_per_gpu"] == pytest.approx(per_token * 128 * 8192 / 9.0 / 8 / 1e12)
    assert ours["tflops_per_gpu_causal"] < ours["tflops_per_gpu"]
    assert ours["peak_memory_gib"] == pytest.approx(71.29)
    assert lm["peak_memory_gib"] == pytest.approx(76000.5 / 1024)  # Megatron-LM reports MiB
    assert len(ours["losses"]) == 30 and lm["losses"][0] == pytest.approx(11.9)


def test_compare_says_which_side_is_missing(tmp_path: Path) -> None:
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "run.json").write_text(json.dumps({"gpus": 8, "cp": 2}))
    with pytest.raises(FileNotFoundError, match="did the 'ours' run finish"):
        reference_run.compare(tmp_path / "ours", tmp_path / "lm", warmup=10)


def test_reference_run_launches_the_same_commands_and_fails_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_launches(monkeypatch)
    args = argparse.Namespace(out_dir=tmp_path, gpus=8, cp=1, steps=30)
    reference_run.run_side("ours", args)
    assert calls[-1]["cmd"] == reference_run.ours_command(8, 1, 30, tmp_path)
    assert calls[-1]["env"] == dict(os.environ) and calls[-1]["log"] == tmp_path / "ours.log"

    calls = record_launches(monkeypatch, code=3)
    with pytest.raises(SystemExit) as excinfo:
        reference_run.run_side("megatron-lm", args)
    assert calls[-1]["cmd"] == ["bash", str(REPO_ROOT / "benchmarks" / "scripts" / "megatron_lm_baseline.sh"),
                                "--lr-warmup-iters", "30518", "--lr-decay-iters", "15228271"]  # fmt: skip
    assert calls[-1]["env"] == {**os.environ, **reference_run.megatron_lm_env(8, 1, 30)}
    log = (tmp_path / "megatron_lm.log").read_text()
    tail = "".join(log.splitlines(keepends=True)[-30:])
    assert str(excinfo.value) == f"megatron-lm run failed with exit code 3; log tail:\n{tail}"
