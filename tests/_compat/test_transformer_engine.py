"""The Transformer Engine private calls of ``_compat/transformer_engine.py``: what they do with TE's attributes, and
that the installed TE (the GPU machine's; CPU machines have none) still has them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_llama_fp8._compat.transformer_engine import (
    has_fused_qkv_rope,
    replace_high_precision_init_val,
    reset_debug_state,
)


def test_a_kept_high_precision_value_is_replaced_in_its_dtype_and_device() -> None:
    kept = torch.zeros(3, dtype=torch.float32)
    param = SimpleNamespace(get_high_precision_init_val=lambda: kept, _high_precision_init_val=kept)
    replace_high_precision_init_val(param, torch.ones(3, dtype=torch.bfloat16))  # type: ignore[arg-type]
    assert param._high_precision_init_val.dtype == torch.float32
    assert torch.equal(param._high_precision_init_val, torch.ones(3))


def test_a_plain_parameter_is_left_alone() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    replace_high_precision_init_val(param, torch.ones(2))
    assert not hasattr(param, "_high_precision_init_val")


def test_the_debug_state_reset_is_called() -> None:
    resets: list[bool] = []
    reset_debug_state(SimpleNamespace(_reset=lambda: resets.append(True)))
    assert resets == [True]


def test_the_installed_transformer_engine_has_the_private_names() -> None:
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed here")
    from transformer_engine.debug.pytorch.debug_state import TEDebugState
    from transformer_engine.pytorch.module import base

    assert callable(base._attach_high_precision_init_val)
    assert callable(TEDebugState._reset)
    assert has_fused_qkv_rope()  # TE 2.20.2, the pinned stack


def test_fused_qkv_rope_is_looked_up_where_megatron_imports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    name = "transformer_engine.pytorch.attention.rope"
    for parent in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.attention"):
        monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))
    rope = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, rope)
    assert not has_fused_qkv_rope()  # a TE without the kernel: megatron-core would assert at the first step
    rope.apply_fused_qkv_rotary_pos_emb = lambda *args: None  # type: ignore[attr-defined]
    assert has_fused_qkv_rope()
