"""``FP8StatsMonitor``: per-layer FP8 amax and scale in the Lightning loggers, every N optimizer steps.

Delayed scaling picks each tensor's FP8 scale from past amaxes; a layer whose amax creeps up (or whose scale
collapses) is where overflow, and later NaN, starts. This callback logs, per TE module with delayed-scaling
state, ``fp8/<module name>/<stat>`` for the stats of :func:`~lightning_llama_fp8.fp8.state.fp8_scaling_summary`
(``fwd_amax``, ``bwd_amax``, ``fwd_scale_min``, ``fwd_scale_max``, ``bwd_scale_min``, ``bwd_scale_max``), at
``trainer.global_step`` N, 2N, ...

Cost: the module list is built once, at fit start; on other steps the hook returns after an integer check. On a
logging step it launches a few tiny kernels per module and makes one device->host copy, on global rank zero only:
after TE's amax reduction the values are the same on every rank of the amax group (TP x DP x CP), so other ranks
would only repeat them.

TE's quantized-tensor statistics (opt in, ``te_debug_stats``): amax and scale say where the FP8 range sits, not
how much of a tensor falls off it. ``te_debug_stats=["underflows%", "overflows%"]`` (also ``scale_inv_min``,
``scale_inv_max``, ``mse``) makes the monitor run Transformer Engine's ``LogFp8TensorStats`` debug feature
(``pip install nvdlfw-inspect``) on the GEMM inputs (``activation``, ``gradient``, ``weight``) of the same modules at
the same steps, and log ``fp8_debug/<module name>/<tensor>_<stat>`` with ``%`` as ``_pct`` (``underflows_pct``: the
share of non-zero elements that became zero in FP8). Done by hand, those statistics would go to TE's own log files
and need set-up code in the right places: TE instruments only modules built after its debug API exists, so the
callback sets it up in ``setup`` (before ``configure_model`` builds the model), names TE's modules as
``named_modules()`` does, calls ``debug_api.step()`` after each optimizer step on every rank (TE reduces the
statistics over ranks there) and ends the session when the fit ends. The config it gives TE is saved as
``<log dir>/fp8_debug/te_debug_config.yaml``. Off (the default), nothing of TE's debug API is imported or run; on,
TE takes its debug code path, and reduces per tensor, only on the logging steps.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_llama_fp8.callbacks.te_debug import TE_DEBUG_DIR, TEDebugSession, validated_te_debug_args
from lightning_llama_fp8.fp8.state import scaling_summary
from lightning_llama_fp8.parallel.pipeline import gather_over_pipeline, global_module_name, pipeline_stage
from lightning_llama_fp8.validate import as_int

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
        te_debug_stats: also log Transformer Engine's statistics of the quantized GEMM inputs, out of
            ``underflows%``, ``overflows%`` (delayed scaling only), ``scale_inv_min``, ``scale_inv_max``, ``mse``,
            as ``fp8_debug/<module name>/<tensor>_<stat>`` (see the module docstring). Needs ``nvdlfw-inspect``,
            and no TE module built earlier in the process without it (TE cannot instrument those; refused in
            setup with an explanation). ``None``: off.
        te_debug_tensors: which GEMM inputs ``te_debug_stats`` covers: ``activation``, ``gradient``, ``weight``
            (``None``: all three). Weights kept in FP8 (``fp8_param_gather``) get only the ``scale_inv_*`` stats.

    After each logging step ``last_summary`` holds the amax/scale summary that was logged and
    ``last_te_debug_stats`` the TE statistics (rank zero); ``te_debug_config_path`` is the config written for TE.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        modules: list[str] | None = None,
        te_debug_stats: list[str] | None = None,
        te_debug_tensors: list[str] | None = None,
    ) -> None:
        every_n_steps = as_int(every_n_steps, "FP8StatsMonitor every_n_steps", at_least=1)
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
        self.te_debug_stats, self.te_debug_tensors = validated_te_debug_args(te_debug_stats, te_debug_tensors)
        self.last_summary: dict[str, dict[str, float]] = {}
        self.last_te_debug_stats: dict[str, float] = {}
        self.te_debug_config_path: Path | None = None
        self._candidates: list[tuple[str, nn.Module]] = []
        self._active = False
        self._last_logged_step = -1
        self._te_debug: TEDebugSession | None = None

    def output_directories(self, trainer: pl.Trainer) -> list[tuple[Path, bool, str]]:
        """With TE debug statistics: TE's debug output, which every rank writes (the strategy's pre-flight check)."""
        if not self.te_debug_stats:
            return []
        return [(Path(trainer.log_dir or trainer.default_root_dir) / TE_DEBUG_DIR, True, "TE debug output")]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Setup runs before configure_model builds the model: TE's debug API has to exist before TE's modules.
        if self.te_debug_stats is None or stage != "fit":
            return
        self._stop_te_debug()
        self.last_te_debug_stats = {}
        self._te_debug = TEDebugSession.start(
            trainer, self.te_debug_stats, self.te_debug_tensors, self.every_n_steps, self.modules
        )
        if self._te_debug is not None:
            self.te_debug_config_path = self._te_debug.config_path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fit start rather than setup: LightningModules such as LlamaLightningModule build their model in
        # configure_model, which runs after the setup hooks, and the strategy then wraps it (renaming modules).
        if self._te_debug is not None:
            self._te_debug.prepare(pl_module)  # every rank, before the first forward
        self._active = False
        self._candidates = []
        self._last_logged_step = -1
        self.last_summary = {}
        # With pipeline parallelism each stage holds other layers: every rank reads its own, rank 0 logs them all.
        self._gather_stages = pipeline_stage() is not None
        if not trainer.is_global_zero and not self._gather_stages:
            return
        if not trainer.loggers:
            rank_zero_warn("FP8StatsMonitor: the Trainer has no logger, so there is nothing to log FP8 stats to.")
            return
        # TE modules have an fp8_meta dict from construction, but create their scaling state only in their first
        # FP8 forward; so keep every module that has fp8_meta and look for the state when logging. Names carry
        # global layer numbers (the same metric name whatever the pipeline split).
        modules = dict(pl_module.named_modules())
        with_meta = [(n, m) for n, m in modules.items() if isinstance(getattr(m, "fp8_meta", None), dict)]
        named = [(global_module_name(n, modules), m) for n, m in with_meta]
        self._candidates = [(n, m) for n, m in named if self._selected(n)]
        if self._gather_stages:
            self._active = True  # every stage takes part in the gather, even one whose layers none match
            return
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
        if self.te_debug_stats is None and importlib.util.find_spec("nvdlfw_inspect") is not None:
            log.info(
                "FP8StatsMonitor logs TE's delayed-scaling amaxes and scales. nvdlfw-inspect is installed: "
                "te_debug_stats=['underflows%', ...] adds TE's per-tensor FP8 statistics (LogFp8TensorStats)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._te_debug is not None:  # after a checkpoint restore, global_step is where training resumes
            self._te_debug.last_step = trainer.global_step
            self._te_debug.set_iteration(trainer.global_step + 1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._te_debug is not None and trainer.global_step != self._te_debug.last_step:
            logged = self._te_debug.step(trainer)  # every rank, once per optimizer step
            if logged:
                self.last_te_debug_stats = logged
        if not self._active:
            return
        step = trainer.global_step
        # The last test catches batches that only accumulated gradients (global_step did not move).
        if step == 0 or step % self.every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        summary = scaling_summary(self._candidates)
        if self._gather_stages:  # every stage's layers of this model replica, merged
            summary = {name: stats for part in gather_over_pipeline(summary) for name, stats in part.items()}
            if not trainer.is_global_zero:
                self._active = bool(summary)
                return
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

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._te_debug is not None:
            self._te_debug.set_iteration(-1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._te_debug is not None:
            self._te_debug.set_iteration(trainer.global_step + 1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_te_debug()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_te_debug()  # Lightning skips the teardown hooks after an exception

    def _stop_te_debug(self) -> None:
        session, self._te_debug = self._te_debug, None
        if session is not None:
            session.stop()

    def _selected(self, name: str) -> bool:
        return self.modules is None or any(part in name for part in self.modules)
