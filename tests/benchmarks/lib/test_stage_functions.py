"""The Python steps of the stages (benchmarks/lib/stage_functions.py): the summaries of their run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.lib import stage_functions


def test_summaries_read_the_run_records(tmp_path: Path) -> None:
    for name, seconds, losses in (("a1", 1.0, [5.0, 4.0]), ("b1", 0.8, [5.0, 4.1]), ("a2", 1.0, [5.0, 4.05])):
        record = {"device": "GPU", "median_step_time_s": seconds, "losses": losses}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    stage_functions.summarize_lever(tmp_path, "--weight-refresh te")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lever"] == "--weight-refresh te" and summary["card"] == "GPU"
    assert summary["default_s_per_step"] == [1.0, 1.0] and summary["lever_s_per_step"] == [0.8]
    assert summary["speedup"] == pytest.approx(1.25)
    assert summary["max_loss_diff_default_vs_default"] == pytest.approx(0.05)
    assert summary["max_loss_diff_default_vs_lever"] == pytest.approx(0.1)
    assert "lever_c" not in summary

    # A third setting C against the same A runs.
    (tmp_path / "c1.json").write_text(json.dumps({"device": "GPU", "median_step_time_s": 0.5, "losses": [5.0, 3.8]}))
    stage_functions.summarize_lever(tmp_path, "--optimizer-precision fp32", "--optimizer-precision fp32 --x")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lever_c"] == "--optimizer-precision fp32 --x" and summary["lever_c_s_per_step"] == [0.5]
    assert summary["speedup_c"] == pytest.approx(2.0) and summary["speedup"] == pytest.approx(1.25)
    assert summary["max_loss_diff_default_vs_lever_c"] == pytest.approx(0.2)


def _stall_record(mode: str, blocked: list[float], **checkpoint: object) -> dict[str, object]:
    return {
        "device": "GPU",
        "checkpoint": {
            "mode": mode,
            "checkpoint_gib": 24.0,
            "blocked_s": blocked,
            "tokens_per_s_during_write_ratio": 1.0,
            "tokens_per_s_normal": 8000.0,
            "tokens_per_s_during_write": 8000.0,
            "steps_during_write": 20,
            "exit_wait_s": 20.0,
            "saves": [],
            **checkpoint,
        },
    }


def test_checkpoint_stall_summary_says_what_each_save_waited_for(tmp_path: Path) -> None:
    # Shaped like issue 30's H100 run (blocked 0.64 s, then 16.4 s); the waits and write times are invented.
    record = _stall_record(
        "async",
        [0.64, 16.4],
        waited_for_previous_s=[0.0, 15.8],
        write_s=[24.0, 23.0, None],
        shortest_nonblocking_interval_steps=25,
    )
    (tmp_path / "async.json").write_text(json.dumps(record))
    (tmp_path / "sync.json").write_text(json.dumps(_stall_record("sync", [30.0])))
    stage_functions.summarize_checkpoint_stall(tmp_path, tmp_path / "summary.json")
    sync, background = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert background["blocked_s_per_save"] == [0.64, 16.4]
    assert background["waited_for_previous_s_per_save"] == [0.0, 15.8]
    assert background["write_s_per_save"] == [24.0, 23.0, None]
    assert background["write_gib_per_s"] == pytest.approx(24.0 / 23.5)  # the median of the timed writes
    assert background["shortest_nonblocking_interval_steps"] == 25
    assert sync["waited_for_previous_s_per_save"] is None and sync["write_gib_per_s"] is None


def test_deterministic_cost_summary(tmp_path: Path) -> None:
    for name, seconds in (("default", 1.0), ("deterministic", 1.25)):
        record = {"device": "GPU", "median_step_time_s": seconds, "deterministic": name == "deterministic"}
        (tmp_path / f"cost_{name}.json").write_text(json.dumps(record))
    stage_functions.summarize_deterministic_cost(tmp_path, tmp_path / "cost.json")
    summary = json.loads((tmp_path / "cost.json").read_text())
    assert summary["deterministic_over_default_s_per_step"] == pytest.approx(1.25)
    assert summary["runs"]["deterministic"]["deterministic"] is True and summary["card"] == "GPU"
    (tmp_path / "cost_deterministic.json").unlink()  # a run that left no record: no ratio
    stage_functions.summarize_deterministic_cost(tmp_path, tmp_path / "cost.json")
    assert json.loads((tmp_path / "cost.json").read_text())["deterministic_over_default_s_per_step"] is None


def test_document_masking_summary_has_the_issues_fields(tmp_path: Path) -> None:
    isolation = {
        "card": "NVIDIA H100 80GB HBM3",
        "isolation": {
            "bf16": {"other_documents_max_abs_diff": 0.0},
            "fp8_delayed": {"other_documents_max_abs_diff": 0.0},
            "fp8_current": {"other_documents_max_abs_diff": 0.03},  # one scale over all documents: not counted
        },
        "alone_vs_packed_max_abs_diff": 0.01,
        "bf16_vs_fp32_alone_max_abs_diff": 0.02,
        "documents": [{"file": "a.py", "tokens_in_sample": 300, "tokens": 300}],
    }
    speed = {
        "card": "NVIDIA H100 80GB HBM3",
        "config": {"data": "/tmp/real_text"},
        "rows": [
            {"precision": "fp8", "masking": True, "ours_s_per_step": 0.9, "megatron_lm_s_per_step": 1.0,
             "ours_losses": [11.9]},
            {"precision": "fp8", "masking": False, "ours_s_per_step": 0.88, "megatron_lm_s_per_step": None},
        ],
    }  # fmt: skip
    (tmp_path / "isolation.json").write_text(json.dumps(isolation))
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    stage_functions.summarize_document_masking(
        tmp_path / "isolation.json", tmp_path / "speed.json", tmp_path / "document_masking.json"
    )
    summary = json.loads((tmp_path / "document_masking.json").read_text())
    assert summary["card"] == "NVIDIA H100 80GB HBM3"
    assert summary["isolation_max_abs_diff"] == 0.0
    assert summary["alone_vs_packed_max_abs_diff"] == 0.01 and summary["bf16_vs_fp32_alone_max_abs_diff"] == 0.02
    assert [(row["precision"], row["masking"], row["ours_s_per_step"], row["megatron_lm_s_per_step"]) for row in
            summary["rows"]] == [("fp8", True, 0.9, 1.0), ("fp8", False, 0.88, None)]  # fmt: skip
    assert "ours_losses" not in summary["rows"][0]


def test_document_masking_configs_are_the_text_example_on_and_off(tmp_path: Path) -> None:
    import yaml

    from lightning_llama_fp8.cli.config_file import plan_from_config

    stage_functions.write_document_masking_configs(tmp_path, 300)
    for name, masking in (("masked", True), ("unmasked", False)):
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        data = config["data"]["init_args"]
        assert data["document_masking"] is masking and data["data_path"] == [stage_functions.REAL_TEXT]
        assert config["trainer"]["max_steps"] == 300 and config["trainer"]["val_check_interval"] == 50
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == f"{tmp_path}/{name}_csv"
        assert plan_from_config(config).document_masking is masking  # the plan reads the switch


def test_one_gpu_8b_summary_has_a_row_per_setting_run(tmp_path: Path) -> None:
    runs = tmp_path / "one_gpu_8b"
    runs.mkdir()
    fits = {"device": "NVIDIA H200", "fits": True, "tokens_per_sec_per_gpu": 15000.0, "median_step_time_s": 4.37,
            "peak_memory_gib": 126.0, "plan_gib": 121.4, "host_peak_rss_gib": 9.5, "losses": [12.1, 11.9]}  # fmt: skip
    oom = {"device": "NVIDIA H200", "fits": False, "error": "CUDA out of memory.", "peak_memory_gib": 139.0}
    (runs / "bf16_moments.json").write_text(json.dumps(fits))
    (runs / "bf16_moments_current.json").write_text(json.dumps(oom))
    stage_functions.summarize_one_gpu_8b(tmp_path)
    summary = json.loads((tmp_path / "one_gpu_8b.json").read_text())
    assert summary["card"] == "NVIDIA H200"
    rows = {row["name"]: row for row in summary["rows"]}
    assert rows["bf16_moments"]["settings"] == stage_functions.ONE_GPU_8B_ROWS["bf16_moments"]
    assert rows["bf16_moments"]["tokens_per_s"] == 15000.0 and rows["bf16_moments"]["plan_gib"] == 121.4
    assert rows["bf16_moments"]["host_peak_rss_gib"] == 9.5
    assert rows["bf16_moments_current"]["fits"] is False and rows["bf16_moments_current"]["tokens_per_s"] is None
