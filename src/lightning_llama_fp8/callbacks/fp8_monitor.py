"""``FP8StatsMonitor``: per-layer FP8 amax and scale in the Lightning loggers, every N optimizer steps.

Delayed scaling picks each tensor's FP8 scale from past amaxes; a layer whose amax creeps up (or whose scale
collapses) is where overflow, and later NaN, starts. This callback logs, per TE module with delayed-scaling
state, ``fp8/<module name>/<stat>`` for the stats of :func:`~lightning_llama_fp8.fp8_state.fp8_scaling_summary`
(``fwd_amax``, ``bwd_amax``, ``fwd_scale_min``, ``fwd_scale_max``, ``bwd_scale_min``, ``bwd_scale_max``), at
``trainer.global_step`` N, 2N, ...

Cost: the module list is built once, at fit start; on other steps the hook returns after an integer check. On a
logging step it launches a few tiny kernels per module and makes one device->host copy, on global rank zero only:
after TE's amax reduction the values are the same on every rank of the amax group (TP x DP x CP), so other ranks
would only repeat them.

Transformer Engine's own precision debug tools (``transformer_engine.debug`` on the ``nvdlfw-inspect`` package)
measure something different and complementary: statistics of the quantized tensors themselves, e.g.
``LogFp8TensorStats`` (``underflows%``: the share of elements that became zero in FP8) and ``LogTensorStats``
(``cur_amax``, ``dynamic_range``, ...), per GEMM tensor. They can run next to this monitor:

1. write a YAML config selecting layers and features, e.g.::

       fp8_underflows:
         enabled: True
         layers:
           layer_name_regex_pattern: .*linear_fc.*
         transformer_engine:
           LogFp8TensorStats:
             enabled: True
             tensors: [activation, gradient, weight]
             stats: [underflows%]
             freq: 100

2. on every rank, *before the model is built* (before ``trainer.fit``, which builds it in ``configure_model``)::

       import nvdlfw_inspect.api as debug_api
       debug_api.initialize(config_file="fp8_debug.yaml",
                            feature_dirs=["<site-packages>/transformer_engine/debug/features"],
                            log_dir="./fp8_debug")

3. call ``debug_api.step()`` once per optimizer step (e.g. from ``on_train_batch_end`` of a small callback).

Their statistics go to ``log_dir`` (or a TensorBoard writer), not to the Lightning loggers; this callback does
not initialise or imitate them. Reading a quantized tensor's statistics costs a reduction per tensor per
logged step, so use ``freq`` > 1 there as here.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_llama_fp8.fp8_state import scaling_summary

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

LOGGED_STATS = ("fwd_amax", "fwd_scale_min", "fwd_scale_max", "bwd_amax", "bwd_scale_min", "bwd_scale_max")


class FP8StatsMonitor(Callback):
    """Log each FP8 layer's newest amax and its scale range every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: log when ``trainer.global_step`` (optimizer steps taken) is a positive multiple of this.
            Independent of ``Trainer(log_every_n_steps)``: the metrics go to the loggers directly.
        modules: only modules whose name (as in ``pl_module.named_modules()``) contains one of these substrings,
            e.g. ``["layers.0.", "layers.31."]``; ``None`` logs all FP8 modules.

    After each logging step ``last_summary`` holds the summary that was logged (rank zero).
    """

    def __init__(self, every_n_steps: int = 100, modules: list[str] | None = None) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"FP8StatsMonitor every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        if modules is not None:
            # A bare string is refused: iterating it would give single characters, matching almost every name.
            if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
                raise ValueError(
                    f"FP8StatsMonitor modules must be a non-empty list of name substrings (or None for all FP8 "
                    f"modules), got {modules!r}."
                )
            modules = list(modules)
        self.every_n_steps = every_n_steps
        self.modules = modules
        self.last_summary: dict[str, dict[str, float]] = {}
        self._candidates: list[tuple[str, nn.Module]] = []
        self._active = False
        self._last_logged_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fit start rather than setup: LightningModules such as LlamaLightningModule build their model in
        # configure_model, which runs after the setup hooks, and the strategy then wraps it (renaming modules).
        self._active = False
        self._candidates = []
        self._last_logged_step = -1
        self.last_summary = {}
        if not trainer.is_global_zero:
            return
        if not trainer.loggers:
            rank_zero_warn("FP8StatsMonitor: the Trainer has no logger, so there is nothing to log FP8 stats to.")
            return
        # TE modules have an fp8_meta dict from construction, but create their scaling state only in their first
        # FP8 forward; so keep every module that has fp8_meta and look for the state when logging.
        with_meta = [(n, m) for n, m in pl_module.named_modules() if isinstance(getattr(m, "fp8_meta", None), dict)]
        self._candidates = [(n, m) for n, m in with_meta if self._selected(n)]
        if not self._candidates:
            if with_meta:
                rank_zero_warn(
                    f"FP8StatsMonitor: none of the {len(with_meta)} modules with FP8 state matches "
                    f"modules={self.modules}; nothing will be logged."
                )
            else:
                rank_zero_warn(
                    "FP8StatsMonitor: the model has no Transformer Engine module with FP8 state (a BF16 run, or a "
                    "model without TE layers); nothing will be logged."
                )
            return
        self._active = True
        if importlib.util.find_spec("nvdlfw_inspect") is not None:
            log.info(
                "FP8StatsMonitor logs TE's delayed-scaling amaxes and scales. nvdlfw-inspect is installed: TE's "
                "debug features (LogFp8TensorStats, ...) can add per-tensor FP8 statistics; see the "
                "lightning_llama_fp8.callbacks.fp8_monitor module docstring."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = trainer.global_step
        # The last test catches batches that only accumulated gradients (global_step did not move).
        if step == 0 or step % self.every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        summary = scaling_summary(self._candidates)
        if not summary:
            self._active = False
            rank_zero_warn(
                f"FP8StatsMonitor: after {step} steps none of the {len(self._candidates)} TE modules holds "
                "delayed-scaling state (FP8 off, or a recipe such as current scaling or MXFP8 that keeps no amax "
                "history); nothing will be logged."
            )
            return
        metrics = {f"fp8/{name}/{stat}": stats[stat] for name, stats in summary.items() for stat in LOGGED_STATS}
        for logger in trainer.loggers:
            # Straight to the loggers: self.log values are only written on log_every_n_steps boundaries and
            # dropped otherwise, which would lose every reading whose step is not aligned with that setting.
            logger.log_metrics(metrics, step=step)
        self.last_summary = summary

    def _selected(self, name: str) -> bool:
        return self.modules is None or any(part in name for part in self.modules)
