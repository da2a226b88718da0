"""MegatronCPStrategy under Lightning's own launcher (``Trainer(devices=2)`` started with plain ``python``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import LAUNCH_PROBE, REPO_ROOT

PROBE = LAUNCH_PROBE
REPO = REPO_ROOT


def test_lightning_launcher_starts_both_ranks_with_megatron_groups(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["global_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    # CP 2 on 2 processes: one context-parallel group of both ranks, data-parallel size 1.
    assert all(r["cp_group"] == [0, 1] and r["dp_size"] == 1 for r in records)
    assert all(r["sampler"] == {"num_replicas": 1, "rank": 0} for r in records)
