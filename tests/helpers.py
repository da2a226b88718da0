"""Small helpers shared by the CPU tests."""

from __future__ import annotations

import socket

from lightning.pytorch import Trainer


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (for gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_trainer(**kwargs: object) -> Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or summary."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )
