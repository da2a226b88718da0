"""TEFP8Precision / MegatronPrecision on the CPU: recipes, support checks, the kwargs they hand to Megatron, autocast.

There is no GPU and no Transformer Engine here, so FP8 support is faked by monkeypatching ``fp8_support``, TE
itself by fake ``transformer_engine`` modules in ``sys.modules`` that record what the plugin asks of them, and a
whole GPU machine (``fake_machine``: torch.cuda answers plus TE's support checks with TE's own reasons) where the
plugin's messages are under test. ``fp8_support`` itself: tests/fp8/test_support.py.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import nn

import lightning_llama_fp8.fp8.support as fp8_support_mod
import lightning_llama_fp8.precision as precision_mod
from lightning_llama_fp8.cli import main as cli_main
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.fp8.recipes import RECIPES
from lightning_llama_fp8.fp8.support import FP8UnavailableError
from lightning_llama_fp8.precision import MegatronPrecision, TEFP8Precision, amax_reduction_group, is_megatron_model
from lightning_llama_fp8.validate import SettingError
from tests.helpers import REPO_ROOT, megatron_single_process_groups
from tests.helpers.gpus import A100, H100, L40S_CUDA_12_8, Machine, no_gpu

BF16_KWARGS = {"bf16": True, "params_dtype": torch.bfloat16}
REFERENCE_FP8_KWARGS = {
    **BF16_KWARGS,
    "fp8": "hybrid",
    "fp8_recipe": "delayed",
    "fp8_margin": 0,
    "fp8_amax_history_len": 1024,
    "fp8_amax_compute_algo": "max",
    "fp8_param": False,
    "fp8_dot_product_attention": False,
}
FP8_KEYS = {k for k in REFERENCE_FP8_KWARGS if k.startswith("fp8")}
BF16_LAYER_KEYS = {"first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"}


def tiny_arch(**overrides: Any) -> Any:
    """llama_tiny with Megatron's local layer spec (no TE needed to build its config or the model)."""
    return get_preset("llama_tiny", transformer_impl="local", **overrides)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def fake_fp8(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend this machine runs FP8; returns the recipes ``fp8_support`` was asked about."""
    asked: list[str] = []

    def fake_support(recipe: str = "delayed", fp8_attention: bool = False) -> tuple[bool, str]:
        asked.append(recipe)
        return True, f"Fake H100 (compute capability 9.0) supports {recipe} FP8."

    monkeypatch.setattr(fp8_support_mod, "fp8_support", fake_support)
    return asked


@dataclass
class FakeDelayedScaling:
    margin: int = 0
    fp8_format: Any = None
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    fp8_dpa: bool = False


@dataclass
class FakeRecipe:
    kind: str
    fp8_format: Any = None
    fp8_dpa: bool = False


class FakeFormat(enum.Enum):
    HYBRID = "hybrid"
    E4M3 = "e4m3"


@dataclass
class FakeTE:
    autocast_calls: list[dict[str, Any]] = field(default_factory=list)
    entered: int = 0
    exited: int = 0


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> FakeTE:
    """Fake ``transformer_engine``, ``.pytorch`` (recording ``autocast``) and ``.common.recipe`` modules."""
    state = FakeTE()

    @contextlib.contextmanager
    def autocast(**kwargs: Any) -> Iterator[None]:
        state.autocast_calls.append(kwargs)
        state.entered += 1
        try:
            yield
        finally:
            state.exited += 1

    te = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    pytorch.autocast = autocast  # type: ignore[attr-defined]
    recipe.DelayedScaling = FakeDelayedScaling  # type: ignore[attr-defined]
    recipe.Format = FakeFormat  # type: ignore[attr-defined]
    recipe.Float8CurrentScaling = lambda **kw: FakeRecipe("current", **kw)  # type: ignore[attr-defined]
    recipe.Float8BlockScaling = lambda **kw: FakeRecipe("blockwise", **kw)  # type: ignore[attr-defined]
    recipe.MXFP8BlockScaling = lambda **kw: FakeRecipe("mxfp8", **kw)  # type: ignore[attr-defined]
    te.pytorch = pytorch  # type: ignore[attr-defined]
    te.common = common  # type: ignore[attr-defined]
    common.recipe = recipe  # type: ignore[attr-defined]
    for module in (te, pytorch, common, recipe):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return state


@pytest.fixture
def megatron_groups() -> Iterator[Any]:
    """A 1-process gloo group with Megatron's parallel_state (TP 1, CP 1) built on it; torn down afterwards."""
    with megatron_single_process_groups() as parallel_state:
        yield parallel_state


def build_gpt(transformer_config_kwargs: dict[str, Any]) -> nn.Module:
    """A tiny Megatron GPTModel on the CPU (parallel_state must be initialised)."""
    arch = tiny_arch(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=128)
    config = arch.transformer_config(use_cpu_initialization=True, **transformer_config_kwargs)
    return arch.build_model(config)


class Container(nn.Module):
    """What the strategy hands convert_module: a LightningModule-like parent with the GPTModel as a child."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


# ---------------------------------------------------------------------------------------------- support


@no_gpu
def test_check_supported_raises_clear_error() -> None:
    plugin = TEFP8Precision()
    with pytest.raises(FP8UnavailableError) as excinfo:
        plugin.check_supported()
    message = str(excinfo.value)
    assert "FP8 training (delayed scaling) is not possible here" in message
    assert "no CUDA GPU is visible" in message  # what is wrong
    assert "compute capability >= 8.9" in message  # what is needed
    assert "fallback='bf16'" in message  # the way out
    assert "MegatronPrecision()" in message
    assert "No FP8 recipe works on this machine" in message
    assert "lightning-llama-fp8[te]" in message
    assert "\n" not in message  # one line: log greps and `match=` see all of it
    assert isinstance(excinfo.value, RuntimeError)
    # Nothing was decided: every later use raises the same error again.
    with pytest.raises(FP8UnavailableError):
        _ = plugin.fp8_active
    with pytest.raises(FP8UnavailableError):
        plugin.transformer_config_kwargs()


@no_gpu
def test_check_supported_names_the_recipe() -> None:
    with pytest.raises(FP8UnavailableError, match=r"FP8 training \(mxfp8 scaling\)"):
        TEFP8Precision(recipe="mxfp8").check_supported()


@no_gpu
def test_bf16_fallback(caplog: pytest.LogCaptureFixture) -> None:
    plugin = TEFP8Precision(fallback="bf16", fp8_param_gather=True)
    with caplog.at_level(logging.WARNING, logger="lightning_llama_fp8.precision"):
        plugin.check_supported()  # does not raise
        plugin.check_supported()  # decided once: no second warning
    warnings = [r for r in caplog.records if r.name == "lightning_llama_fp8.precision"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert "Training in BF16" in text
    assert "no CUDA GPU is visible" in text
    assert plugin.fp8_active is False
    kwargs = plugin.transformer_config_kwargs()
    assert kwargs == BF16_KWARGS
    assert not FP8_KEYS & kwargs.keys()
    assert plugin.ddp_config_kwargs() == {"fp8_param_gather": False}
    assert plugin.optimizer_config_kwargs() == {}


def test_support_decided_once(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision(recipe="tensorwise")
    assert plugin.fp8_active
    plugin.transformer_config_kwargs()
    plugin.ddp_config_kwargs()
    assert fake_fp8 == ["current"]  # asked once, under the canonical name


# ---------------------------------------------------------------------------------------------- kwargs
def test_default_kwargs_are_the_reference_recipe(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision()
    assert plugin.fp8_active is True
    assert plugin.transformer_config_kwargs() == REFERENCE_FP8_KWARGS
    assert plugin.ddp_config_kwargs() == {"fp8_param_gather": False}
    assert plugin.precision == "transformer-engine-fp8"


def test_custom_kwargs_pass_through(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision(fp8_format="e4m3", margin=2, amax_history_len=16, amax_compute_algo="most_recent")
    assert plugin.transformer_config_kwargs() == {
        **BF16_KWARGS,
        "fp8": "e4m3",
        "fp8_recipe": "delayed",
        "fp8_margin": 2,
        "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "most_recent",
        "fp8_param": False,
        "fp8_dot_product_attention": False,
    }


def test_fp8_param_gather(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision(fp8_param_gather=True)
    assert plugin.transformer_config_kwargs() == {**REFERENCE_FP8_KWARGS, "fp8_param": True}
    assert plugin.ddp_config_kwargs() == {"fp8_param_gather": True}
    from megatron.core.distributed import DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, **plugin.ddp_config_kwargs())
    assert ddp_config.fp8_param_gather is True


def test_kwargs_reach_megatron_transformer_config(fake_fp8: list[str]) -> None:
    config = tiny_arch().transformer_config(**TEFP8Precision().transformer_config_kwargs())
    assert config.fp8 == "hybrid"
    assert config.fp8_recipe == "delayed"
    assert config.fp8_margin == 0
    assert config.fp8_amax_history_len == 1024
    assert config.fp8_amax_compute_algo == "max"
    assert config.fp8_param is False
    assert config.bf16 is True
    assert config.params_dtype == torch.bfloat16

    gather = tiny_arch().transformer_config(**TEFP8Precision(fp8_param_gather=True).transformer_config_kwargs())
    assert gather.fp8_param is True


def test_bf16_kwargs_reach_megatron_transformer_config() -> None:
    config = tiny_arch().transformer_config(**MegatronPrecision().transformer_config_kwargs())
    assert config.fp8 is None
    assert config.bf16 is True
    assert config.params_dtype == torch.bfloat16


def test_local_spec_config_builds_without_transformer_engine() -> None:
    """The fused RoPE kernel is TE's: with the local spec it is off, so a CPU-only install can build configs."""
    config = get_preset("llama_tiny", transformer_impl="local").transformer_config()
    assert config.apply_rope_fusion is False
    assert get_preset("llama_tiny").apply_rope_fusion is True  # still on for the TE spec


def test_megatron_precision() -> None:
    plugin = MegatronPrecision()
    plugin.check_supported()  # BF16 runs anywhere
    assert plugin.fp8_active is False
    assert plugin.transformer_config_kwargs() == BF16_KWARGS
    assert plugin.ddp_config_kwargs() == {}
    assert plugin.precision == "bf16-true"
    assert not isinstance(plugin, TEFP8Precision)
    assert isinstance(TEFP8Precision(), MegatronPrecision)  # the strategy accepts both


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"recipe": "nvfp4"},
            r"Unknown FP8 recipe 'nvfp4': use delayed, current \(alias tensorwise\), blockwise or mxfp8",
        ),
        ({"fp8_format": "e5m2"}, r"Unknown FP8 format 'e5m2': use hybrid or e4m3"),
        ({"fallback": "fp16"}, r"fallback must be None or 'bf16', got 'fp16'"),
        ({"amax_compute_algo": "mean"}, r"Unknown amax_compute_algo 'mean': use max or most_recent"),
        ({"amax_history_len": 0}, r"amax_history_len must be a whole number >= 1; got 0\."),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TEFP8Precision(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "setting", "accepted"),
    [
        ({"margin": 2.5}, "margin", "a whole number >= 0"),
        ({"margin": math.nan}, "margin", "a whole number >= 0"),
        ({"margin": -1}, "margin", "a whole number >= 0"),
        ({"margin": True}, "margin", "a whole number >= 0"),
        ({"amax_history_len": 2.5}, "amax_history_len", "a whole number >= 1"),
        ({"amax_history_len": math.inf}, "amax_history_len", "a whole number >= 1"),
        ({"recipe": "current", "bf16_first_layers": 1.5}, "bf16_first_layers", "a whole number >= 0"),
        ({"recipe": "current", "bf16_last_layers": -1}, "bf16_last_layers", "a whole number >= 0"),
        ({"fp8_param_gather": "false"}, "fp8_param_gather", "true or false"),
        ({"fp8_attention": 1}, "fp8_attention", "true or false"),
        ({"fast_weight_refresh": None}, "fast_weight_refresh", "true or false"),
    ],
)
def test_numbers_and_switches_are_what_they_look_like(kwargs: dict[str, Any], setting: str, accepted: str) -> None:
    """margin=2.5 or NaN, amax_history_len=2.5 used to be accepted and handed to Transformer Engine."""
    with pytest.raises(SettingError, match=rf"^TEFP8Precision: {setting} must be {accepted}; got ") as err:
        TEFP8Precision(**kwargs)
    assert repr(kwargs[setting]) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    plugin = TEFP8Precision(margin=1.0, amax_history_len="16")
    assert (plugin.margin, plugin.amax_history_len) == (1, 16)
    assert type(plugin.margin) is int and type(plugin.amax_history_len) is int
    # Still the reference defaults, so another recipe accepts them (DELAYED_DEFAULTS compares values).
    TEFP8Precision(recipe="current", margin=0.0, amax_history_len=1024.0)  # type: ignore[arg-type]
    with pytest.raises(SettingError) as err:
        TEFP8Precision(margin=0.5, amax_history_len=0, fp8_attention="yes")  # every problem at once
    assert all(f"{name} must be" in str(err.value) for name in ("margin", "amax_history_len", "fp8_attention"))


