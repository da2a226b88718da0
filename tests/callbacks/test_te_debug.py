"""FP8StatsMonitor(te_debug_stats=...) through Lightning's fit loop on the CPU (``callbacks/te_debug.py``).

Shares the predictable fake FP8 modules and the in-memory logger of ``test_fp8_monitor``.
"""

from __future__ import annotations

import importlib.machinery
import logging
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins import Precision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_llama_fp8.callbacks.te_debug as te_debug_mod
from lightning_llama_fp8.callbacks.fp8_monitor import FP8StatsMonitor
from tests.helpers import MemoryLogger
from tests.helpers.fp8_fakes import PredictableFP8Linear, TinyFP8Module, fit

# Transformer Engine's debug statistics (te_debug_stats) through the same fit loop. TE is not installed here, so
# a small stand-in does what TE does with nvdlfw-inspect (transformer_engine/debug/..., TE 2.20): its modules
# check at construction that the debug API came first, read the debug iteration in forward and record it; the
# debug step reports, for each layer the config selects and each tensor whose `freq` divides that iteration,
# `MetricLogger.log_scalar(f"{layer}_{tensor}_{stat}", value, iteration)`. Value: iteration + 0.1 * tensor index +
# 0.01 * stat index, so each reading says which step it measured. nvdlfw-inspect itself is either a stand-in too
# ("fake", always) or the real package ("real", where installed; CI does not have it), which then also checks
# the config, the logger type and the clean-up against its own code.

DEBUG_TENSORS = ("activation", "gradient", "weight")
DEBUG_STATS = ("underflows%", "overflows%", "scale_inv_min", "scale_inv_max", "mse")


def debug_value(iteration: int, tensor: str, stat: str) -> float:
    return iteration + 0.1 * DEBUG_TENSORS.index(tensor) + 0.01 * DEBUG_STATS.index(stat)


class FakeTEState:
    """What the TE stand-in saw: forwards (layer name, debug iteration, training?) and debug steps."""

    fed: list[tuple[str, int, bool]] = []
    all_fed: list[tuple[str, int, bool]] = []
    steps = 0

    @classmethod
    def clear(cls) -> None:
        cls.fed, cls.all_fed, cls.steps = [], [], 0

    @classmethod
    def log_stats(cls) -> None:
        """TE's STATS_BUFFERS.log_stats: report each selected layer's tensors at the iteration they were fed."""
        from nvdlfw_inspect.config_manager import ConfigManager
        from nvdlfw_inspect.logging import MetricLogger

        done: set[tuple[str, str, int]] = set()
        for name, iteration, _ in cls.fed:
            feature = ConfigManager.get_config_for_layer(name).get("transformer_engine", {}).get("LogFp8TensorStats")
            if not feature or not feature["enabled"]:
                continue
            for item in feature["tensors_struct"]:
                tensor = item["tensor"]
                # TE: enabled when iteration % freq == 0 and iteration >= start_step (0); micro-batches combine.
                if iteration < 0 or iteration % item["freq"] or (name, tensor, iteration) in done:
                    continue
                done.add((name, tensor, iteration))
                for stat in item["stats"]:
                    value = torch.tensor(debug_value(iteration, tensor, stat))
                    MetricLogger.log_scalar(f"{name}_{tensor}_{stat}", value, iteration)
        cls.fed = []


class FakeTEDebugState:
    """transformer_engine.debug.pytorch.debug_state.TEDebugState."""

    debug_enabled: bool | None = None
    resets = 0

    @classmethod
    def initialize(cls) -> None:
        if "nvdlfw_inspect" not in sys.modules:  # as TE: without the package imported, the state stays unknown
            return
        api = sys.modules.get("nvdlfw_inspect.api")
        manager = getattr(api, "DEBUG_MANAGER", None)
        if cls.debug_enabled is False and manager is not None:
            raise RuntimeError("nv_dlfw_inspect module should be initialized before the first TE module")
        cls.debug_enabled = manager is not None

    @classmethod
    def _reset(cls) -> None:
        cls.debug_enabled = None
        cls.resets += 1
        FakeTEState.fed = []


