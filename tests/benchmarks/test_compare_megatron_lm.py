"""benchmarks/compare_megatron_lm.py on the CPU: the commands it launches for each side."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare_megatron_lm
from tests.helpers import REPO_ROOT
from tests.helpers.megatron_lm import record_launches


def test_compare_megatron_lm_launches_the_same_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_launches(monkeypatch)
    args = argparse.Namespace(layers=4, gbs=8, steps=30, warmup=10, tp=2, cp=1, nproc=2)
    compare_megatron_lm.ours(args, "fp8", tmp_path)
    compare_megatron_lm.megatron_lm(args, "bf16", tmp_path, "_recompute_full", ["--recompute-granularity", "full"])

    ours, lm = calls
    assert ours["cmd"] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "benchmarks.throughput", "--precision", "fp8", "--layers", "4",
                           "--gbs", "8", "--steps", "30", "--warmup", "10", "--tp", "2", "--cp", "1",
                           "--out", str(tmp_path / "ours_fp8.json")]  # fmt: skip
    assert ours["env"] == dict(os.environ) and ours["log"] == tmp_path / "ours_fp8.log"
    assert lm["cmd"] == [
        "bash",
        str(REPO_ROOT / "benchmarks" / "scripts" / "megatron_lm_baseline.sh"),
        "--recompute-granularity",
        "full",
    ]
    assert lm["env"] == {**os.environ, "PRECISION": "bf16", "NPROC": "2", "NUM_LAYERS": "4", "GBS": "8", "ITERS": "30",
                         "TP": "2", "CP": "1"}  # fmt: skip
    assert lm["log"] == tmp_path / "megatron_lm_bf16_recompute_full.log"
    assert all(c["stderr"] == subprocess.STDOUT and c["check"] is False for c in calls)
    args.nproc = 1  # one process: benchmarks.throughput straight under this interpreter
    compare_megatron_lm.ours(args, "fp8", tmp_path)
    assert calls[-1]["cmd"][:3] == [sys.executable, "-m", "benchmarks.throughput"]
