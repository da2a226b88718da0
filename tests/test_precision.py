"""TEFP8Precision / MegatronPrecision on the CPU: support checks, the kwargs they hand to Megatron, and autocast.

There is no GPU and no Transformer Engine here, so FP8 support is faked by monkeypatching ``fp8_support`` and TE
itself by fake ``transformer_engine`` modules in ``sys.modules`` that record what the plugin asks of them.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import lightning_llama_fp8.precision as precision_mod
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.precision import (
    FP8UnavailableError,
    MegatronPrecision,
    TEFP8Precision,
    amax_reduction_group,
    fp8_support,
    is_megatron_model,
)
from tests.helpers import free_port

BF16_KWARGS = {"bf16": True, "params_dtype": torch.bfloat16}
REFERENCE_FP8_KWARGS = {
    **BF16_KWARGS,
    "fp8": "hybrid",
    "fp8_recipe": "delayed",
    "fp8_margin": 0,
    "fp8_amax_history_len": 1024,
    "fp8_amax_compute_algo": "max",
    "fp8_param": False,
}
FP8_KEYS = {k for k in REFERENCE_FP8_KWARGS if k.startswith("fp8")}

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


def tiny_arch(**overrides: Any) -> Any:
    """llama_tiny with Megatron's local layer spec (no TE needed to build its config or the model)."""
    return get_preset("llama_tiny", transformer_impl="local", **overrides)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def fake_fp8(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend this machine runs FP8; returns the recipes ``fp8_support`` was asked about."""
    asked: list[str] = []

    def fake_support(recipe: str = "delayed") -> tuple[bool, str]:
        asked.append(recipe)
        return True, f"Fake H100 (compute capability 9.0) supports {recipe} FP8."

    monkeypatch.setattr(precision_mod, "fp8_support", fake_support)
    return asked


@dataclass
class FakeDelayedScaling:
    margin: int = 0
    fp8_format: Any = None
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class FakeRecipe:
    kind: str
    fp8_format: Any = None


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
    recipe.Float8CurrentScaling = lambda **kw: FakeRecipe("tensorwise", **kw)  # type: ignore[attr-defined]
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
    from megatron.core import parallel_state

    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


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
def test_fp8_support_without_gpu() -> None:
    ok, reason = fp8_support()
    assert ok is False
    assert "no CUDA GPU is visible" in reason
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert fp8_support(recipe)[0] is False


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
    assert "lightning-llama-fp8[te]" in message
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


def test_support_decided_once(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision(recipe="tensorwise")
    assert plugin.fp8_active
    plugin.transformer_config_kwargs()
    plugin.ddp_config_kwargs()
    assert fake_fp8 == ["tensorwise"]


# ---------------------------------------------------------------------------------------------- kwargs
def test_default_kwargs_are_the_reference_recipe(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision()
    assert plugin.fp8_active is True
    assert plugin.transformer_config_kwargs() == REFERENCE_FP8_KWARGS
    assert plugin.ddp_config_kwargs() == {"fp8_param_gather": False}
    assert plugin.precision == "transformer-engine-fp8"


def test_custom_kwargs_pass_through(fake_fp8: list[str]) -> None:
    plugin = TEFP8Precision(
        recipe="tensorwise", fp8_format="e4m3", margin=2, amax_history_len=16, amax_compute_algo="most_recent"
    )
    assert plugin.transformer_config_kwargs() == {
        **BF16_KWARGS,
        "fp8": "e4m3",
        "fp8_recipe": "tensorwise",
        "fp8_margin": 2,
        "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "most_recent",
        "fp8_param": False,
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
        ({"recipe": "nvfp4"}, r"Unknown FP8 recipe 'nvfp4': use delayed, tensorwise, blockwise or mxfp8"),
        ({"fp8_format": "e5m2"}, r"Unknown FP8 format 'e5m2': use hybrid or e4m3"),
        ({"fallback": "fp16"}, r"fallback must be None or 'bf16', got 'fp16'"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TEFP8Precision(**kwargs)


def test_constructor_does_not_probe_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(recipe: str = "delayed") -> tuple[bool, str]:
        raise AssertionError("fp8_support called at construction")

    monkeypatch.setattr(precision_mod, "fp8_support", boom)
    TEFP8Precision()  # the CLI parser instantiates plugins before the pre-flight runs


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("recipe", "fp8_format", "expected"),
    [
        ("tensorwise", "hybrid", FakeRecipe("tensorwise", FakeFormat.HYBRID)),
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
