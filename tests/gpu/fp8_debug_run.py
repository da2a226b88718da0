"""Started by tests/gpu/test_fp8_debug_stats.py in a fresh process: TE's debug API must be set up before the
process builds its first Transformer Engine module, which an earlier test in a shared pytest process may have.

Two fits of a small Megatron Llama (2 layers, hidden 1024, seq 1024, GBS 4 in 4 micro-batches) under
``MegatronCPStrategy`` + ``TEFP8Precision(recipe="delayed")`` with ``FP8StatsMonitor(te_debug_stats=...)``:

1. 6 steps, every 2 steps, ``underflows%``, ``overflows%``, ``scale_inv_min``, ``scale_inv_max``, with a
   validation run after steps 3 and 6 (evaluation forwards must not be measured);
2. in the same process, a new model and monitor, 2 steps, every step, ``underflows%``: TE debug works again after
   the first session was ended.

Writes ``<out_dir>/result.json``: what an in-memory Lightning logger received, the config the monitor wrote, the
TE module names, and TE's / nvdlfw-inspect's state after each fit.

    python -m tests.gpu.fp8_debug_run OUT_DIR [--fp8-param-gather]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import seed_everything

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    LlamaLightningModule,
    MockDataModule,
    OptimizerSettings,
    TEFP8Precision,
)
from lightning_llama_fp8.callbacks import FP8StatsMonitor
from tests.gpu.probes import one_gpu_trainer
from tests.helpers import MemoryLogger

GBS = 4
ALL_STATS = ["underflows%", "overflows%", "scale_inv_min", "scale_inv_max"]


def debug_state() -> dict[str, Any]:
    import nvdlfw_inspect.api as debug_api
    from nvdlfw_inspect.logging import MetricLogger
    from transformer_engine.debug.pytorch.debug_state import TEDebugState

    return {
        "debug_manager_is_none": debug_api.DEBUG_MANAGER is None,
        "metric_loggers": len(MetricLogger.enabled_loggers),
        "te_debug_enabled": TEDebugState.debug_enabled,
    }


def run(
    out_dir: Path, steps: int, every: int, stats: list[str], fp8_param_gather: bool, validate: bool
) -> dict[str, Any]:
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()  # the previous fit's amax buffers (as tests/gpu/test_nan_safety.py does)
    seed_everything(1234)
    arch = small_arch(num_layers=2, seq_length=1024)
    logger = MemoryLogger()
    monitor = FP8StatsMonitor(every_n_steps=every, te_debug_stats=stats)
    trainer = one_gpu_trainer(
        TEFP8Precision(recipe="delayed", fp8_param_gather=fp8_param_gather),
        steps,
        [monitor],
        logger=logger,
        default_root_dir=out_dir,
        limit_val_batches=2 if validate else 0,
        val_check_interval=3 if validate else None,
    )
    optim = OptimizerSettings(lr=1.5e-5, min_lr=1e-6, warmup_steps=1, decay_steps=steps)
    module = LlamaLightningModule(arch, optim)
    data = MockDataModule(seq_length=arch.seq_length, vocab_size=arch.vocab_size, global_batch_size=GBS, num_workers=0)
    state_before = debug_state()
    trainer.fit(module, datamodule=data)
    config_path = monitor.te_debug_config_path
    loss = float(module.last_loss) if module.last_loss is not None else math.nan
    return {
        "records": logger.records,
        "last_te_debug_stats": monitor.last_te_debug_stats,
        "config_path": str(config_path) if config_path else None,
        "config": yaml.safe_load(config_path.read_text()) if config_path and config_path.exists() else None,
        "te_module_names": [m.name for m in module.modules() if isinstance(m, TransformerEngineBaseModule)],
        "final_loss": loss,
        "step_times": module.step_times,
        "state_before": state_before,
        "state_after": debug_state(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--fp8-param-gather", action="store_true")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"fp8_param_gather": args.fp8_param_gather}
    try:
        result["first"] = run(args.out_dir / "first", 6, 2, ALL_STATS, args.fp8_param_gather, validate=True)
        result["second"] = run(args.out_dir / "second", 2, 1, ["underflows%"], args.fp8_param_gather, validate=False)
    finally:  # what there is, also when a fit failed (the traceback goes to stderr)
        (args.out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
