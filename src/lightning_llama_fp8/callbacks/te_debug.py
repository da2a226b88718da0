"""Transformer Engine's FP8 tensor statistics (nvdlfw-inspect debug API) for :class:`FP8StatsMonitor`.

TE's ``LogFp8TensorStats`` debug feature measures the quantized GEMM inputs (``underflows%``, ``overflows%``,
``scale_inv_min``/``max``, ``mse``). Using it takes set-up at the right moments, which :class:`TEDebugSession`
does for the monitor: the debug API must exist before the first TE module is built, TE's modules need names,
``debug_api.step()`` must run on every rank after each optimizer step (TE reduces the statistics there), and the
process-wide state (nvdlfw-inspect's loggers, TE's debug state) must be put back when the fit ends. The
statistics reach the Lightning loggers through :class:`TEDebugStatsCollector`, an nvdlfw-inspect logger.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_llama_fp8._compat.transformer_engine import reset_debug_state

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger


log = logging.getLogger(__name__)

TE_MODULES_BUILT_BEFORE = (
    "FP8StatsMonitor(te_debug_stats=...): Transformer Engine modules were already created in this process without "
    "its debug API, and TE only instruments modules created after the API is set up (which this callback does in "
    "setup()). Build TE layers in LightningModule.configure_model (as LlamaLightningModule does), not in __init__, "
    "and use a fresh LightningModule (and process) for a fit with te_debug_stats."
)

# TE's LogFp8TensorStats statistics for the training recipe (transformer_engine/debug/features/
# log_fp8_tensor_stats.py); recipe-prefixed "what if" stats are left to TE's own tools.
TE_DEBUG_STATS = ("underflows%", "overflows%", "scale_inv_min", "scale_inv_max", "mse")
TE_DEBUG_TENSORS = ("activation", "gradient", "weight")
# These compare the quantized tensor with the high-precision one, which a weight kept in FP8 does not have.
NEEDS_HIGH_PRECISION = ("underflows%", "overflows%", "mse")
TE_DEBUG_DIR = "fp8_debug"
TE_DEBUG_CONFIG_FILE = "te_debug_config.yaml"
NVDLFW_LOGGER_NAME = "nvdlfw_inspect"  # the logging.Logger nvdlfw_inspect's FileLogger adds its handlers to


def te_debug_config(
    stats: Sequence[str],
    tensors: Sequence[str],
    every_n_steps: int,
    modules: Sequence[str] | None = None,
    fp8_weights: bool = False,
) -> dict[str, Any]:
    """The nvdlfw-inspect config that makes TE's ``LogFp8TensorStats`` measure ``stats`` every ``every_n_steps``.

    Layers are selected by ``modules`` (name substrings, as :class:`FP8StatsMonitor` takes them; ``None``: all).
    With ``fp8_weights`` (weights kept in FP8, ``fp8_param_gather``) the weight gets only the statistics TE can
    compute without a high-precision copy (``scale_inv_min``/``scale_inv_max``); TE raises on the others.
    """
    tensors_struct = []
    for tensor in tensors:
        wanted = [s for s in stats if not (fp8_weights and tensor == "weight" and s in NEEDS_HIGH_PRECISION)]
        if wanted:
            tensors_struct.append({"tensor": tensor, "stats": wanted, "freq": every_n_steps})
    if not tensors_struct:
        raise ValueError(
            f"FP8StatsMonitor: te_debug_stats={list(stats)} on te_debug_tensors={list(tensors)} leaves nothing to "
            "measure: with FP8 weights (fp8_param_gather) Transformer Engine has no high-precision weight to compare "
            f"with, so {', '.join(NEEDS_HIGH_PRECISION)} are not available for 'weight'. Add 'activation' or "
            "'gradient', or use scale_inv_min / scale_inv_max."
        )
    pattern = ".*" if modules is None else "|".join(re.escape(m) for m in modules)
    return {
        "fp8_stats_monitor": {
            "enabled": True,
            "layers": {"layer_name_regex_pattern": pattern},
            "transformer_engine": {"LogFp8TensorStats": {"enabled": True, "tensors_struct": tensors_struct}},
        }
    }


class TEDebugStatsCollector:
    """Receives TE's statistics (nvdlfw-inspect's ``BaseLogger.log_scalar``) until the callback forwards them.

    TE calls ``log_scalar(f"{layer}_{tensor}_{stat}", value, iteration)`` once per statistic inside
    ``debug_api.step()``; the values are collected so that each logger gets one ``log_metrics`` call per step.
    Only global rank zero keeps them (every rank receives the same reduced values).
    """

    def __init__(self, tensors: Sequence[str], stats: Sequence[str], enabled: bool = True) -> None:
        self.enabled = enabled
        # Longest first, so that a stat name that ends another one cannot match too early.
        self._suffixes = sorted(
            ((f"_{t}_{s}", t, s) for t in tensors for s in stats), key=lambda x: len(x[0]), reverse=True
        )
        self.pending: dict[int, dict[str, float]] = {}

    def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
        if not self.enabled:
            return
        value = float(value.item()) if hasattr(value, "item") else float(value)
        self.pending.setdefault(int(iteration), {})[self.metric_key(name)] = value

    def metric_key(self, name: str) -> str:
        for suffix, tensor, stat in self._suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return f"fp8_debug/{name[: -len(suffix)]}/{tensor}_{stat.replace('%', '_pct')}"
        return f"fp8_debug/{name.replace('%', '_pct')}"

    def flush(self, loggers: Iterable[Logger]) -> dict[str, float]:
        """Send what was collected, one ``log_metrics`` call per step and logger; return the newest step's values."""
        newest: dict[str, float] = {}
        loggers = list(loggers)
        for step in sorted(self.pending):
            newest = self.pending[step]
            for logger in loggers:
                logger.log_metrics(dict(newest), step=step)
        self.pending = {}
        return newest


