"""fp8/weights.py: the FP8 weight refresh without discarded transposes, and when TEFP8Precision applies it.

The bytes it produces are checked against TE's own path on a GPU (tests/gpu/test_fp8_weight_refresh.py); here: which
quantizers it switches, that every usage comes back (errors too), and the settings that turn it on.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

import lightning_llama_fp8.fp8.support as fp8_support_mod
from lightning_llama_fp8 import MegatronPrecision, TEFP8Precision
from lightning_llama_fp8.fp8.weights import delayed_scaling_weight_quantizers, rowwise_only, rowwise_only_weight_refresh


class FakeQuantizer:
    """The two usage flags and ``set_usage`` of TE's ``Quantizer``."""

    def __init__(self, rowwise: bool = True, columnwise: bool = True) -> None:
        self.rowwise_usage, self.columnwise_usage = rowwise, columnwise

    def set_usage(self, *, rowwise: bool | None = None, columnwise: bool | None = None) -> None:
        if rowwise is not None:
            self.rowwise_usage = rowwise
        if columnwise is not None:
            self.columnwise_usage = columnwise


class FakeFloat8Quantizer(FakeQuantizer):
    pass


class FakeCurrentScalingQuantizer(FakeFloat8Quantizer):
    """Derived from the delayed one on purpose: it must still not be switched."""


class FakeFloat8Tensor(nn.Parameter):
    _quantizer: Any = None


@pytest.fixture
def fake_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("transformer_engine.pytorch.tensor.float8_tensor")
    module.Float8Quantizer = FakeFloat8Quantizer  # type: ignore[attr-defined]
    module.Float8Tensor = FakeFloat8Tensor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)


def fp8_weight(quantizer: Any) -> FakeFloat8Tensor:
    weight = FakeFloat8Tensor(torch.zeros(4, 4))
    weight._quantizer = quantizer
    return weight


def test_rowwise_only_switches_the_transpose_off_and_restores_every_usage() -> None:
    both, rowwise_already = FakeQuantizer(), FakeQuantizer(columnwise=False)
    transpose_only = FakeQuantizer(rowwise=False)
    with rowwise_only([both, rowwise_already, transpose_only]) as switched:
        # Only the one with both: without rowwise usage TE writes the transpose alone, so there is nothing to save.
        assert switched == 1
        assert [(q.rowwise_usage, q.columnwise_usage) for q in (both, rowwise_already, transpose_only)] == [
            (True, False),
            (True, False),
            (False, True),
        ]
    assert [(q.rowwise_usage, q.columnwise_usage) for q in (both, rowwise_already, transpose_only)] == [
        (True, True),
        (True, False),
        (False, True),
    ]


def test_rowwise_only_restores_when_the_step_raises() -> None:
    quantizer = FakeQuantizer()
    with pytest.raises(RuntimeError, match="step failed"), rowwise_only([quantizer]):
        raise RuntimeError("step failed")
    assert quantizer.columnwise_usage is True


def test_finds_each_delayed_scaling_weight_quantizer_once(fake_float8: None) -> None:
    shared, own, current = FakeFloat8Quantizer(), FakeFloat8Quantizer(), FakeCurrentScalingQuantizer()
    first, second = nn.Module(), nn.Module()
    first.a, first.b = fp8_weight(shared), fp8_weight(own)
    second.c, second.d = fp8_weight(shared), fp8_weight(current)
    second.bias = nn.Parameter(torch.zeros(4))  # a plain BF16 parameter
    second.no_quantizer = fp8_weight(None)
    assert delayed_scaling_weight_quantizers([first, second]) == [shared, own]
    with rowwise_only_weight_refresh([first, second]) as switched:
        assert switched == 2 and not shared.columnwise_usage and current.columnwise_usage
    assert shared.columnwise_usage and own.columnwise_usage


def test_without_transformer_engine_nothing_is_switched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.tensor.float8_tensor", None)  # import fails
    module = nn.Module()
    module.w = nn.Parameter(torch.zeros(2))
    assert delayed_scaling_weight_quantizers([module]) == []
    with rowwise_only_weight_refresh([module]) as switched:
        assert switched == 0


@pytest.fixture
def fp8_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_support_mod, "fp8_support", lambda recipe="delayed", fp8_attention=False: (True, "fake"))


@pytest.mark.parametrize(
    ("kwargs", "applies"),
    [
        ({"fp8_param_gather": True}, True),  # the reference recipe: delayed scaling, FP8 weights
        ({"fp8_param_gather": True, "fast_weight_refresh": False}, False),
        ({"fp8_param_gather": False}, False),  # BF16 weights: no FP8 refresh at all
        ({"fp8_param_gather": True, "recipe": "current"}, False),  # TE builds its own quantizer per shard
        ({"fp8_param_gather": True, "recipe": "blockwise"}, False),
    ],
)
def test_precision_applies_it_to_fp8_weights_with_delayed_scaling(
    fp8_machine: None, fake_float8: None, kwargs: dict[str, Any], applies: bool
) -> None:
    module = nn.Module()
    module.w = fp8_weight(quantizer := FakeFloat8Quantizer())
    with TEFP8Precision(**kwargs).optimizer_step_context([module]):
        assert quantizer.columnwise_usage is not applies
    assert quantizer.columnwise_usage


def test_bf16_precision_and_the_bf16_fallback_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(MegatronPrecision().optimizer_step_context([]), contextlib.nullcontext)
    monkeypatch.setattr(fp8_support_mod, "fp8_support", lambda recipe="delayed", fp8_attention=False: (False, "no GPU"))
    fallback = TEFP8Precision(fp8_param_gather=False, fallback="bf16")
    assert isinstance(fallback.optimizer_step_context([]), contextlib.nullcontext)