class FakeTELinear(PredictableFP8Linear):
    """A TE module: checks the debug state when built, feeds the debug buffers in forward (TE: is_debug_iter)."""

    def __init__(self, factor: float) -> None:
        if not FakeTEDebugState.debug_enabled:
            FakeTEDebugState.initialize()
        super().__init__(factor)
        self.name: str | None = None
        self.primary_weights_in_fp8 = False

    def forward(self, x: Tensor) -> Tensor:
        if FakeTEDebugState.debug_enabled:
            iteration = sys.modules["nvdlfw_inspect.api"].DEBUG_MANAGER._trainer_iteration_count
            entry = (str(self.name), int(iteration), self.training)
            FakeTEState.fed.append(entry)
            FakeTEState.all_fed.append(entry)
        return super().forward(x)


# Loaded by the real nvdlfw-inspect from the "TE features" folder, as it loads transformer_engine/debug/features.
FEATURE_FILE = """
import sys

from nvdlfw_inspect.base import BaseNamespaceAPI
from nvdlfw_inspect.registry import Registry, api_method

_te = sys.modules["transformer_engine.debug.pytorch.debug_state"]


@Registry.register_namespace_api(namespace="transformer_engine")
class TransformerEngineAPI(BaseNamespaceAPI):
    def input_assertions_hook(self, api_name, **kwargs):
        pass

    def routing_condition(self, api_name, config, layer_name, feature_obj, **kwargs):
        return True, None

    def output_assertions_hook(self, api_name, ret, **kwargs):
        pass

    def is_multiple_feature_invocation_allowed(self, api_name):
        return False

    def step(self):
        _te.FakeTEState.steps += 1
        _te.FakeTEState.log_stats()

    def end_debug(self):
        _te.TEDebugState._reset()


@Registry.register_feature(namespace="transformer_engine")
class LogFp8TensorStats:
    @api_method
    def inspect_tensor(self, config, layer_name, **kwargs):
        return None
"""


