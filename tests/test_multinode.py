"""``num_nodes=2`` with MegatronCPStrategy under torchrun and under SLURM, on localhost (4 CPU processes, gloo).

Lightning picks the cluster environment (``TorchElasticEnvironment`` for torchrun, ``SLURMEnvironment`` for srun);
the strategy takes global rank, world size and node rank from it and builds Megatron's groups over all nodes.
Tensor-parallel groups must stay inside a node (Megatron orders ranks TP first, then CP, then DP), so TP runs
over NVLink and only data-parallel traffic crosses nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import MULTINODE_PROBE, REPO_ROOT, free_port

PROBE = MULTINODE_PROBE
REPO = REPO_ROOT
TIMEOUT_S = 300


def _clean_env() -> dict[str, str]:
    """This process's environment without any launcher's rank variables, and with the package importable."""
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher_vars and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait(processes: list[subprocess.Popen[str]]) -> None:
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _records(out_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.parametrize("pp", [1, 2], ids=["tp2xdp2", "tp2xpp2"])
def test_torchrun_two_nodes_two_processes_each(tmp_path: Path, pp: int) -> None:
    """Two ``torchrun --nnodes 2 --nproc_per_node 2 --node_rank i`` on localhost, TP2 x DP2 or TP2 x PP2."""
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(PROBE),
                str(tmp_path),
                "2",
                "1",
                str(pp),
            ],
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    _wait(nodes)
    records = _records(tmp_path, 4)
    assert {r["cluster_environment"] for r in records} == {"TorchElasticEnvironment"}
    assert [r["global_rank"] for r in records] == [r["torch_rank"] for r in records] == [0, 1, 2, 3]
    assert [(r["node_rank"], r["local_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["world_size"] == r["torch_world_size"] == 4 for r in records)
    # TP inside a node; DP (or the pipeline stages) across the nodes.
    assert [r["tp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(len({records[rank]["node_rank"] for rank in r["tp"]}) == 1 for r in records)
    if pp == 1:
        assert [r["dp"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1)]
        assert [r["reduced"] for r in records] == [2.0, 4.0, 2.0, 4.0]  # sums over each DP group's global ranks
    else:  # stage 0 on node 0, stage 1 on node 1; one model replica, both stages read the same samples
        assert [r["pp_rank"] for r in records] == [0, 0, 1, 1]
        assert [r["pp"] for r in records] == [r["embedding"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["dp"] for r in records] == [[0], [1], [2], [3]]
        assert [r["sampler"] for r in records] == [{"num_replicas": 1, "rank": 0}] * 4


def test_slurm_two_nodes_two_tasks_each(tmp_path: Path) -> None:
    """Four processes with the variables ``srun --nodes 2 --ntasks-per-node 2`` sets, CP2 x DP2."""
    port = free_port()
    tasks = []
    for rank in range(4):
        env = _clean_env() | {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "llama3_8b_fp8",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % 2),
            "SLURM_NODEID": str(rank // 2),
            "MASTER_PORT": str(port),
        }
        tasks.append(
            subprocess.Popen(
                [sys.executable, str(PROBE), str(tmp_path), "1", "2"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    _wait(tasks)
    records = _records(tmp_path, 4)
    assert {r["cluster_environment"] for r in records} == {"SLURMEnvironment"}
    assert [r["global_rank"] for r in records] == [r["torch_rank"] for r in records] == [0, 1, 2, 3]
    assert [(r["node_rank"], r["local_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["world_size"] == 4 for r in records)
    assert [r["cp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1)]
    assert all(r["reduced"] == 6.0 for r in records)  # DP x CP spans all four ranks