def validated_te_debug_args(
    stats: list[str] | None, tensors: list[str] | None
) -> tuple[list[str] | None, list[str] | None]:
    if stats is None:
        if tensors is not None:
            raise ValueError(
                "FP8StatsMonitor te_debug_tensors only applies with te_debug_stats (e.g. ['underflows%'])."
            )
        return None, None
    if isinstance(stats, str) or not stats or not all(isinstance(s, str) for s in stats):
        raise ValueError(
            f"FP8StatsMonitor te_debug_stats must be a non-empty list of statistic names (or None for off), got "
            f"{stats!r}; choose from {list(TE_DEBUG_STATS)}."
        )
    unknown = [s for s in stats if s not in TE_DEBUG_STATS]
    if unknown:
        raise ValueError(
            f"FP8StatsMonitor te_debug_stats: unknown statistic(s) {unknown}; Transformer Engine's LogFp8TensorStats "
            f"offers {list(TE_DEBUG_STATS)} for the training recipe."
        )
    if tensors is None:
        tensors = list(TE_DEBUG_TENSORS)
    elif isinstance(tensors, str) or not tensors or any(t not in TE_DEBUG_TENSORS for t in tensors):
        raise ValueError(
            f"FP8StatsMonitor te_debug_tensors must be a non-empty list out of {list(TE_DEBUG_TENSORS)} (or None "
            f"for all), got {tensors!r}."
        )
    return list(dict.fromkeys(stats)), list(dict.fromkeys(tensors))


