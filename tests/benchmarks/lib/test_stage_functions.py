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