def test_constructor_does_not_probe_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(recipe: str = "delayed") -> tuple[bool, str]:
        raise AssertionError("fp8_support called at construction")

    monkeypatch.setattr(fp8_support_mod, "fp8_support", boom)
    TEFP8Precision()  # the CLI parser instantiates plugins before the pre-flight runs


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("recipe", "fp8_format", "expected"),
    [
        ("tensorwise", "hybrid", FakeRecipe("current", FakeFormat.HYBRID)),
        ("current", "e4m3", FakeRecipe("current", FakeFormat.E4M3)),
        ("blockwise", "e4m3", FakeRecipe("blockwise", FakeFormat.E4M3)),
        ("mxfp8", "e4m3", FakeRecipe("mxfp8", FakeFormat.E4M3)),
        ("delayed", "e4m3", FakeDelayedScaling(0, FakeFormat.E4M3, 1024, "max")),
    ],
)
def test_te_recipe(fake_te: FakeTE, recipe: str, fp8_format: str, expected: Any) -> None:
    assert TEFP8Precision(recipe=recipe, fp8_format=fp8_format).te_recipe() == expected  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- autocast
def test_plain_module_gets_one_te_autocast(fake_fp8: list[str], fake_te: FakeTE) -> None:
    plugin = TEFP8Precision()
    module = nn.Linear(4, 4)
    assert not is_megatron_model(module)
    assert plugin.convert_module(module) is module
    with plugin.forward_context():
        assert fake_te.entered == 1
        assert fake_te.exited == 0
    assert fake_te.exited == 1
    assert len(fake_te.autocast_calls) == 1
    call = fake_te.autocast_calls[0]
    assert set(call) == {"enabled", "recipe", "amax_reduction_group"}
    assert call["enabled"] is True
    assert call["amax_reduction_group"] is None  # no parallel_state: TE reduces over the world
    assert call["recipe"] == FakeDelayedScaling(
        margin=0, fp8_format=FakeFormat.HYBRID, amax_history_len=1024, amax_compute_algo="max"
    )


