"""Run a test body in N gloo processes on the CPU, the way torchrun would start them.

Each process gets the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so Lightning's
``LightningEnvironment`` sees externally created processes and the strategy takes its real code path.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (for gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def megatron_single_process_groups() -> Iterator[Any]:
    """A 1-process gloo group with Megatron's parallel_state (TP 1, CP 1) built on it, what Megatron's layers read
    when built on the CPU; yields ``parallel_state`` and tears both down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert not dist.is_initialized(), "another test leaked a process group"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
        yield parallel_state
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def allow_dist_checkpointing_on_cpu() -> None:
    """Let megatron-core's distributed checkpoint writer run on a CPU-only machine (tests only).

    Its writer only touches CUDA to wait for pending GPU copies (``torch.cuda.synchronize``) and to place a
    one-element failure flag for an all-reduce (``torch.cuda.current_device``); on the CPU there is nothing to wait
    for and the flag works on the CPU device with gloo. Everything else (sharding, file layout, metadata) runs as
    on the GPU. Call it in the process that saves (spawned workers call it themselves).
    """
    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


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


def run_distributed(
    fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any, timeout_s: float = 900.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result.

    The ranks' exits are polled with ``is_alive`` (waitpid) rather than left to torch's ``join``, which waits on a
    pipe that a process forked by a rank (Megatron's checkpoint writer) inherits and keeps open after the rank died;
    ranks still running after ``timeout_s`` are killed and the test fails instead of hanging CI.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args, str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while any(process.is_alive() for process in context.processes):
        if time.monotonic() > deadline:
            alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout_s:.0f} s: killed")
        time.sleep(0.2)
    for rank, process in enumerate(context.processes):
        if process.exitcode != 0 and not Path(tmp_path, f"rank{rank}.pkl").exists():
            code = process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise AssertionError(f"rank {rank} exited ({how}) before reporting a result")
    results = []
    for rank in range(world_size):
        status, value = pickle.loads(Path(tmp_path, f"rank{rank}.pkl").read_bytes())
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results
