"""benchmarks/real_text.py's ``masking`` summary and its chart (benchmarks/lib/svg_chart.py), on the CPU."""

from __future__ import annotations

import argparse
import csv
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from benchmarks import real_text
from benchmarks.lib.svg_chart import line_chart, nice_ticks


def _metrics(path: Path, val_losses: list[float], step_time: float) -> Path:
    """A Lightning CSV log as ``llama-fp8 fit`` writes it: throughput rows every 10 steps, validation every 50."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["step", "train/loss", "throughput/step_time_s", "throughput/tokens_per_sec", "val/loss", "val/ppl"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for step in range(9, 300, 10):
            writer.writerow({"step": step, "train/loss": 8 - step / 100, "throughput/step_time_s": step_time,
                             "throughput/tokens_per_sec": 32768 / step_time})  # fmt: skip
        for index, loss in enumerate(val_losses):
            writer.writerow({"step": 49 + 50 * index, "val/loss": loss, "val/ppl": 2.718**loss})
    return path


def test_masking_summary_has_both_validation_curves_and_a_chart(tmp_path: Path) -> None:
    masked = _metrics(tmp_path / "m" / "metrics.csv", [7.1, 6.3, 5.9, 5.6, 5.4, 5.2], 0.50)
    unmasked = _metrics(tmp_path / "u" / "metrics.csv", [7.2, 6.4, 6.0, 5.7, 5.5, 5.3], 0.49)
    args = argparse.Namespace(
        masked_csv=masked, unmasked_csv=unmasked, card="NVIDIA H100", config="llama3_1b_text.yaml", corpus_json=None,
        skip_steps=50, max_steps=300,
    )  # fmt: skip
    result = real_text.masking(args)
    assert result["masked"]["val_loss"][0] == [49, 7.1] and len(result["unmasked"]["val_loss"]) == 6
    assert result["final_val_loss"] == {"masked": 5.2, "unmasked": 5.3}
    assert result["masked_s_over_unmasked_s"] == pytest.approx(0.50 / 0.49)
    chart = ElementTree.fromstring(real_text.masking_chart(result))
    lines = chart.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and all(len(line.get("points", "").split()) == 6 for line in lines)
    assert "document masking on" in real_text.masking_chart(result)
    json.dumps(result)  # what the stage writes


def test_moments_summary_judges_bf16_moments_against_the_run_to_run_gap(tmp_path: Path) -> None:
    runs = {
        "default": [7.1, 6.3, 5.9, 5.6, 5.4, 5.20],
        "default_seed2": [7.2, 6.4, 6.0, 5.7, 5.5, 5.25],
        "bf16_moments": [7.1, 6.3, 5.9, 5.6, 5.4, 5.23],
    }
    csvs = [f"{name}={_metrics(tmp_path / name / 'metrics.csv', losses, 0.5)}" for name, losses in runs.items()]
    args = argparse.Namespace(run=csvs, card="NVIDIA H200", config="llama3_1b_text.yaml", skip_steps=50)
    result = real_text.moments(args)
    assert result["steps"] == 300 and result["final_val_loss_bf16_moments"] == 5.23
    assert result["default_run_to_run_gap"] == pytest.approx(0.05)
    assert result["bf16_moments_gap_to_default"] == pytest.approx(0.03) and result["bf16_moments_within_noise"]
    lines = ElementTree.fromstring(real_text.moments_chart(result)).findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3
    json.dumps(result)
    with pytest.raises(SystemExit, match="default_seed2=CSV missing"):
        real_text.moments(argparse.Namespace(run=csvs[::2], card="x", config="c", skip_steps=50))


def test_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(5.2, 7.2) == [5.0, 5.5, 6.0, 6.5, 7.0, 7.5]
    assert nice_ticks(50, 300) == [50, 100, 150, 200, 250, 300]
    assert nice_ticks(3.0, 3.0)[0] <= 3.0 <= nice_ticks(3.0, 3.0)[-1]


def test_chart_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="every series is empty"):
        line_chart({"a": []}, title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="finite"):
        line_chart({"a": [(1.0, float("nan"))]}, title="t", x_label="x", y_label="y")
