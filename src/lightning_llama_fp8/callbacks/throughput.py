"""``ThroughputMonitor``: tokens/s, TFLOP/s (both FLOP counts), MFU and the time spent waiting for data.

Every ``log_every_n_steps`` optimizer steps it logs, averaged over the last ``window`` timed steps (at Lightning's
step number for that step, the one the module's ``train/*`` values of the same step get):

=================================  ===============================================================================
``throughput/step_time_s``         wall time of an optimizer step, step end to step end
``throughput/tokens_per_sec``      tokens of the global batch per second, all GPUs together
``throughput/tokens_per_sec_per_gpu``  the same divided by the number of GPUs
``throughput/tflops_per_gpu``      model TFLOP/s per GPU counted as Megatron-LM's published table counts them
                                   (attention over the whole ``seq x seq`` square; ``LlamaConfig.flops_per_token()``)
``throughput/tflops_per_gpu_causal``  the same with the causal half of attention only, as Megatron-LM's logs count
                                   (``flops_per_token(causal=True)``; ~11% lower for Llama 3 8B at seq 8192)
``throughput/mfu``                 ``tflops_per_gpu`` over the card's dense BF16 peak (FP8 runs too: the usual
                                   convention, so FP8 and BF16 runs compare); ``throughput/mfu_causal`` likewise
``throughput/data_wait_s``         time per step the training loop waited for ``next()`` on the training dataloader
=================================  ===============================================================================

Peak memory is the module's own ``train/peak_memory_gib`` (``LlamaLightningModule`` logs it), not repeated here.

How it measures, and what it costs: a host clock read at each step end and around each training-batch fetch (the
fetch as Lightning's training loop reports it to the Trainer's profiler), nothing on the GPU. Step ends are real
step boundaries because ``LlamaLightningModule`` reads the loss at the end of every step (which waits for the step's
GPU work) anyway. Steps in which validation ran or a checkpoint was saved are left out of the averages (their wall
time is not training), as is the first step of a fit (nothing to measure it from). Values are host floats sent to
the loggers directly on logging steps (global rank zero; the loggers write only there), so no device tensor is made.

The card is named once at the start of training, with the peak used, or why MFU is not computed (an unknown card:
pass ``peak_tflops``).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_llama_fp8._compat import lightning as compat
from lightning_llama_fp8.validate import as_float, as_int, as_optional_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

TERA = 1e12

# Dense (no 2:4 sparsity) BF16 tensor-core peaks per GPU, from NVIDIA's datasheets, which print twice these figures
# "with sparsity": H100 SXM 1,979 and H100 PCIe 1,513 TFLOPS; H200 (SXM) 1,979 TFLOPS; HGX B200 4.5 PFLOPS per GPU.
# (pattern on torch.cuda.get_device_name(), card, TFLOP/s). "NVIDIA H100 80GB HBM3" is the SXM board; the NVL boards
# (H100 NVL, H200 NVL) have lower peaks and GB200's B200 a higher one, so they do not match.
KNOWN_BF16_DENSE_PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b(?!.*\bNVL\b).*\b(?:SXM|HBM3)\b", "H100 SXM", 989.0),
    (r"\bH200\b(?!.*\bNVL\b)", "H200", 989.0),
    (r"(?<![A-Za-z0-9])B200\b", "B200", 2250.0),
)


@dataclass(frozen=True)
class Peak:
    """The dense BF16 peak MFU is computed against (``tflops``), and which card it is for."""

    card: str
    tflops: float


def bf16_dense_peak(device_name: str) -> Peak | None:
    """The dense BF16 peak of a GPU named ``device_name`` (as ``torch.cuda.get_device_name()`` says), if known."""
    for pattern, card, tflops in KNOWN_BF16_DENSE_PEAKS:
        if re.search(pattern, device_name):
            return Peak(card, tflops)
    return None


@dataclass(frozen=True)
class TimedStep:
    """One optimizer step: its wall time, the part of it spent waiting for data, the tokens of its global batch."""

    seconds: float
    data_wait_seconds: float
    tokens: int


def batch_tokens(batch: Any) -> int | None:
    """Tokens in this rank's batch (``batch["tokens"]``, e.g. ``[micro batches, micro batch size, seq]``), if any."""
    tokens = batch.get("tokens", batch.get("input_ids")) if isinstance(batch, Mapping) else None
    numel = getattr(tokens, "numel", None)
    return int(numel()) if callable(numel) else None