class TEDebugSession:
    """One fit's use of TE's debug API: set up in ``setup``, stepped after each optimizer step, ended at the end."""

    def __init__(
        self,
        api: Any,
        metric_logger: Any,
        debug_state: Any,
        collector: TEDebugStatsCollector,
        te_module_type: type,
        weight_needs_high_precision: bool,
    ) -> None:
        self.api = api
        self.metric_logger = metric_logger
        self.debug_state = debug_state
        self.collector = collector
        self.te_module_type = te_module_type
        self.weight_needs_high_precision = weight_needs_high_precision
        self.last_step = 0
        self.config_path: Path | None = None  # the config given to TE, written by global rank zero
        self._handlers_before: list[logging.Handler] = []

    @classmethod
    def start(
        cls,
        trainer: pl.Trainer,
        stats: Sequence[str],
        tensors: Sequence[str],
        every_n_steps: int,
        modules: Sequence[str] | None,
    ) -> TEDebugSession | None:
        """Set up TE's debug API on every rank, before the model is built, for ``FP8StatsMonitor``'s statistics
        ``stats`` of ``tensors`` every ``every_n_steps`` on the layers named by ``modules``; ``None`` where there is
        nothing to do. Global rank zero writes the config it gives TE to :attr:`config_path`."""
        if not _worth_starting(trainer):
            return None
        api, base_logger, metric_logger, debug_state, te_module_type, feature_dir = _import_te_debug()
        _check_usable(api, debug_state, stats, getattr(trainer.precision_plugin, "recipe", None))
        fp8_weights = bool(getattr(trainer.precision_plugin, "fp8_param_gather", False))
        config = te_debug_config(stats, tensors, every_n_steps, modules, fp8_weights)
        struct = config["fp8_stats_monitor"]["transformer_engine"]["LogFp8TensorStats"]["tensors_struct"]
        # A subclass of nvdlfw-inspect's BaseLogger: initialize() accepts nothing else.
        collector_type = type("LightningStatsLogger", (TEDebugStatsCollector, base_logger), {})
        collector = collector_type([t["tensor"] for t in struct], stats, enabled=trainer.is_global_zero)
        weight_needs_high_precision = any(
            t["tensor"] == "weight" and any(s in NEEDS_HIGH_PRECISION for s in t["stats"]) for t in struct
        )
        session = cls(api, metric_logger, debug_state, collector, te_module_type, weight_needs_high_precision)

        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / TE_DEBUG_DIR  # log_dir: call on every rank
        if trainer.is_global_zero:
            session.config_path = _save_config(config, out_dir)
            dropped = [s for s in stats if s in NEEDS_HIGH_PRECISION]
            if fp8_weights and "weight" in tensors and dropped:
                log.info("FP8StatsMonitor: weights are kept in FP8, so 'weight' gets no %s.", ", ".join(dropped))
            log.info(
                "FP8StatsMonitor: TE debug statistics %s on %s every %d steps; config: %s",
                stats,
                [t["tensor"] for t in struct],
                every_n_steps,
                session.config_path,
            )
        session._handlers_before = list(logging.getLogger(NVDLFW_LOGGER_NAME).handlers)
        try:
            # The config goes in memory (nvdlfw-inspect takes a dict too): every rank gets the same one without
            # a shared file system. Iterations count optimizer steps; see set_iteration.
            api.initialize(
                config_file=config,
                feature_dirs=[feature_dir],
                statistics_logger=collector,
                log_dir=str(out_dir),
                init_training_step=trainer.global_step + 1,
            )
        except BaseException:
            session.stop()  # the API was not initialized before (checked above): whatever is there now is ours
            raise
        return session

    def prepare(self, pl_module: nn.Module) -> None:
        """Name TE's modules after ``named_modules()`` (TE would call them ``Layer_N``); check FP8 weights."""
        te_modules = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, self.te_module_type)]
        for name, module in te_modules:
            module.name = name  # the layer name TE's debug features select by and report
        if not te_modules:
            rank_zero_warn("FP8StatsMonitor: te_debug_stats is set but the model has no Transformer Engine module.")
        elif self.debug_state.debug_enabled is not True:
            # TE turns debugging on when it builds a module after the API exists; modules built earlier (a second
            # fit of the same LightningModule, TE layers built in __init__) would silently measure nothing.
            raise RuntimeError(TE_MODULES_BUILT_BEFORE)
        if self.weight_needs_high_precision and any(getattr(m, "primary_weights_in_fp8", False) for _, m in te_modules):
            raise RuntimeError(
                "FP8StatsMonitor: the model keeps its weights in FP8, where Transformer Engine can only give "
                "scale_inv_min / scale_inv_max for 'weight'; the precision plugin did not say so (fp8_param_gather), "
                "so the config asks for more. Leave 'weight' out of te_debug_tensors."
            )

    def set_iteration(self, iteration: int) -> None:
        """TE's iteration is the optimizer step being computed: ``global_step + 1`` during training.

        TE measures in iteration i when ``i % every_n_steps == 0`` and reports it as i, so readings land on
        ``global_step`` N, 2N, ... like the amax metrics. -1 during validation: below TE's start step, so
        evaluation forwards are never measured (nor mixed into the next training reading).
        """
        self.api.initialize_training_step(iteration)

    def step(self, trainer: pl.Trainer) -> dict[str, float]:
        """After an optimizer step, on every rank: TE reduces and reports what it measured in that step."""
        self.last_step = trainer.global_step
        self.api.step()
        self.set_iteration(trainer.global_step + 1)
        if not self.collector.pending:
            return {}
        return self.collector.flush(trainer.loggers)

    def stop(self) -> None:
        """End the debug session; TE's and nvdlfw-inspect's process-wide state is left as before ``start``."""
        try:
            self.api.end_debug()  # clears nvdlfw's config, registry and statistics loggers; TE resets its state
        finally:
            if self.collector in self.metric_logger.enabled_loggers:
                self.metric_logger.enabled_loggers.remove(self.collector)
            reset_debug_state(self.debug_state)
            nvdlfw_logger = logging.getLogger(NVDLFW_LOGGER_NAME)
            for handler in [h for h in nvdlfw_logger.handlers if h not in self._handlers_before]:
                nvdlfw_logger.removeHandler(handler)
                handler.close()