def test_plain_module_autocast_uses_megatron_amax_group(
    fake_fp8: list[str], fake_te: FakeTE, megatron_groups: Any
) -> None:
    plugin = TEFP8Precision()
    plugin.convert_module(nn.Linear(4, 4))
    with plugin.forward_context():
        pass
    assert len(fake_te.autocast_calls) == 1
    expected = megatron_groups.get_amax_reduction_group(with_context_parallel=True)
    assert fake_te.autocast_calls[0]["amax_reduction_group"] is expected


@no_gpu
def test_plain_module_no_autocast_in_bf16_fallback(fake_te: FakeTE) -> None:
    plugin = TEFP8Precision(fallback="bf16")
    plugin.convert_module(nn.Linear(4, 4))
    with plugin.forward_context():
        pass
    assert fake_te.autocast_calls == []


def test_megatron_model_is_not_wrapped_in_a_second_autocast(
    fake_fp8: list[str], fake_te: FakeTE, megatron_groups: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = TEFP8Precision()
    gpt = build_gpt(plugin.transformer_config_kwargs())
    assert gpt.config.fp8 == "hybrid"
    parent = Container(gpt)
    assert is_megatron_model(parent)
    assert plugin.convert_module(parent) is parent

    with plugin.forward_context():
        pass
    assert fake_te.autocast_calls == []
    assert fake_te.entered == 0

    # Not even imported: with TE unimportable the context still enters and exits cleanly.
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common.recipe"):
        monkeypatch.setitem(sys.modules, name, None)
    with plugin.forward_context():
        pass
    assert fake_te.autocast_calls == []


def test_convert_module_rejects_megatron_model_built_without_fp8(fake_fp8: list[str], megatron_groups: Any) -> None:
    gpt = build_gpt(MegatronPrecision().transformer_config_kwargs())
    assert gpt.config.fp8 is None
    with pytest.raises(RuntimeError, match="built without FP8 settings") as excinfo:
        TEFP8Precision().convert_module(Container(gpt))
    assert "transformer_config_kwargs()" in str(excinfo.value)


@no_gpu
def test_convert_module_accepts_bf16_model_in_fallback(megatron_groups: Any) -> None:
    plugin = TEFP8Precision(fallback="bf16")
    gpt = build_gpt(plugin.transformer_config_kwargs())
    assert plugin.convert_module(gpt) is gpt


def test_megatron_precision_convert_module_is_identity(megatron_groups: Any) -> None:
    plugin = MegatronPrecision()
    gpt = build_gpt(plugin.transformer_config_kwargs())
    assert plugin.convert_module(gpt) is gpt


# ---------------------------------------------------------------------------------------------- amax group
def test_amax_reduction_group_without_parallel_state() -> None:
    from megatron.core import parallel_state

    assert not parallel_state.model_parallel_is_initialized()
    assert amax_reduction_group() is None


def test_amax_reduction_group_without_megatron(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    monkeypatch.setitem(sys.modules, "megatron.core.transformer.module", None)
    assert amax_reduction_group() is None
    assert is_megatron_model(nn.Linear(2, 2)) is False


def test_amax_reduction_group_with_parallel_state(megatron_groups: Any) -> None:
    group = amax_reduction_group()
    assert group is not None
    assert group is megatron_groups.get_amax_reduction_group(with_context_parallel=True)
    assert torch.distributed.get_process_group_ranks(group) == [0]


# ---------------------------------------------------------------------------------------------- recipe names


def test_tensorwise_alias_is_current(fake_fp8: list[str]) -> None:
    alias, current = TEFP8Precision(recipe="tensorwise"), TEFP8Precision(recipe="current")
    assert alias.recipe == current.recipe == "current"
    assert alias.transformer_config_kwargs() == current.transformer_config_kwargs()
    assert alias.transformer_config_kwargs()["fp8_recipe"] == "tensorwise"  # Megatron's name for it
    assert alias.describe() == current.describe()
    assert RECIPES == ("delayed", "current", "blockwise", "mxfp8")


# ---------------------------------------------------------------------------------------------- kwargs per recipe
@pytest.mark.parametrize(
    ("recipe", "megatron_name"), [("current", "tensorwise"), ("blockwise", "blockwise"), ("mxfp8", "mxfp8")]
)
def test_kwargs_per_recipe(fake_fp8: list[str], recipe: str, megatron_name: str) -> None:
    plugin = TEFP8Precision(recipe=recipe, fp8_format="e4m3", fp8_param_gather=True)  # type: ignore[arg-type]
    # The delayed-scaling fields are left out: Megatron reads them for delayed scaling only.
    assert plugin.transformer_config_kwargs() == {
        **BF16_KWARGS,
        "fp8": "e4m3",
        "fp8_recipe": megatron_name,
        "fp8_param": True,
        "fp8_dot_product_attention": False,
    }
    assert plugin.ddp_config_kwargs() == {"fp8_param_gather": True}
    config = tiny_arch().transformer_config(**plugin.transformer_config_kwargs())
    assert config.fp8 == "e4m3"
    assert config.fp8_recipe == megatron_name
    assert config.fp8_param is True
    assert config.first_last_layers_bf16 is False


@pytest.mark.parametrize("recipe", ["current", "tensorwise", "blockwise", "mxfp8"])
def test_delayed_defaults_are_accepted_with_other_recipes(recipe: str) -> None:
    # A YAML that switches `recipe:` but keeps the reference recipe's (default) amax settings still works.
    TEFP8Precision(recipe=recipe, margin=0, amax_history_len=1024, amax_compute_algo="max")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"margin": 2}, "margin=2"),
        ({"amax_history_len": 16}, "amax_history_len=16"),
        ({"amax_compute_algo": "most_recent", "margin": 1}, "margin=1, amax_compute_algo='most_recent'"),
    ],
)
def test_delayed_settings_rejected_with_other_recipes(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        TEFP8Precision(recipe="current", **kwargs)
    message = str(excinfo.value)
    assert message.startswith(f"{named} only apply to delayed scaling")
    assert "the current recipe computes its scales from each tensor's current values" in message
    assert "recipe='delayed'" in message


# ---------------------------------------------------------------------------------------------- BF16 layers
@pytest.mark.parametrize("recipe", ["current", "blockwise", "mxfp8"])
def test_bf16_layers_kwargs(fake_fp8: list[str], recipe: str) -> None:
    plugin = TEFP8Precision(recipe=recipe, bf16_first_layers=1, bf16_last_layers=2)  # type: ignore[arg-type]
    kwargs = plugin.transformer_config_kwargs()
    assert {k: kwargs[k] for k in BF16_LAYER_KEYS} == {
        "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 2,
    }
    config = tiny_arch(num_layers=4).transformer_config(**kwargs)  # Megatron's own validation accepts it
    assert config.first_last_layers_bf16 is True
    assert config.num_layers_at_start_in_bf16 == 1
    assert config.num_layers_at_end_in_bf16 == 2


def test_bf16_layers_only_at_one_end(fake_fp8: list[str]) -> None:
    kwargs = TEFP8Precision(recipe="current", bf16_last_layers=1).transformer_config_kwargs()
    # Megatron's own defaults for these fields are 1 and 1: both counts are always written out.
    assert kwargs["first_last_layers_bf16"] is True
    assert kwargs["num_layers_at_start_in_bf16"] == 0
    assert kwargs["num_layers_at_end_in_bf16"] == 1
    config = tiny_arch(num_layers=4).transformer_config(**kwargs)
    assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (0, 1)


def test_no_bf16_layers_no_kwargs(fake_fp8: list[str]) -> None:
    kwargs = TEFP8Precision(recipe="current").transformer_config_kwargs()
    assert not BF16_LAYER_KEYS & kwargs.keys()


def test_megatron_checks_bf16_layers_against_the_model(fake_fp8: list[str]) -> None:
    # More BF16 layers than the model has is Megatron's check (the plugin does not know num_layers).
    kwargs = TEFP8Precision(recipe="current", bf16_first_layers=3).transformer_config_kwargs()
    with pytest.raises(ValueError, match=r"num_layers_at_start_in_bf16 \(3\) must be between 0 and"):
        tiny_arch(num_layers=2).transformer_config(**kwargs)


@pytest.mark.parametrize(("first", "last"), [(1, 0), (0, 1), (2, 2)])
def test_bf16_layers_rejected_with_delayed(first: int, last: int) -> None:
    with pytest.raises(ValueError) as excinfo:
        TEFP8Precision(recipe="delayed", bf16_first_layers=first, bf16_last_layers=last)
    message = str(excinfo.value)
    assert f"bf16_first_layers={first} / bf16_last_layers={last}" in message
    assert "need a recipe that allows BF16 layers: current, blockwise, mxfp8" in message
    assert "Delayed scaling" in message


def test_megatron_also_rejects_bf16_layers_with_delayed() -> None:
    """What our own error stands in for: Megatron's message when building the config."""
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        tiny_arch(num_layers=4).transformer_config(fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True)


@pytest.mark.parametrize("name", ["bf16_first_layers", "bf16_last_layers"])
def test_negative_bf16_layers_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^TEFP8Precision: {name} must be a whole number >= 0; got -1\.$"):
        TEFP8Precision(recipe="current", **{name: -1})


def test_bf16_layers_need_a_megatron_model(fake_fp8: list[str], fake_te: FakeTE) -> None:
    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1)
    with pytest.raises(ValueError, match=r"apply to Megatron models only.*Linear is a plain module"):
        plugin.convert_module(nn.Linear(4, 4))


