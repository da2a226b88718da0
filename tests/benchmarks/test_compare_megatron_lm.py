"""benchmarks/compare_megatron_lm.py on the CPU: the commands it launches for each side."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_both_sides_read_the_corpus_and_mask_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_launches(monkeypatch)
    args = argparse.Namespace(
        layers=4, gbs=8, steps=30, warmup=10, tp=1, cp=1, nproc=1, data_path="/tmp/real_text", document_masking=True
    )
    compare_megatron_lm.ours(args, "fp8", tmp_path)
    compare_megatron_lm.megatron_lm(args, "fp8", tmp_path)
    compare_megatron_lm.ours(args, "bf16", tmp_path, "_unmasked", document_masking=False)
    ours, lm, unmasked = calls
    assert ours["cmd"][-3:] == ["--data-path", "/tmp/real_text", "--document-masking"]
    assert lm["env"]["DATA_PATH"] == "/tmp/real_text" and lm["env"]["DOCUMENT_MASKING"] == "1"
    assert unmasked["cmd"][-2:] == ["--data-path", "/tmp/real_text"]


def test_masking_rows_time_megatron_lm_masked_and_ours_both_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    runs: list[tuple[Any, ...]] = []

    def fake_ours(args: Any, precision: str, out_dir: Path, tag: str = "", extra: Any = (), **kw: Any) -> dict:
        runs.append(("ours", precision, tag, kw["document_masking"]))
        seconds = 1.02 if kw["document_masking"] else 1.0
        return {"median_step_time_s": seconds, "tokens_per_sec_per_gpu": 8 * 8192 / seconds, "peak_memory_gib": 30.0,
                "plan_gib": 29.0, "losses": [11.9, 11.8]}  # fmt: skip

    def fake_lm(args: Any, precision: str, out_dir: Path, tag: str = "", extra: Any = (), **kw: Any) -> dict:
        runs.append(("megatron_lm", precision, tag, kw["document_masking"], tuple(extra)))
        return {"median_step_time_s": 1.2, "tokens_per_sec_per_gpu": 8 * 8192 / 1.2, "peak_memory_gib": 31.0,
                "losses": [11.9], "commit": "d98e8a6"}  # fmt: skip

    monkeypatch.setattr(compare_megatron_lm, "ours", fake_ours)
    monkeypatch.setattr(compare_megatron_lm, "megatron_lm", fake_lm)
    monkeypatch.setattr(compare_megatron_lm.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    args = argparse.Namespace(
        out_dir=tmp_path, precisions=["fp8", "bf16"], layers=4, gbs=8, steps=14, warmup=6, tp=1, cp=1, nproc=1,
        data_path="/tmp/real_text", document_masking=False,
    )  # fmt: skip
    compare_megatron_lm.compare_document_masking(args)
    memory = ("--log-memory-interval", "14")
    assert runs == [
        ("megatron_lm", "fp8", "_masked", True, memory), ("ours", "fp8", "_masked", True),
        ("ours", "fp8", "_unmasked", False),
        ("megatron_lm", "bf16", "_masked", True, memory), ("ours", "bf16", "_masked", True),
        ("ours", "bf16", "_unmasked", False),
    ]  # fmt: skip
    summary = json.loads((tmp_path / "document_masking_speed.json").read_text())
    assert summary["card"] == "NVIDIA H100 80GB HBM3" and summary["config"]["data"] == "/tmp/real_text"
    rows = summary["rows"]
    assert [(row["precision"], row["masking"]) for row in rows] == [
        ("fp8", True), ("fp8", False), ("bf16", True), ("bf16", False)
    ]  # fmt: skip
    assert rows[0]["megatron_lm_s_per_step"] == 1.2 and rows[1]["megatron_lm_s_per_step"] is None
    assert rows[0]["ours_over_megatron_lm"] == pytest.approx(1.2 / 1.02)
    assert rows[0]["masked_s_over_unmasked_s"] == pytest.approx(1.02)


def test_current_scaling_runs_the_fp8_rows_with_it_on_both_sides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[tuple[str, str, str, tuple[str, ...]]] = []

    def fake(side: str) -> Any:
        def run(args: argparse.Namespace, precision: str, out_dir: Path, tag: str = "", extra: Any = ()) -> dict:
            launched.append((side, precision, tag, tuple(extra)))
            return {"tokens_per_sec_per_gpu": 1000.0, "losses": [12.0, 11.0], "median_step_time_s": 1.0}

        return run

    monkeypatch.setattr(compare_megatron_lm, "ours", fake("ours"))
    monkeypatch.setattr(compare_megatron_lm, "megatron_lm", fake("lm"))
    monkeypatch.setattr(compare_megatron_lm.torch.cuda, "get_device_name", lambda: "GPU")
    argv = ["compare", "--out-dir", str(tmp_path), "--precisions", "fp8", "bf16", "--fp8-recipe", "current"]
    monkeypatch.setattr(sys, "argv", argv)
    compare_megatron_lm.main()
    assert launched == [
        ("lm", "fp8", "_current", ("--fp8-recipe", "tensorwise")),
        ("ours", "fp8", "_current", ("--recipe", "current")),
        ("lm", "bf16", "", ()),
        ("ours", "bf16", "", ()),
    ]
    summary = __import__("json").loads((tmp_path / "compare.json").read_text())
    assert summary["config"]["fp8_recipe"] == "current"
