"""Started by tests/test_strategy.py (num_nodes=2) once per process of a 2-node x 2-process job on localhost (CPU).

The launcher (two ``torchrun --nnodes 2`` invocations, or the test imitating ``srun`` with SLURM's variables) has
created the processes; each builds the Trainer with ``num_nodes=2`` as a user script would, sets up the strategy's
environment and writes what it sees to ``<out_dir>/rank<global rank>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision


def main() -> None:
    from megatron.core import parallel_state

    out_dir, tp, cp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    pp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    strategy = MegatronCPStrategy(
        tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, num_nodes=2, strategy=strategy, plugins=[MegatronPrecision()], logger=False
    )
    assert trainer.strategy.launcher is None  # the processes exist already
    strategy.setup_environment()

    def ranks(group: object) -> list[int]:
        return torch.distributed.get_process_group_ranks(group)

    record = {
        "cluster_environment": type(strategy.cluster_environment).__name__,
        "global_rank": strategy.global_rank,
        "local_rank": strategy.local_rank,
        "node_rank": strategy.node_rank,
        "world_size": strategy.world_size,
        "torch_rank": torch.distributed.get_rank(),
        "torch_world_size": torch.distributed.get_world_size(),
        "tp": ranks(parallel_state.get_tensor_model_parallel_group()),
        "cp": ranks(parallel_state.get_context_parallel_group()),
        "dp": ranks(parallel_state.get_data_parallel_group()),
        "pp": ranks(parallel_state.get_pipeline_model_parallel_group()),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "embedding": ranks(parallel_state.get_embedding_group()),
        "sampler": strategy.distributed_sampler_kwargs,
        "reduced": strategy.reduce(torch.tensor([float(strategy.global_rank)]), reduce_op="sum").item(),
    }
    Path(out_dir, f"rank{strategy.global_rank}.json").write_text(json.dumps(record))
    strategy.barrier()
    strategy.teardown()


if __name__ == "__main__":
    main()