@no_gpu
def test_bf16_layers_ignored_in_bf16_fallback() -> None:
    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1, fallback="bf16")
    module = nn.Linear(4, 4)
    assert plugin.convert_module(module) is module  # the whole model is BF16 anyway
    assert plugin.transformer_config_kwargs() == BF16_KWARGS


# ---------------------------------------------------------------------------------------------- FP8 attention
@pytest.mark.parametrize(
    ("recipe", "megatron_name"), [("delayed", "delayed"), ("current", "tensorwise"), ("mxfp8", "mxfp8")]
)
def test_fp8_attention_kwargs(fake_fp8: list[str], recipe: str, megatron_name: str) -> None:
    plugin = TEFP8Precision(recipe=recipe, fp8_attention=True)  # type: ignore[arg-type]
    kwargs = plugin.transformer_config_kwargs()
    assert kwargs["fp8_dot_product_attention"] is True
    assert kwargs["fp8_recipe"] == megatron_name
    config = tiny_arch().transformer_config(**kwargs)
    assert config.fp8_dot_product_attention is True
    assert config.fp8_multi_head_attention is False  # only DPA: the projections keep their own casts


def test_fp8_attention_rejected_with_blockwise() -> None:
    with pytest.raises(ValueError) as excinfo:
        TEFP8Precision(recipe="blockwise", fp8_attention=True)
    message = str(excinfo.value)
    assert message.startswith("fp8_attention=True is not available with the blockwise recipe")
    assert "Float8BlockScaling has no FP8 attention" in message
    assert "Use one of delayed, current, mxfp8, or fp8_attention=False" in message


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("delayed", FakeDelayedScaling(0, FakeFormat.HYBRID, 1024, "max", fp8_dpa=True)),
        ("current", FakeRecipe("current", FakeFormat.HYBRID, fp8_dpa=True)),
        ("mxfp8", FakeRecipe("mxfp8", FakeFormat.HYBRID, fp8_dpa=True)),
    ],
)
def test_te_recipe_fp8_attention(fake_te: FakeTE, recipe: str, expected: Any) -> None:
    assert TEFP8Precision(recipe=recipe, fp8_attention=True).te_recipe() == expected  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- describe / log
