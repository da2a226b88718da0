"""TE's FP8 tensor statistics (``FP8StatsMonitor(te_debug_stats=...)``) reach a Lightning logger on a real GPU.

Our Megatron Llama under ``MegatronCPStrategy`` + ``TEFP8Precision(recipe="delayed")``; each case runs
``tests/gpu/fp8_debug_run.py`` in a fresh process (TE's debug API must come before the process's first TE module)
and checks what its in-memory logger received: ``fp8_debug/<module>/<tensor>_<stat>`` for every FP8 linear layer
at steps 2, 4, 6 (next to the ``fp8/`` amax metrics), sensible values, a clean end of the debug session, and a
second fit in the same process that gets the statistics again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
# Names as the callbacks see them once the strategy has wrapped the GPTModel in Megatron DDP.
LAYERS = [f"model.module.decoder.layers.{i}.{linear}" for i in range(2) for linear in LINEARS]
TENSORS = ("activation", "gradient", "weight")


def run_in_fresh_process(out_dir: Path, fp8_param_gather: bool) -> tuple[dict[str, Any], str, int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "tests.gpu.fp8_debug_run", str(out_dir)]
    if fp8_param_gather:
        command.append("--fp8-param-gather")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    result_path = out_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return result, (proc.stdout + proc.stderr)[-8000:], proc.returncode


def by_step(records: list[list[Any]], prefix: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for step, metrics in records:
        selected = {k: v for k, v in metrics.items() if k.startswith(prefix)}
        if selected:
            assert step not in out, f"{prefix} logged twice at step {step}"
            out[step] = selected
    return out


@pytest.mark.parametrize("fp8_param_gather", [False, True], ids=["bf16_weights", "fp8_weights"])
def test_te_debug_stats_reach_the_lightning_logger(fp8_param_gather: bool, record: Any, tmp_path: Path) -> None:
    pytest.importorskip("nvdlfw_inspect")
    result, output, returncode = run_in_fresh_process(tmp_path, fp8_param_gather)
    first, second = result.get("first", {}), result.get("second", {})
    debug = by_step(first.get("records", []), "fp8_debug/")
    record(
        f"fp8_debug_stats_{'fp8' if fp8_param_gather else 'bf16'}_weights",
        {
            "returncode": returncode,
            "output_tail": output[-3000:] if returncode else "",
            "debug_steps": sorted(debug),
            "step_6": debug.get(6, {}),
            "te_module_names": first.get("te_module_names"),
            "config": first.get("config"),
            "state_after_first": first.get("state_after"),
            "second_steps": sorted(by_step(second.get("records", []), "fp8_debug/")),
            "state_after_second": second.get("state_after"),
            "final_losses": [first.get("final_loss"), second.get("final_loss")],
            "step_times_first": first.get("step_times"),
        },
    )
    assert returncode == 0, output

    # First fit: every 2 steps, at the amax metrics' steps; validation (after steps 3 and 6) adds nothing.
    assert sorted(debug) == [2, 4, 6], sorted(debug)
    assert sorted(by_step(first["records"], "fp8/")) == [2, 4, 6]
    assert set(LAYERS) <= set(first["te_module_names"]), first["te_module_names"]
    names = ["underflows_pct", "overflows_pct", "scale_inv_min", "scale_inv_max"]
    weight_names = ["scale_inv_min", "scale_inv_max"] if fp8_param_gather else names
    for step, metrics in debug.items():
        for layer in LAYERS:
            for tensor in TENSORS:
                for stat in weight_names if tensor == "weight" else names:
                    assert f"fp8_debug/{layer}/{tensor}_{stat}" in metrics, (step, layer, tensor, stat, sorted(metrics))
            if fp8_param_gather:  # TE has no high-precision weight to compare with: not configured, not logged
                assert f"fp8_debug/{layer}/weight_underflows_pct" not in metrics
            # One per-tensor scale per weight (fed once per step, not per micro-batch): min == max.
            w_min, w_max = (metrics[f"fp8_debug/{layer}/weight_scale_inv_{m}"] for m in ("min", "max"))
            assert w_min == pytest.approx(w_max, rel=1e-6), (layer, w_min, w_max)
        for key, value in metrics.items():
            assert math.isfinite(value), (step, key, value)
            if key.endswith("_pct"):
                assert 0.0 <= value <= 100.0, (step, key, value)
            elif "scale_inv" in key:
                assert value > 0.0, (step, key, value)
        for layer in LAYERS:
            for tensor in ("activation", "gradient"):
                lo, hi = (metrics[f"fp8_debug/{layer}/{tensor}_scale_inv_{m}"] for m in ("min", "max"))
                assert lo <= hi * (1 + 1e-6), (layer, tensor, lo, hi)
    # FP8 flushes some small non-zero values to zero somewhere: an all-zero picture would mean nothing was measured.
    underflows = [v for metrics in debug.values() for k, v in metrics.items() if k.endswith("underflows_pct")]
    assert max(underflows) > 0.0, underflows
    assert first["last_te_debug_stats"] == debug[6]

    # The config the monitor gave TE, saved next to the logs.
    struct = first["config"]["fp8_stats_monitor"]["transformer_engine"]["LogFp8TensorStats"]["tensors_struct"]
    assert {item["tensor"] for item in struct} == set(TENSORS) and {item["freq"] for item in struct} == {2}
    assert first["config_path"].startswith(str(tmp_path / "first"))

    # The session ended cleanly, and a second fit in the same process gets the statistics again.
    clean = {"debug_manager_is_none": True, "metric_loggers": 0, "te_debug_enabled": None}
    assert first["state_after"] == clean and second["state_before"] == clean
    second_debug = by_step(second["records"], "fp8_debug/")
    assert sorted(second_debug) == [1, 2]
    tensors_second = ("activation", "gradient") if fp8_param_gather else TENSORS
    for metrics in second_debug.values():
        assert {f"fp8_debug/{layer}/{t}_underflows_pct" for layer in LAYERS for t in tensors_second} <= set(metrics)
    assert second["state_after"] == clean
    assert math.isfinite(first["final_loss"]) and math.isfinite(second["final_loss"])
