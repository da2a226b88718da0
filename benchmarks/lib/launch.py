"""Launching the benchmark runs, shared by ``benchmarks.compare_megatron_lm`` and ``benchmarks.reference_run``.

Both start ours under ``torch.distributed.run`` and Megatron-LM through ``benchmarks/scripts/megatron_lm_baseline.sh``
(configured by environment variables), send each run's stdout and stderr to one log file, and read Megatron-LM's
memory reports back from that log.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

MEGATRON_LM_BASELINE = Path(__file__).resolve().parents[1] / "scripts" / "megatron_lm_baseline.sh"


def torchrun(nproc: int) -> list[str]:
    """The ``torch.distributed.run`` prefix (this interpreter) for ``nproc`` processes on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]


def megatron_lm_baseline_env(
    *,
    precision: str,
    nproc: int,
    layers: int,
    gbs: int,
    iters: int,
    tp: int,
    cp: int,
    data_path: str | None = None,
    document_masking: bool = False,
) -> dict[str, str]:
    """The environment variables ``megatron_lm_baseline.sh`` reads its run's settings from (``data_path`` None: mock
    data; ``document_masking``: ``--dataloader-inter-document-masking``)."""
    settings = {
        "PRECISION": precision,
        "NPROC": str(nproc),
        "NUM_LAYERS": str(layers),
        "GBS": str(gbs),
        "ITERS": str(iters),
        "TP": str(tp),
        "CP": str(cp),
    }
    if data_path is not None:
        settings["DATA_PATH"] = data_path
    if document_masking:
        settings["DOCUMENT_MASKING"] = "1"
    return settings


def run_logged(cmd: Sequence[str], env: Mapping[str, str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` with exactly ``env``, its stdout and stderr together into ``log`` (overwritten).

    Returns the exit code and the wall-clock seconds of the run; a non-zero exit does not raise, the caller
    decides (with ``log_tail`` for the message).
    """
    start = time.time()
    with log.open("w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.time() - start


def log_tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of ``log``, line endings kept."""
    return "".join(log.read_text().splitlines(keepends=True)[-lines:])


def max_allocated(log_text: str) -> list[float]:
    """Every ``max allocated`` value of Megatron-LM's memory reports in ``log_text``, as printed (MB column)."""
    return [
        float(part.split(":")[1])
        for line in log_text.splitlines()
        if "max allocated" in line
        for part in line.split("|")
        if "max allocated" in part
    ]