def test_describe_reference_recipe() -> None:
    assert TEFP8Precision(fp8_param_gather=True).describe() == (
        "FP8 delayed scaling: format hybrid, margin 0, amax history 1024 (max), FP8 param gather on, "
        "fast weight refresh on, BF16 layers: none, FP8 attention off"
    )
    assert "fast weight refresh off" in TEFP8Precision(fp8_param_gather=True, fast_weight_refresh=False).describe()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"recipe": "tensorwise", "bf16_first_layers": 1, "bf16_last_layers": 1, "fp8_attention": True},
            "FP8 current scaling (per tensor, Megatron 'tensorwise'): format hybrid, FP8 param gather off, "
            "BF16 layers: first 1 / last 1, FP8 attention on",
        ),
        (
            {"recipe": "blockwise", "fp8_format": "e4m3", "bf16_last_layers": 2},
            "FP8 blockwise scaling (1x128 activation/gradient blocks, 128x128 weight blocks): format e4m3, "
            "FP8 param gather off, BF16 layers: first 0 / last 2, FP8 attention off",
        ),
        (
            {"recipe": "mxfp8", "fp8_format": "e4m3", "fp8_param_gather": True},
            "FP8 MXFP8 block scaling (32-element blocks, power-of-2 scales): format e4m3, FP8 param gather on, "
            "BF16 layers: none, FP8 attention off",
        ),
        (
            {"margin": 1, "amax_history_len": 16, "amax_compute_algo": "most_recent", "fp8_attention": True},
            "FP8 delayed scaling: format hybrid, margin 1, amax history 16 (most_recent), FP8 param gather off, "
            "BF16 layers: none, FP8 attention on",
        ),
    ],
)
def test_describe(kwargs: dict[str, Any], expected: str) -> None:
    assert TEFP8Precision(**kwargs).describe() == expected