class ThroughputMonitor(Callback):
    """Log step time, tokens/s, TFLOP/s (both FLOP counts), MFU and data wait, averaged over recent steps.

    Args:
        window: how many of the most recent timed steps the logged values average over.
        log_every_n_steps: log when ``trainer.global_step`` is a multiple of this (``None``: the Trainer's
            ``log_every_n_steps``).
        peak_tflops: dense BF16 TFLOP/s per GPU to compute MFU against, for a card not in
            :data:`KNOWN_BF16_DENSE_PEAKS` (or to override it); ``None``: from the table.
        clock: seconds as a float (tests pass a fake one).

    ``last_metrics`` holds the values logged last (on every rank, computed from that rank's clock).
    """

    def __init__(
        self,
        window: int = 20,
        log_every_n_steps: int | None = None,
        peak_tflops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        window = as_int(window, "ThroughputMonitor window", at_least=1)
        log_every_n_steps = as_optional_int(log_every_n_steps, "ThroughputMonitor log_every_n_steps", at_least=1)
        if peak_tflops is not None:
            peak_tflops = as_float(peak_tflops, "ThroughputMonitor peak_tflops", above=0)
        self.window = window
        self.log_every_n_steps = log_every_n_steps
        self.peak_tflops = peak_tflops
        self.clock = clock
        self.peak: Peak | None = None
        self.flops_per_token: tuple[float, float] | None = None  # (published-table count, causal count)
        self.steps: deque[TimedStep] = deque(maxlen=window)
        self.last_metrics: dict[str, float] = {}
        self._undo_fetch_timing: Callable[[], None] | None = None
        self._reset_step()
        self._step_start: float | None = None
        self._last_global_step = -1
        self._last_logged_step = -1
        self._data_parallel_size = 1

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._undo_fetch_timing is None:
            self._undo_fetch_timing = compat.time_training_batch_fetches(trainer, self._add_fetch, self.clock)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._undo_fetch_timing is not None:
            self._undo_fetch_timing()
            self._undo_fetch_timing = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips the teardown hooks after an exception

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps.clear()
        self.last_metrics = {}
        self._reset_step()
        self._step_start = None  # the first step has no start to measure from
        self._last_global_step = trainer.global_step
        self._last_logged_step = -1
        self._data_parallel_size = data_parallel_size(trainer)
        arch = getattr(pl_module, "arch", None)
        flops = getattr(arch, "flops_per_token", None)
        self.flops_per_token = (flops(), flops(causal=True)) if callable(flops) else None
        self.peak, why_not = self._resolve_peak(trainer)
        if self.peak is not None:
            rank_zero_info(
                f"ThroughputMonitor: MFU is computed against the dense BF16 peak of {self.peak.card}, "
                f"{self.peak.tflops:g} TFLOP/s per GPU."
            )
        else:
            rank_zero_info(f"ThroughputMonitor: MFU is not computed: {why_not}.")
        if self.flops_per_token is None:
            rank_zero_info(
                f"ThroughputMonitor: {type(pl_module).__name__} has no `arch.flops_per_token`; TFLOP/s and MFU are "
                "not computed."
            )

    def _resolve_peak(self, trainer: pl.Trainer) -> tuple[Peak | None, str]:
        if self.peak_tflops is not None:
            return Peak("the card given by peak_tflops", float(self.peak_tflops)), ""
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None, f"training on {device.type}, not a GPU"
        import torch

        name = torch.cuda.get_device_name(device)
        peak = bf16_dense_peak(name)
        if peak is not None:
            return Peak(f"{peak.card} ({name})", peak.tflops), ""
        known = ", ".join(card for _, card, _ in KNOWN_BF16_DENSE_PEAKS)
        return None, (
            f"no dense BF16 peak is known for {name!r} (known: {known}); pass ThroughputMonitor(peak_tflops=...) "
            "with the card's dense BF16 TFLOP/s"
        )

    # ------------------------------------------------------------------ measuring
    def _reset_step(self) -> None:
        self._data_wait = 0.0
        self._tokens: int | None = 0
        self._interrupted = False

    def _add_fetch(self, seconds: float) -> None:
        self._data_wait += seconds

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self.clock()
        tokens = batch_tokens(batch)
        self._tokens = None if tokens is None or self._tokens is None else self._tokens + tokens
        if trainer.global_step == self._last_global_step:
            return  # gradient accumulation: the optimizer step is not over yet
        self._last_global_step = trainer.global_step
        if self._step_start is not None and not self._interrupted:
            global_tokens = None if self._tokens is None else self._tokens * self._data_parallel_size
            self.steps.append(TimedStep(now - self._step_start, self._data_wait, global_tokens or 0))
        self._step_start = now
        self._reset_step()
        self._log(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interrupted = True  # the step in progress contains a validation run: not training time

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        self._interrupted = True  # the step in progress contains a checkpoint save

    # ------------------------------------------------------------------ logging
    def compute(self, world_size: int) -> dict[str, float]:
        """The metrics over the steps in the window (empty if none was timed)."""
        if not self.steps:
            return {}
        seconds = sum(step.seconds for step in self.steps)
        tokens = sum(step.tokens for step in self.steps)
        metrics = {
            "throughput/step_time_s": seconds / len(self.steps),
            "throughput/data_wait_s": sum(step.data_wait_seconds for step in self.steps) / len(self.steps),
        }
        if tokens and seconds > 0:
            per_gpu = tokens / seconds / world_size
            metrics["throughput/tokens_per_sec"] = tokens / seconds
            metrics["throughput/tokens_per_sec_per_gpu"] = per_gpu
            if self.flops_per_token is not None:
                full, causal = (flops * per_gpu / TERA for flops in self.flops_per_token)
                metrics["throughput/tflops_per_gpu"] = full
                metrics["throughput/tflops_per_gpu_causal"] = causal
                if self.peak is not None:
                    metrics["throughput/mfu"] = full / self.peak.tflops
                    metrics["throughput/mfu_causal"] = causal / self.peak.tflops
        return metrics

    def _log(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % every or step == self._last_logged_step:
            return
        metrics = self.compute(trainer.world_size)
        if not metrics:
            return
        self._last_logged_step = step
        self.last_metrics = metrics
        for logger in trainer.loggers:
            # Straight to the loggers with host floats: self.log would make a device tensor per value. At the step
            # number Lightning gives the same step's self.log values (optimizer steps before this one), so both
            # share a row in CSV logs and an x value in TensorBoard.
            logger.log_metrics(metrics, step=step - 1)


def data_parallel_size(trainer: pl.Trainer) -> int:
    """Model replicas reading different samples: the sampler's replica count (DP size), 1 without one."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))
