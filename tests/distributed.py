"""Run a test body in N gloo processes on the CPU, the way torchrun would start them.

Each process gets the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so Lightning's
``LightningEnvironment`` sees externally created processes and the strategy takes its real code path.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from tests.helpers import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report any failure to the parent instead of hanging it
        result = ("error", traceback.format_exc())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args, str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    results = []
    for rank in range(world_size):
        status, value = pickle.loads(Path(tmp_path, f"rank{rank}.pkl").read_bytes())
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results