def test_check_logs_the_recipe_once(fake_fp8: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(precision_mod, "rank_zero_info", logged.append)
    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1)
    assert logged == []  # nothing at construction
    plugin.check_supported()
    plugin.check_supported()
    plugin.transformer_config_kwargs()
    assert logged == [plugin.describe()]


class Messages(logging.Handler):
    """Collects the messages of one logger (whether or not it propagates to the root logger caplog listens on)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(("rank", "expected_logs"), [(0, 1), (1, 0)])
def test_recipe_logged_on_global_rank_zero_only(
    fake_fp8: list[str], monkeypatch: pytest.MonkeyPatch, rank: int, expected_logs: int
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    handler = Messages()
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    plugin = TEFP8Precision(fp8_param_gather=True)
    plugin.check_supported()
    assert len(handler.messages) == expected_logs
    if expected_logs:
        assert handler.messages[0] == plugin.describe()
        assert handler.messages[0].startswith("FP8 delayed scaling: format hybrid, margin 0, amax history 1024 (max)")
    assert plugin.fp8_active is True  # every rank decides, only rank zero says so


@no_gpu
def test_fallback_logs_no_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(precision_mod, "rank_zero_info", logged.append)
    TEFP8Precision(fallback="bf16").check_supported()
    assert logged == []  # it trains in BF16: the warning says so, no FP8 recipe is described


# ---------------------------------------------------------------------------------------------- support on a GPU


def test_mxfp8_on_hopper_names_capability_and_alternatives(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(H100)
    with pytest.raises(FP8UnavailableError) as excinfo:
        TEFP8Precision(recipe="mxfp8", fp8_format="e4m3").check_supported()
    message = str(excinfo.value)
    assert message.startswith("FP8 training (mxfp8 scaling) is not possible here: NVIDIA H100 80GB HBM3")
    # The missing capability, in TE's words and with the check that said it:
    assert "Device compute capability 10.0 or higher required for MXFP8 execution." in message
    assert "transformer_engine.pytorch.is_mxfp8_available" in message
    assert "The mxfp8 recipe needs an NVIDIA GPU with compute capability 10.x or 11.x (Blackwell" in message
    # What would work here instead:
    assert "Recipes that work on this machine: delayed, current, blockwise (TEFP8Precision(recipe=...))." in message
    assert "fallback='bf16'" in message
    assert "No FP8 recipe works" not in message


def test_blockwise_needs_cuda_12_9(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(L40S_CUDA_12_8)
    with pytest.raises(FP8UnavailableError) as excinfo:
        TEFP8Precision(recipe="blockwise").check_supported()
    message = str(excinfo.value)
    assert "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9." in message
    assert "transformer_engine.pytorch.is_fp8_block_scaling_available" in message
    assert "Recipes that work on this machine: delayed, current " in message


def test_gpu_without_fp8_lists_none(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(A100)
    with pytest.raises(FP8UnavailableError) as excinfo:
        TEFP8Precision(recipe="current").check_supported()
    message = str(excinfo.value)
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0) cannot run current FP8" in message
    assert "Device compute capability 8.9 or higher required for FP8 execution." in message
    assert "No FP8 recipe works on this machine" in message
    assert "TEFP8Precision(fallback='bf16') (or MegatronPrecision())" in message


def test_gpu_without_fp8_falls_back(fake_machine: Callable[[Machine], None], caplog: pytest.LogCaptureFixture) -> None:
    fake_machine(A100)
    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1, fallback="bf16")
    with caplog.at_level(logging.WARNING, logger="lightning_llama_fp8.precision"):
        assert plugin.fp8_active is False
    assert "Device compute capability 8.9 or higher required" in caplog.text
    assert plugin.transformer_config_kwargs() == BF16_KWARGS


# ---------------------------------------------------------------------------------------------- YAML / CLI
def test_parse_plugin_from_yaml_and_command_line(fake_fp8: list[str]) -> None:
    """jsonargparse (what LightningCLI uses) builds the plugin from YAML and from command-line flags."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TEFP8Precision, "precision")
    config = parser.parse_string(
        "precision:\n  recipe: current\n  bf16_first_layers: 1\n  bf16_last_layers: 1\n  fp8_attention: true\n"
    )
    plugin = parser.instantiate_classes(config).precision
    assert isinstance(plugin, TEFP8Precision)
    assert (plugin.recipe, plugin.bf16_first_layers, plugin.bf16_last_layers, plugin.fp8_attention) == (
        "current",
        1,
        1,
        True,
    )
    kwargs = plugin.transformer_config_kwargs()
    assert kwargs["fp8_recipe"] == "tensorwise"
    assert kwargs["first_last_layers_bf16"] is True
    assert kwargs["fp8_dot_product_attention"] is True

    flags = parser.parse_args(["--precision.recipe=tensorwise", "--precision.bf16_last_layers=2"])
    plugin = parser.instantiate_classes(flags).precision
    assert (plugin.recipe, plugin.bf16_first_layers, plugin.bf16_last_layers) == ("current", 0, 2)

    with pytest.raises(argparse.ArgumentError, match="nvfp4"):  # not one of the Literal's values: refused parsing
        parser.parse_args(["--precision.recipe=nvfp4"])
    with pytest.raises(ValueError, match="need a recipe that allows BF16 layers"):  # our check, at instantiation
        parser.instantiate_classes(parser.parse_args(["--precision.bf16_first_layers=1"]))


