"""Megatron DDP around the model (parallel/ddp.py): Transformer Engine's fused weight-gradient accumulation."""

from __future__ import annotations

import pytest
import torch


def test_gradient_accumulation_fusion_switches_the_te_modules_only() -> None:
    """What the strategy does once the model is wrapped: TE's modules add into main_grad, Megatron's own do not."""
    from lightning_llama_fp8.parallel.ddp import fuse_te_weight_gradient_accumulation

    te_linear = type("Linear", (torch.nn.Linear,), {"__module__": "transformer_engine.pytorch.module.linear"})
    megatron_linear = type("ColumnParallelLinear", (torch.nn.Linear,), {"__module__": "megatron.core.tensor_parallel"})
    model = torch.nn.Sequential(te_linear(2, 2), megatron_linear(2, 2))
    for module in model:
        module.fuse_wgrad_accumulation = False
    assert fuse_te_weight_gradient_accumulation([model]) == 1
    assert model[0].fuse_wgrad_accumulation is True and model[1].fuse_wgrad_accumulation is False
    with pytest.raises(ValueError, match="found no Transformer Engine layer"):
        fuse_te_weight_gradient_accumulation([torch.nn.Sequential(megatron_linear(2, 2))])
    # The default setting asks for it only where TE modules exist: none is no error there.
    assert fuse_te_weight_gradient_accumulation([torch.nn.Sequential(megatron_linear(2, 2))], required=False) == 0
