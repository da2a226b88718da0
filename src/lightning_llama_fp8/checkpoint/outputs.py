"""Every directory a training run will write into, checked on the ranks that write there before anything is built.

A checkpoint directory under a regular file, or on a read-only file system, otherwise fails at the first save:
with ``every_n_train_steps: 1000`` after hours of training. The same holds for NaNGuard's reports (written at the
first bad step), the loggers' directories and Transformer Engine's debug output. :func:`output_locations` lists
them from the Trainer's callbacks and loggers, :func:`unwritable_reason` tries each one (creates it if missing,
writes and deletes a small file), and the strategy raises :class:`UnwritableOutputError` on every rank if any rank
failed (``MegatronCPStrategy.setup_environment``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OutputLocation",
    "UnwritableOutputError",
    "checkpoint_bytes_estimate",
    "output_locations",
    "unwritable_reason",
]

#: Bytes a checkpoint stores per parameter with Megatron's distributed optimizer: BF16 weight, fp32 main weight and
#: the two fp32 Adam moments (without optimizer state: the weight only).
CHECKPOINT_BYTES_PER_PARAMETER = {True: 2 + 4 + 4 + 4, False: 2}

PROBE_NAME = ".lightning_llama_fp8_write_probe"


class UnwritableOutputError(OSError):
    """A directory the run will write into cannot be written; raised before training starts."""


@dataclass(frozen=True)
class OutputLocation:
    """A directory the run writes into, what writes there, and whether every rank writes (else global rank 0)."""

    path: Path
    what: str
    every_rank: bool


def output_locations(trainer: Any) -> list[OutputLocation]:
    """The local directories this ``trainer``'s callbacks and loggers will write into (remote URLs left out).

    ``ModelCheckpoint`` (its ``dirpath``; every rank writes its shards), the loggers (rank 0), and every callback
    that says where it writes by defining ``output_directories(trainer)`` returning ``[(path, every_rank), ...]``
    (or ``(path, every_rank, what)``)
    (``NaNGuard``'s reports, ``FP8StatsMonitor``'s TE debug output). Call on every rank: ``trainer.log_dir`` is a
    collective.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    log_dir = trainer.log_dir or trainer.default_root_dir
    found: list[OutputLocation] = []
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if isinstance(callback, ModelCheckpoint):
            # Without a dirpath Lightning saves into <log dir>/checkpoints (<default_root_dir>/... if no logger).
            directory = Path(callback.dirpath) if callback.dirpath is not None else Path(log_dir) / "checkpoints"
            found.append(OutputLocation(directory, f"{name} dirpath", every_rank=True))
        extra = getattr(callback, "output_directories", None)
        if callable(extra):
            for path, every_rank, *what in extra(trainer):
                found.append(OutputLocation(Path(path), " ".join([name, *what]), bool(every_rank)))
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            found.append(OutputLocation(Path(directory), f"{type(logger).__name__} directory", every_rank=False))
    return [location for location in found if "://" not in str(location.path)]


def unwritable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be written (``None``: it can); creates it (and its parents) if missing, as a save would."""
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{PROBE_NAME}.{os.getpid()}"
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def checkpoint_bytes_estimate(arch: Any, with_optimizer: bool = True) -> int:
    """About how many bytes one checkpoint of a model of ``arch`` (a ``LlamaConfig``) takes on disk."""
    return arch.num_parameters() * CHECKPOINT_BYTES_PER_PARAMETER[with_optimizer]


def free_bytes(path: Path) -> int | None:
    """Free space of the file system ``path`` is (or will be created) on; None if it cannot be told."""
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None