def test_cli_yaml_with_new_fp8_args(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``llama-fp8 fit --config ... --print_config`` accepts and keeps the recipe, BF16-layer and attention args."""
    config = yaml.safe_load((REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml").read_text())
    (plugin,) = config["trainer"]["plugins"]
    plugin["init_args"] = {"recipe": "current", "bf16_first_layers": 1, "bf16_last_layers": 1, "fp8_attention": True}
    path = tmp_path / "current.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert excinfo.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    (printed_plugin,) = printed["trainer"]["plugins"]
    assert printed_plugin["class_path"] == "lightning_llama_fp8.TEFP8Precision"
    assert printed_plugin["init_args"] == {
        "recipe": "current",
        "fp8_format": "hybrid",
        "margin": 0,
        "amax_history_len": 1024,
        "amax_compute_algo": "max",
        "fp8_param_gather": False,
        "bf16_first_layers": 1,
        "bf16_last_layers": 1,
        "fp8_attention": True,
        "fallback": None,
        "fast_weight_refresh": True,
    }


def test_cli_rejects_unknown_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load((REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml").read_text())
    config["trainer"]["plugins"][0]["init_args"]["recipe"] = "nvfp4"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert excinfo.value.code != 0
    assert "nvfp4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- FP8 off and on
class ConfiguredBlock(nn.Module):
    """Stands in for Megatron modules: each holds a (possibly shared) config whose ``fp8`` is read every forward."""

    def __init__(self, config: types.SimpleNamespace) -> None:
        super().__init__()
        self.config = config


def test_set_fp8_enabled_switches_megatron_configs_off_and_back() -> None:
    shared, other, bf16 = (types.SimpleNamespace(fp8=f) for f in ("hybrid", "e4m3", None))
    model = nn.Sequential(
        ConfiguredBlock(shared), ConfiguredBlock(shared), ConfiguredBlock(other), ConfiguredBlock(bf16)
    )
    plugin = TEFP8Precision()
    plugin.set_fp8_enabled(model, False)
    assert (shared.fp8, other.fp8, bf16.fp8) == (None, None, None)
    plugin.set_fp8_enabled(model, False)  # idempotent: the original formats are kept, not the cleared ones
    plugin.set_fp8_enabled(model, True)
    assert (shared.fp8, other.fp8, bf16.fp8) == ("hybrid", "e4m3", None)


def test_set_fp8_enabled_skips_plain_te_autocast_while_off(fake_fp8: list[str], fake_te: FakeTE) -> None:
    plugin = TEFP8Precision()
    module = plugin.convert_module(nn.Linear(2, 2))
    plugin.set_fp8_enabled(module, False)
    with plugin.forward_context():
        pass
    assert fake_te.autocast_calls == []
    plugin.set_fp8_enabled(module, True)
    with plugin.forward_context():
        pass
    assert len(fake_te.autocast_calls) == 1


def test_fp8_cannot_be_switched_off_with_fp8_weights() -> None:
    with pytest.raises(ValueError, match="no BF16 copy of them"):
        TEFP8Precision(fp8_param_gather=True).set_fp8_enabled(nn.Linear(2, 2), False)


@pytest.mark.parametrize(
    ("recipe", "megatron_name"), [("delayed", "delayed"), ("current", "tensorwise"), ("blockwise", "blockwise")]
)
def test_optimizer_config_gets_the_recipe_of_fp8_weights(fake_fp8: list[str], recipe: str, megatron_name: str) -> None:
    """The distributed optimizer handles FP8 weights per recipe (as Megatron-LM passes --fp8-recipe); with bf16
    weights it gets none, so its precision-aware path keeps the main weights in FusedAdam for every recipe."""
    from megatron.core.optimizer import OptimizerConfig

    kwargs = TEFP8Precision(recipe=recipe, fp8_param_gather=True).optimizer_config_kwargs()
    assert kwargs == {"fp8_recipe": megatron_name}
    assert OptimizerConfig(bf16=True, **kwargs).fp8_recipe == megatron_name
    assert MegatronPrecision().optimizer_config_kwargs() == {}
    # bf16 weights: no recipe (tests/parallel/test_optimizer_precision.py shows what Megatron then does with it)
    assert TEFP8Precision(recipe=recipe).optimizer_config_kwargs() == {}
