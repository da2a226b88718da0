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


def _with_main_grads(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    for param in model.parameters():
        param.main_grad = torch.zeros_like(param, dtype=dtype)  # what Megatron DDP's buffer gives each parameter
    return model


@pytest.mark.parametrize(
    ("overrides", "grad_dtype", "fused"),
    [
        ({}, torch.bfloat16, True),
        ({}, torch.float32, False),  # grad_reduce_in_fp32: no bf16 GEMM accumulates into fp32 in torch
        ({"tie_embeddings": True}, torch.bfloat16, False),  # the output weight is the embedding's
    ],
)
def test_output_layer_accumulates_its_weight_gradient_in_the_gemm(
    overrides: dict, grad_dtype: torch.dtype, fused: bool
) -> None:
    """The output layer, Megatron's own linear, switched to accumulate into a 16-bit main_grad; no other layer."""
    import megatron.core.tensor_parallel.layers as megatron_layers

    from lightning_llama_fp8._compat.megatron import TorchWeightGradientAccumulation
    from lightning_llama_fp8.parallel.ddp import fuse_output_layer_weight_gradient_accumulation
    from tests.helpers import megatron_single_process_groups
    from tests.helpers.models import tiny_llama

    with megatron_single_process_groups():
        arch = tiny_llama(**overrides)
        model = _with_main_grads(arch.build_model(arch.transformer_config(use_cpu_initialization=True)), grad_dtype)
        # Megatron's own layers of the local spec are ColumnParallelLinear too; only the output layer is switched.
        switched = {
            name for name, module in model.named_modules() if getattr(module, "gradient_accumulation_fusion", 0)
        }
        assert fuse_output_layer_weight_gradient_accumulation([model]) == int(fused)
        now = {name for name, module in model.named_modules() if getattr(module, "gradient_accumulation_fusion", 0)}
        assert now - switched == ({"output_layer"} if fused else set())
        if fused:  # the kernel megatron-core calls for it, where APEX is missing (as here)
            assert megatron_layers.fused_weight_gradient_mlp_cuda is TorchWeightGradientAccumulation


def test_torch_weight_gradient_accumulation_adds_in_place() -> None:
    """main_grad += grad_output^T @ input, in the buffer itself (megatron-core passes the 2-D tensors)."""
    from lightning_llama_fp8._compat.megatron import TorchWeightGradientAccumulation

    torch.manual_seed(0)
    total_input, grad_output = torch.randn(64, 16), torch.randn(64, 32)
    main_grad = torch.randn(32, 16).to(torch.bfloat16)
    expected = main_grad.float() + grad_output.t() @ total_input
    storage = main_grad.data_ptr()
    TorchWeightGradientAccumulation.wgrad_gemm_accum_fp16(
        total_input.to(torch.bfloat16), grad_output.to(torch.bfloat16), main_grad
    )
    assert main_grad.data_ptr() == storage and main_grad.dtype is torch.bfloat16
    torch.testing.assert_close(main_grad.float(), expected, atol=0.25, rtol=0.02)  # bf16 inputs and result


def test_output_layer_backward_adds_its_weight_gradient_into_main_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron-core's own backward of the output layer, switched: the weight gradient lands in main_grad (on top of
    what it held), the layer tells DDP's hook so (``grad_added_to_main_grad``), and the input gradient is unchanged."""
    from lightning_llama_fp8._compat.megatron import accumulate_weight_gradient_in_gemm
    from tests.helpers import megatron_single_process_groups
    from tests.helpers.models import tiny_llama

    # Its placeholder gradient goes to torch.cuda.current_device() where Transformer Engine is missing (this CPU).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    with megatron_single_process_groups():
        arch = tiny_llama()
        layer = arch.build_model(arch.transformer_config(use_cpu_initialization=True)).output_layer
        torch.manual_seed(0)
        hidden = torch.randn(16, 1, arch.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        logits, _ = layer(hidden)
        grad_logits = torch.randn_like(logits)
        logits.backward(grad_logits)
        unfused_weight_grad, unfused_input_grad = layer.weight.grad.float(), hidden.grad.clone()
        layer.weight.grad, hidden.grad = None, None

        layer.weight.main_grad = torch.full_like(layer.weight, 0.5)  # what earlier micro batches left there
        layer.weight.grad_added_to_main_grad = False  # Megatron DDP sets it on every parameter
        accumulate_weight_gradient_in_gemm(layer)
        logits, _ = layer(hidden)
        logits.backward(grad_logits)
        assert layer.weight.grad_added_to_main_grad is True
        # One bf16 rounding of 0.5 + gradient (|gradient| up to ~21 here: half a bf16 step there is 0.0625).
        torch.testing.assert_close(layer.weight.main_grad.float(), 0.5 + unfused_weight_grad, atol=0.0625, rtol=0)
        assert torch.equal(hidden.grad, unfused_input_grad)