def fake_module(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = attrs.pop("__path__", [])
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def install_modules(monkeypatch: pytest.MonkeyPatch, modules: dict[str, types.ModuleType]) -> None:
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent in modules:
            setattr(modules[parent], child, module)


def fake_nvdlfw_modules() -> dict[str, types.ModuleType]:
    """nvdlfw-inspect 0.2.2's api / logging / config_manager, as far as TE and the monitor use them."""

    class BaseLogger:
        def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
            raise NotImplementedError

    class MetricLogger:
        enabled_loggers: list[Any] = []

        @staticmethod
        def log_scalar(name: str, value: Any, iteration: int, **kwargs: Any) -> None:
            for logger in MetricLogger.enabled_loggers:
                logger.log_scalar(name, value, iteration, **kwargs)

    class ConfigManager:
        config: dict[str, Any] = {}

        @classmethod
        def get_config_for_layer(cls, name: str) -> dict[str, Any]:
            for section in cls.config.values():
                if section["enabled"] and re.search(section["layers"]["layer_name_regex_pattern"], name):
                    return {k: v for k, v in section.items() if k not in ("enabled", "layers")}
            return {}

    api = fake_module("nvdlfw_inspect.api", DEBUG_MANAGER=None, calls=[])

    def initialize(
        config_file: Any = "",
        feature_dirs: Any = None,
        statistics_logger: Any = None,
        log_dir: str = ".",
        init_training_step: int = 0,
        **kwargs: Any,
    ) -> None:
        if api.DEBUG_MANAGER is not None:
            raise ValueError("[NVDLFW INSPECT ERROR] Already initialized.")
        assert isinstance(statistics_logger, BaseLogger)
        api.calls.append({"config": config_file, "feature_dirs": feature_dirs, "log_dir": log_dir})
        MetricLogger.enabled_loggers.append(statistics_logger)
        ConfigManager.config = config_file
        api.DEBUG_MANAGER = types.SimpleNamespace(_trainer_iteration_count=init_training_step)

    def initialize_training_step(step: int) -> None:
        if api.DEBUG_MANAGER is not None:
            api.DEBUG_MANAGER._trainer_iteration_count = step

    def step() -> None:
        if api.DEBUG_MANAGER is not None:
            api.DEBUG_MANAGER._trainer_iteration_count += 1
            FakeTEState.steps += 1
            FakeTEState.log_stats()

    def end_debug() -> None:
        if api.DEBUG_MANAGER is not None:
            FakeTEDebugState._reset()  # TE's namespace end_debug
            ConfigManager.config = {}
            MetricLogger.enabled_loggers.clear()
            api.DEBUG_MANAGER = None

    for fn in (initialize, initialize_training_step, step, end_debug):
        setattr(api, fn.__name__, fn)
    return {
        "nvdlfw_inspect": fake_module("nvdlfw_inspect", package=True),
        "nvdlfw_inspect.api": api,
        "nvdlfw_inspect.logging": fake_module(
            "nvdlfw_inspect.logging", BaseLogger=BaseLogger, MetricLogger=MetricLogger
        ),
        "nvdlfw_inspect.config_manager": fake_module("nvdlfw_inspect.config_manager", ConfigManager=ConfigManager),
    }


def fake_te_modules(feature_dir: Path) -> dict[str, types.ModuleType]:
    state = fake_module(
        "transformer_engine.debug.pytorch.debug_state", TEDebugState=FakeTEDebugState, FakeTEState=FakeTEState
    )
    return {
        "transformer_engine": fake_module("transformer_engine", package=True),
        "transformer_engine.debug": fake_module("transformer_engine.debug", package=True),
        "transformer_engine.debug.features": fake_module(
            "transformer_engine.debug.features", package=True, __path__=[str(feature_dir)]
        ),
        "transformer_engine.debug.pytorch": fake_module("transformer_engine.debug.pytorch", package=True),
        "transformer_engine.debug.pytorch.debug_state": state,
        "transformer_engine.pytorch": fake_module("transformer_engine.pytorch", package=True),
        "transformer_engine.pytorch.module": fake_module("transformer_engine.pytorch.module", package=True),
        "transformer_engine.pytorch.module.base": fake_module(
            "transformer_engine.pytorch.module.base", TransformerEngineBaseModule=FakeTELinear
        ),
    }


@dataclass
class DebugStack:
    kind: str
    api: Any
    metric_logger: Any


@pytest.fixture
def te_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Installs the TE stand-in (and the nvdlfw-inspect one) for one test; returns a setter for the kind."""
    FakeTEState.clear()
    FakeTEDebugState.debug_enabled, FakeTEDebugState.resets = None, 0
    feature_dir = tmp_path / "te_features"
    feature_dir.mkdir()
    (feature_dir / "te_stub_features.py").write_text(FEATURE_FILE)
    install_modules(monkeypatch, fake_te_modules(feature_dir))
    stacks: list[DebugStack] = []

    def use(kind: str) -> DebugStack:
        if kind == "fake":
            install_modules(monkeypatch, fake_nvdlfw_modules())
        else:
            pytest.importorskip("nvdlfw_inspect")
        import nvdlfw_inspect.api as api
        from nvdlfw_inspect.logging import MetricLogger

        assert api.DEBUG_MANAGER is None
        stacks.append(DebugStack(kind, api, MetricLogger))
        return stacks[-1]

    yield use
    for stack in stacks:  # a failed test must not leave the real package initialized
        stack.api.end_debug()


class FakeFP8Precision(Precision):
    """What the monitor reads from TEFP8Precision: recipe, fp8_param_gather, fp8_active."""

    def __init__(self, recipe: str = "delayed", fp8_param_gather: bool = False, fp8_active: bool = True) -> None:
        super().__init__()
        self.recipe = recipe
        self.fp8_param_gather = fp8_param_gather
        self.fp8_active = fp8_active


class TinyTEModule(TinyFP8Module):
    """TE-like layers built in configure_model, after the callbacks' setup, as LlamaLightningModule does."""

    def __init__(self, build_now: bool = False, fp8_weights: bool = False) -> None:
        LightningModule.__init__(self)
        self.fp8_weights = fp8_weights
        self.built = 0
        if build_now:
            self.configure_model()

    def configure_model(self) -> None:
        if self.built:
            return
        self.built += 1
        self.layer1 = FakeTELinear(factor=1.0)
        self.block = nn.ModuleDict({"norm": nn.LayerNorm(4), "fc": FakeTELinear(factor=0.5)})
        self.head = nn.Linear(4, 1)
        for layer in (self.layer1, self.block["fc"]):
            layer.primary_weights_in_fp8 = self.fp8_weights

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.training_step(batch, batch_idx)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)


