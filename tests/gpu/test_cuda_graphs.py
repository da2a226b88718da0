"""CUDA graphs of the transformer layers on one GPU: every layer is captured after the warm-up steps (and none before),
the run trains like the eager one (same losses within kernel noise), validation in between still runs (eagerly) and
agrees, and the step time is recorded. BF16, FP8 on bf16 weights, and FP8 weights (fp8_param_gather, what
``benchmarks.throughput --cuda-graphs`` runs)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    CudaGraphSettings,
    LlamaLightningModule,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    TEFP8Precision,
)
from lightning_llama_fp8.parallel.cuda_graphs import graphed_layers
from tests.gpu.probes import StepProbe, one_gpu_trainer, short_run_optimizer

STEPS, GBS, WARMUP = 12, 4, 3
ARCH = small_arch(num_layers=4, seq_length=2048)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class GraphedLayers(Callback):
    """Per training step, after it: how many modules hold captured CUDA graphs (Megatron puts them on each layer)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.counts.append(graphed_layers(pl_module))


PLUGINS = {
    "bf16": lambda: MegatronPrecision(),
    "fp8": lambda: TEFP8Precision(fp8_param_gather=False),
    "fp8_param_gather": lambda: TEFP8Precision(fp8_param_gather=True),
}


def _train(precision: str, graphs: bool) -> tuple[StepProbe, StepTimes, GraphedLayers, Any]:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()
    seed_everything(1234)
    probe, times, graphed_layers = StepProbe(), StepTimes(), GraphedLayers()
    trainer = one_gpu_trainer(
        PLUGINS[precision](),
        STEPS,
        [probe, times, graphed_layers],
        strategy=MegatronCPStrategy(cuda_graphs=CudaGraphSettings(warmup_steps=WARMUP) if graphs else None),
        limit_val_batches=1,
        val_check_interval=6,  # one validation between replayed steps
        check_val_every_n_epoch=None,
    )
    module = LlamaLightningModule(ARCH, short_run_optimizer(STEPS))
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    trainer.fit(module, datamodule=data)
    return probe, times, graphed_layers, trainer


@pytest.mark.parametrize("precision", list(PLUGINS))
def test_graphed_layers_train_like_eager_ones(precision: str, record: Any) -> None:
    eager, eager_times, eager_layers, eager_trainer = _train(precision, graphs=False)
    graphed, graphed_times, graphed_layers, trainer = _train(precision, graphs=True)
    assert trainer.global_step == STEPS
    eager_val, graphed_val = (float(t.callback_metrics["val/loss"]) for t in (eager_trainer, trainer))
    gaps = [abs(a - b) / abs(b) for a, b in zip(graphed.losses, eager.losses, strict=True)]
    replayed = slice(WARMUP + 2, None)  # after the capture step
    record(
        f"cuda_graphs_{precision}",
        {
            "eager_losses": eager.losses,
            "graphed_losses": graphed.losses,
            "relative_loss_gaps": gaps,
            "graphed_modules_per_step": graphed_layers.counts,
            "eager_val_loss": eager_val,
            "graphed_val_loss": graphed_val,
            "eager_step_s": eager_times.seconds,
            "graphed_step_s": graphed_times.seconds,
            "eager_median_replayed_steps_s": sorted(eager_times.seconds[replayed])[
                len(eager_times.seconds[replayed]) // 2
            ],
            "graphed_median_replayed_steps_s": sorted(graphed_times.seconds[replayed])[
                len(graphed_times.seconds[replayed]) // 2
            ],
        },
    )
    # Captured before step WARMUP + 1 (0-based WARMUP), every layer, and never in the eager run.
    assert graphed_layers.counts[:WARMUP] == [0] * WARMUP and set(graphed_layers.counts[WARMUP:]) == {ARCH.num_layers}
    assert set(eager_layers.counts) == {0}
    assert max(gaps) < 1e-3, gaps  # the replayed layers compute the same (warm-up steps: the same eager kernels)
    assert abs(graphed_val - eager_val) / eager_val < 1e-3, (graphed_val, eager_val)  # validation runs eagerly
