"""A checkpoint saved with context parallelism (TP1 x CP2) resumes with tensor + sequence parallelism (TP2).

Two GPUs; each phase is ``tests/gpu/checkpoint_layouts_run.py`` under torchrun. The optimizer state is saved
``fully_reshardable``, the format that can change TP and CP. BF16: the resumed TP2 steps 5-8 match the
uninterrupted CP2 run within 1e-3 (the two layouts agree to ~5e-5 per step when trained from scratch, see
``benchmarks/results/2026-11-28-h200x2``). FP8 (delayed scaling, amax histories resharded from CP to TP ranks):
within 3%, the bar the layout-equivalence runs use for FP8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def torchrun(phase: str, tp: int, cp: int, precision: str, ckpt_dir: Path, out: Path, name: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29750 + tp),
        "-m", "tests.gpu.checkpoint_layouts_run", phase, "--tp", str(tp), "--cp", str(cp), "--precision", precision,
        "--ckpt-dir", str(ckpt_dir), "--out", str(out), "--name", name,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("precision,tolerance", [("bf16", 1e-3), ("fp8", 0.03)])
def test_cp2_checkpoint_resumes_at_tp2(precision: str, tolerance: float, tmp_path: Path, record: Any) -> None:
    ckpt_dir = tmp_path / "ckpts"
    full = torchrun("save", 1, 2, precision, ckpt_dir, tmp_path, "cp2_uninterrupted")
    resumed = torchrun("resume", 2, 1, precision, ckpt_dir, tmp_path, "tp2_resumed")
    gaps = [abs(a - b) / abs(b) for a, b in zip(resumed["losses"], full["losses"][4:], strict=True)]
    info = json.loads((ckpt_dir / "epoch=0-step=4.ckpt" / "lightning_llama_fp8.json").read_text())
    record(
        f"checkpoint_cp2_to_tp2_{precision}",
        {"uninterrupted_cp2": full["losses"], "resumed_tp2": resumed["losses"], "relative_gaps": gaps, "info": info},
    )
    assert full["global_step"] == resumed["global_step"] == 8 and len(resumed["losses"]) == 4
    assert info["context_parallel_size"] == 2 and info["optimizer_sharding"] == "fully_reshardable"
    assert max(gaps) < tolerance, gaps