def _worth_starting(trainer: pl.Trainer) -> bool:
    """False (with a warning) when there is nothing to measure or nowhere to log; decided before any import."""
    if getattr(trainer.precision_plugin, "fp8_active", None) is False:
        rank_zero_warn(
            "FP8StatsMonitor: te_debug_stats is set but this run trains without FP8 (BF16 precision plugin or "
            "FP8 fallback); TE's FP8 tensor statistics are off."
        )
        return False
    if not trainer.loggers:
        rank_zero_warn("FP8StatsMonitor: te_debug_stats is set but the Trainer has no logger; TE debug is off.")
        return False
    return True


def _check_usable(api: Any, debug_state: Any, stats: Sequence[str], recipe: str | None) -> None:
    """Refuse, before anything is set up, what would fail later or silently measure nothing."""
    if api.DEBUG_MANAGER is not None:
        raise RuntimeError(
            "FP8StatsMonitor(te_debug_stats=...): nvdlfw-inspect's debug API is already initialized in this "
            "process (by other code, or a session that was not ended); end it with "
            "nvdlfw_inspect.api.end_debug() first, or leave te_debug_stats unset and use your own config."
        )
    if debug_state.debug_enabled is False:
        raise RuntimeError(TE_MODULES_BUILT_BEFORE)
    if "overflows%" in stats and recipe is not None and recipe != "delayed":
        raise ValueError(
            f"FP8StatsMonitor te_debug_stats: 'overflows%' exists only for delayed scaling (a scale from past "
            f"amaxes can clip a new, larger value); the {recipe} recipe scales each tensor from its own amax, "
            "so nothing overflows and TE refuses the statistic. Remove 'overflows%'."
        )


def _save_config(config: dict[str, Any], out_dir: Path) -> Path:
    """Write the config given to TE as YAML, for the user to read or reuse with TE's own tools."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TE_DEBUG_CONFIG_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _import_te_debug() -> tuple[Any, type, Any, Any, type, str]:
    """nvdlfw-inspect's API and logger types, TE's debug state, TE's module base class and its features folder."""
    try:
        import nvdlfw_inspect.api as api
        from nvdlfw_inspect.logging import BaseLogger, MetricLogger
    except ImportError as err:
        raise ModuleNotFoundError(
            "FP8StatsMonitor(te_debug_stats=...) needs NVIDIA's nvdlfw-inspect package, Transformer Engine's debug "
            f"API: `pip install nvdlfw-inspect` ({err})."
        ) from err
    try:
        import transformer_engine.debug.features as te_features
        from transformer_engine.debug.pytorch.debug_state import TEDebugState
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    except ImportError as err:
        raise ModuleNotFoundError(
            "FP8StatsMonitor(te_debug_stats=...) needs Transformer Engine with its debug features "
            f"(transformer_engine.debug): `pip install 'transformer-engine[pytorch]'` ({err})."
        ) from err
    return api, BaseLogger, MetricLogger, TEDebugState, TransformerEngineBaseModule, next(iter(te_features.__path__))
