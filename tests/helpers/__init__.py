"""Helpers shared by the CPU tests (tests/gpu uses some of them too).

The general ones are re-exported here (``from tests.helpers import cpu_trainer``); the rest is imported from its
module: ``models`` (the tiny test model and mock data), ``fp8_fakes``, ``hf_models``, ``checkpoints``, ``corpora``,
``megatron_lm``, ... Fixtures shared by test files of several folders are in tests/conftest.py.
"""

from tests.helpers.distributed import (
    allow_dist_checkpointing_on_cpu,
    free_port,
    megatron_single_process_groups,
    run_distributed,
)
from tests.helpers.paths import LAUNCH_PROBE, MULTINODE_PROBE, REPO_ROOT
from tests.helpers.trainers import (
    MemoryLogger,
    NeverBuilt,
    StrategyWithoutDDP,
    cpu_trainer,
    fit_never_built,
    megatron_cpu_trainer,
)

__all__ = [
    "LAUNCH_PROBE",
    "MULTINODE_PROBE",
    "REPO_ROOT",
    "MemoryLogger",
    "NeverBuilt",
    "StrategyWithoutDDP",
    "allow_dist_checkpointing_on_cpu",
    "cpu_trainer",
    "fit_never_built",
    "free_port",
    "megatron_cpu_trainer",
    "megatron_single_process_groups",
    "run_distributed",
]
