"""Transformer Engine's private attributes and calls this package uses (checked against TE 2.20.2)."""

from __future__ import annotations

from typing import Any

import torch


def replace_high_precision_init_val(param: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``value`` the high-precision initial value of TE parameter ``param`` (what Megatron's distributed
    optimizer builds the fp32 main weight of an FP8 weight from): replaced where TE keeps one
    (``_high_precision_init_val``), attached to an FP8 weight built without (``_attach_high_precision_init_val``);
    other parameters are left alone."""
    initial = getattr(param, "get_high_precision_init_val", None)
    previous = initial() if callable(initial) else None
    if previous is not None:
        param._high_precision_init_val = value.to(device=previous.device, dtype=previous.dtype)
    elif type(param).__module__.startswith("transformer_engine"):  # an FP8 weight built without that copy
        from transformer_engine.pytorch.module.base import _attach_high_precision_init_val

        _attach_high_precision_init_val(param, value.detach().to(device="cpu", dtype=param.dtype))


def reset_debug_state(debug_state: Any) -> None:
    """Reset TE's debug state (``TEDebugState._reset``): TE modules then run without the debug API and new ones may be
    built; TE's own ``end_debug`` hook does the same, unless setup failed before its features were registered."""
    debug_state._reset()


def has_fused_qkv_rope() -> bool:
    """Whether this Transformer Engine has the fused QKV RoPE kernel that megatron-core's ``fused_single_qkv_rope``
    calls (``transformer_engine.pytorch.attention.rope.apply_fused_qkv_rotary_pos_emb``; megatron-core asserts at the
    first step where it is missing)."""
    try:
        from transformer_engine.pytorch.attention.rope import apply_fused_qkv_rotary_pos_emb  # noqa: F401
    except ImportError:
        return False
    return True