def debug_records(trainer: Trainer) -> dict[int | None, dict[str, float]]:
    out: dict[int | None, dict[str, float]] = {}
    for step, metrics in trainer.logger.records:  # type: ignore[union-attr]
        debug = {k: v for k, v in metrics.items() if k.startswith("fp8_debug/")}
        if debug:
            assert step not in out, f"step {step} logged twice"
            out[step] = debug
    return out


def expected_debug(layers: list[str], tensors: list[str], stats: list[str], step: int) -> dict[str, Any]:
    return {
        f"fp8_debug/{layer}/{tensor}_{stat.replace('%', '_pct')}": pytest.approx(debug_value(step, tensor, stat))
        for layer in layers
        for tensor in tensors
        for stat in stats
    }


def assert_debug_ended(stack: DebugStack) -> None:
    assert stack.api.DEBUG_MANAGER is None
    assert stack.metric_logger.enabled_loggers == []  # the monitor's logger is gone with the session
    assert FakeTEDebugState.debug_enabled is None  # TE may build modules again, debugged or not
    # nvdlfw-inspect's log files are closed (its handlers would otherwise pile up fit after fit).
    assert not [h for h in logging.getLogger("nvdlfw_inspect").handlers if isinstance(h, logging.FileHandler)]


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_te_debug_stats_reach_the_loggers_at_the_monitor_steps(kind: str, te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack(kind)
    stats = ["underflows%", "scale_inv_max"]
    monitor = FP8StatsMonitor(every_n_steps=2, te_debug_stats=stats)
    module = TinyTEModule()
    trainer = fit(
        module,
        monitor,
        max_steps=6,
        default_root_dir=tmp_path,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    )

    records = debug_records(trainer)
    assert sorted(records) == [2, 4, 6]  # the amax metrics' steps
    assert sorted(trainer.logger.fp8_records()) == [2, 4, 6]  # type: ignore[union-attr]
    layers = ["layer1", "block.fc"]  # TE's modules carry their named_modules() names
    for step in (2, 4, 6):  # each reading is the one TE measured in that very step
        assert records[step] == expected_debug(layers, list(DEBUG_TENSORS), stats, step)
    assert monitor.last_te_debug_stats == records[6]
    assert FakeTEState.steps == 6  # debug_api.step() once per optimizer step
    # Validation (sanity check + at steps 3 and 6) ran the TE layers with debug on, at iteration -1: never measured.
    evaluation = [(it, training) for _, it, training in FakeTEState.all_fed if not training]
    assert evaluation and {it for it, _ in evaluation} == {-1}
    assert {name for name, _, _ in FakeTEState.all_fed} == set(layers)
    assert_debug_ended(stack)

    config_path = tmp_path / "fp8_debug" / "te_debug_config.yaml"
    assert monitor.te_debug_config_path == config_path
    config = yaml.safe_load(config_path.read_text())
    assert config == te_debug_mod.te_debug_config(stats, list(DEBUG_TENSORS), 2)
    assert {
        item["freq"]
        for item in config["fp8_stats_monitor"]["transformer_engine"]["LogFp8TensorStats"]["tensors_struct"]
    } == {2}
    if kind == "fake":
        assert stack.api.calls[0]["config"] == config  # every rank gets the config in memory
        assert stack.api.calls[0]["feature_dirs"] == [str(tmp_path / "te_features")]
    else:  # the real package loaded the stand-in's features and wrote its own log next to the config
        assert list((tmp_path / "fp8_debug" / "nvdlfw_inspect_logs").glob("*.log"))


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_te_debug_layer_filter_and_a_second_fit_in_the_same_process(kind: str, te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack(kind)
    first = fit(
        TinyTEModule(),
        FP8StatsMonitor(every_n_steps=2, modules=["block."], te_debug_stats=["mse"], te_debug_tensors=["gradient"]),
        max_steps=4,
        default_root_dir=tmp_path / "first",
    )
    assert debug_records(first) == {s: expected_debug(["block.fc"], ["gradient"], ["mse"], s) for s in (2, 4)}
    assert_debug_ended(stack)

    # The session was ended cleanly: a new model with a new monitor gets TE debug again.
    second = fit(
        TinyTEModule(),
        FP8StatsMonitor(every_n_steps=1, te_debug_stats=["scale_inv_min"]),
        max_steps=2,
        default_root_dir=tmp_path / "second",
    )
    layers = ["layer1", "block.fc"]
    assert debug_records(second) == {
        s: expected_debug(layers, list(DEBUG_TENSORS), ["scale_inv_min"], s) for s in (1, 2)
    }
    assert_debug_ended(stack)


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_te_debug_refuses_a_second_fit_of_the_same_module(kind: str, te_stack: Any, tmp_path: Path) -> None:
    """Its TE layers were built during the first session; TE would run them without debugging, measuring nothing."""
    stack = te_stack(kind)
    module = TinyTEModule()
    fit(module, FP8StatsMonitor(every_n_steps=1, te_debug_stats=["mse"]), max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="use a fresh LightningModule"):
        fit(module, FP8StatsMonitor(every_n_steps=1, te_debug_stats=["mse"]), max_steps=2, default_root_dir=tmp_path)
    assert_debug_ended(stack)


def test_te_debug_steps_once_per_optimizer_step_with_accumulation(te_stack: Any, tmp_path: Path) -> None:
    te_stack("fake")
    trainer = fit(
        TinyTEModule(),
        FP8StatsMonitor(every_n_steps=1, te_debug_stats=["underflows%"], te_debug_tensors=["activation"]),
        max_steps=3,
        accumulate_grad_batches=2,
        default_root_dir=tmp_path,
    )
    assert FakeTEState.steps == 3
    assert debug_records(trainer) == {
        s: expected_debug(["layer1", "block.fc"], ["activation"], ["underflows%"], s) for s in (1, 2, 3)
    }
    # Both micro-batches of step s ran at TE iteration s.
    assert [it for name, it, training in FakeTEState.all_fed if name == "layer1" and training] == [1, 1, 2, 2, 3, 3]


def test_te_debug_with_fp8_weights_keeps_only_scale_stats_for_weights(te_stack: Any, tmp_path: Path) -> None:
    te_stack("fake")
    monitor = FP8StatsMonitor(every_n_steps=2, te_debug_stats=["underflows%", "scale_inv_min"])
    trainer = fit(
        TinyTEModule(fp8_weights=True),
        monitor,
        max_steps=2,
        default_root_dir=tmp_path,
        plugins=[FakeFP8Precision(fp8_param_gather=True)],
    )
    config = yaml.safe_load(Path(str(monitor.te_debug_config_path)).read_text())
    struct = config["fp8_stats_monitor"]["transformer_engine"]["LogFp8TensorStats"]["tensors_struct"]
    assert {item["tensor"]: item["stats"] for item in struct} == {
        "activation": ["underflows%", "scale_inv_min"],
        "gradient": ["underflows%", "scale_inv_min"],
        "weight": ["scale_inv_min"],
    }
    keys = set(debug_records(trainer)[2])
    assert "fp8_debug/layer1/weight_scale_inv_min" in keys
    assert "fp8_debug/layer1/weight_underflows_pct" not in keys
    assert "fp8_debug/layer1/activation_underflows_pct" in keys


def test_te_debug_fp8_weights_the_plugin_did_not_announce_fail_before_the_first_forward(
    te_stack: Any, tmp_path: Path
) -> None:
    stack = te_stack("fake")
    with pytest.raises(RuntimeError, match="keeps its weights in FP8"):
        fit(
            TinyTEModule(fp8_weights=True),
            FP8StatsMonitor(every_n_steps=1, te_debug_stats=["underflows%"]),
            max_steps=2,
            default_root_dir=tmp_path,
        )
    assert FakeTEState.all_fed == []
    assert_debug_ended(stack)


def test_te_debug_overflows_need_delayed_scaling(te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack("fake")
    module = TinyTEModule()
    with pytest.raises(ValueError, match="'overflows%' exists only for delayed scaling"):
        fit(
            module,
            FP8StatsMonitor(every_n_steps=1, te_debug_stats=["underflows%", "overflows%"]),
            max_steps=1,
            default_root_dir=tmp_path,
            plugins=[FakeFP8Precision(recipe="current")],
        )
    assert module.built == 0 and stack.api.DEBUG_MANAGER is None


def test_te_debug_on_a_bf16_run_warns_and_stays_off(te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack("fake")
    monitor = FP8StatsMonitor(every_n_steps=1, te_debug_stats=["underflows%"])
    with pytest.warns(UserWarning, match="trains without FP8"):
        trainer = fit(
            TinyTEModule(),
            monitor,
            max_steps=2,
            default_root_dir=tmp_path,
            plugins=[FakeFP8Precision(fp8_active=False)],
        )
    assert stack.api.calls == [] and FakeTEState.steps == 0
    assert debug_records(trainer) == {}
    assert monitor.te_debug_config_path is None


@pytest.mark.parametrize("missing", ["nvdlfw_inspect", "transformer_engine"])
def test_te_debug_names_the_missing_package_before_the_model_is_built(
    missing: str, te_stack: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    te_stack("fake")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    module = TinyTEModule()
    hint = "pip install nvdlfw-inspect" if missing == "nvdlfw_inspect" else r"transformer_engine\.debug"
    with pytest.raises(ModuleNotFoundError, match=hint):
        fit(module, FP8StatsMonitor(te_debug_stats=["underflows%"]), max_steps=1, default_root_dir=tmp_path)
    assert module.built == 0


def test_te_debug_refuses_te_modules_built_before_it(te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack("fake")
    module = TinyTEModule(build_now=True)  # TE layers in __init__: TE saw no debug API
    assert FakeTEDebugState.debug_enabled is False
    with pytest.raises(RuntimeError, match="already created in this process"):
        fit(module, FP8StatsMonitor(te_debug_stats=["underflows%"]), max_steps=1, default_root_dir=tmp_path)
    assert stack.api.DEBUG_MANAGER is None


def test_te_debug_refuses_a_debug_api_someone_else_initialized(te_stack: Any, tmp_path: Path) -> None:
    stack = te_stack("fake")
    stack.api.DEBUG_MANAGER = types.SimpleNamespace(_trainer_iteration_count=0)
    with pytest.raises(RuntimeError, match="already initialized"):
        fit(TinyTEModule(), FP8StatsMonitor(te_debug_stats=["underflows%"]), max_steps=1, default_root_dir=tmp_path)
    assert stack.api.DEBUG_MANAGER is not None  # not ours to end
    stack.api.DEBUG_MANAGER = None


def test_default_monitor_does_no_te_debug_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither package importable: the default monitor must not need (or touch) them.
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect", None)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monitor = FP8StatsMonitor(every_n_steps=1)
    trainer = fit(TinyFP8Module(), monitor, max_steps=2)
    assert monitor._te_debug is None and monitor.te_debug_config_path is None
    assert debug_records(trainer) == {}
    assert sorted(trainer.logger.fp8_records()) == [1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stats", "tensors", "match"),
    [
        (["underflow"], None, r"unknown statistic\(s\) \['underflow'\]"),
        ("underflows%", None, "must be a non-empty list"),
        ([], None, "must be a non-empty list"),
        (["mxfp8_underflows%"], None, "unknown statistic"),
        (["underflows%"], ["input"], "te_debug_tensors must be a non-empty list"),
        (["underflows%"], "weight", "te_debug_tensors must be a non-empty list"),
        (None, ["weight"], "te_debug_tensors only applies with te_debug_stats"),
    ],
)
def test_te_debug_arguments_are_validated(stats: Any, tensors: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FP8StatsMonitor(te_debug_stats=stats, te_debug_tensors=tensors)


def test_te_debug_config() -> None:
    config = te_debug_mod.te_debug_config(["underflows%", "mse"], ["activation", "weight"], 50, ["layers.0.", "fc1"])
    section = config["fp8_stats_monitor"]
    assert section["enabled"] is True
    pattern = re.compile(section["layers"]["layer_name_regex_pattern"])
    assert pattern.search("model.module.decoder.layers.0.self_attention.linear_qkv")
    assert pattern.search("model.module.decoder.layers.3.mlp.linear_fc1")
    assert not pattern.search("model.module.decoder.layers.10.mlp.linear_fc2")  # "." is literal
    feature = section["transformer_engine"]["LogFp8TensorStats"]
    assert feature["enabled"] is True
    assert feature["tensors_struct"] == [
        {"tensor": "activation", "stats": ["underflows%", "mse"], "freq": 50},
        {"tensor": "weight", "stats": ["underflows%", "mse"], "freq": 50},
    ]
    assert yaml.safe_load(yaml.safe_dump(config, sort_keys=False)) == config
    every = te_debug_mod.te_debug_config(["scale_inv_max"], ["weight"], 1, None, fp8_weights=True)
    assert every["fp8_stats_monitor"]["layers"]["layer_name_regex_pattern"] == ".*"
    with pytest.raises(ValueError, match="leaves nothing to measure"):
        te_debug_mod.te_debug_config(["underflows%", "mse"], ["weight"], 1, None, fp8_weights=True)


def test_stats_collector_names_values_and_one_call_per_step() -> None:
    collector = te_debug_mod.TEDebugStatsCollector(["activation", "weight"], ["underflows%", "scale_inv_min"])
    layer = "model.module.decoder.layers.0.mlp.linear_fc1"
    collector.log_scalar(f"{layer}_activation_underflows%", torch.tensor(1.5), 4)
    collector.log_scalar(f"{layer}_weight_scale_inv_min", 0.25, 4)
    collector.log_scalar("Layer_7_gradient_mse", torch.tensor(3.0), 2)  # not what the monitor asked for
    loggers = [MemoryLogger(), MemoryLogger()]
    newest = collector.flush(loggers)
    expected_4 = {
        f"fp8_debug/{layer}/activation_underflows_pct": 1.5,
        f"fp8_debug/{layer}/weight_scale_inv_min": 0.25,
    }
    assert newest == expected_4
    for logger in loggers:
        assert logger.records == [(2, {"fp8_debug/Layer_7_gradient_mse": 3.0}), (4, expected_4)]
    assert collector.pending == {} and collector.flush(loggers) == {}

    other_rank = te_debug_mod.TEDebugStatsCollector(["activation"], ["underflows%"], enabled=False)
    other_rank.log_scalar(f"{layer}_activation_underflows%", torch.tensor(1.0), 1)
    assert other_rank.pending == {}
