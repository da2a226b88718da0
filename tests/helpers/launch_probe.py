"""Started by tests/test_strategy.py (the launcher test): Lightning's own launcher (``devices=2``, no torchrun) on CPU.

The parent process builds the Trainer and lets ``trainer.strategy.launcher`` re-run this script for rank 1, as
``Trainer.fit`` would; every rank then sets up the strategy's environment and writes what it sees.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision


def probe(trainer: Trainer, out_dir: Path) -> None:
    from megatron.core import parallel_state

    strategy = trainer.strategy
    strategy.setup_environment()
    record = {
        "global_rank": strategy.global_rank,
        "world_size": strategy.world_size,
        "cp_group": torch.distributed.get_process_group_ranks(parallel_state.get_context_parallel_group()),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "sampler": strategy.distributed_sampler_kwargs,
    }
    Path(out_dir, f"rank{strategy.global_rank}.json").write_text(json.dumps(record))
    strategy.barrier()
    strategy.teardown()


def main() -> None:
    out_dir = Path(sys.argv[1])
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=MegatronCPStrategy(context_parallel_size=2),
        plugins=[MegatronPrecision()],
        logger=False,
    )
    launcher = trainer.strategy.launcher
    if launcher is not None:  # the parent: start the other rank(s), then run rank 0 here
        launcher.launch(probe, trainer, out_dir, trainer=trainer)
    else:  # a child started by the launcher
        probe(trainer, out_dir)


if __name__ == "__main__":
    main()
