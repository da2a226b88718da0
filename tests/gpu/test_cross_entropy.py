"""Transformer Engine's fused cross entropy (``LlamaConfig(cross_entropy_fusion_impl="te")``, the default with the TE
layer spec) computes what Megatron's own fused one computes, faster and with less memory.

Both through Megatron's ``GPTModel.compute_language_model_loss`` (the code path training takes), on one micro batch
of the recipe's shape: 8192 tokens, vocabulary 128256, bf16 logits. The reference is the same loss in FP64 from the
same bf16 logits: each implementation's error against it, and the two against each other.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.gpu.probes import one_rank_process_group

TOKENS, VOCAB = 8192, 128256


@pytest.fixture(scope="module")
def process_group() -> Any:
    return one_rank_process_group(port=29563)


def logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [s, b, V] in bf16 with a spread like a trained model's (a few large values per row), labels [b, s]."""
    torch.manual_seed(0)
    logits = 2.0 * torch.randn(TOKENS, 1, VOCAB, device="cuda")
    logits[:, :, :64] += 12.0  # frequent tokens
    labels = torch.randint(0, VOCAB, (1, TOKENS), device="cuda")
    labels[0, ::4] = torch.randint(0, 64, (TOKENS // 4,), device="cuda")  # a quarter of targets among them
    return logits.to(torch.bfloat16), labels


def loss_module(impl: str, group: Any) -> Any:
    """What Megatron's LanguageModule.compute_language_model_loss reads of its module."""
    config = SimpleNamespace(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl=impl)
    return SimpleNamespace(config=config, pg_collection=SimpleNamespace(tp=group), tp_group=group)


def run(impl: str, group: Any, logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Any]:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    module = loss_module(impl, group)
    x = logits.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = LanguageModule.compute_language_model_loss(module, labels, x)
    held = torch.cuda.memory_allocated() - base  # what the loss keeps for backward (the logits were there before)
    loss.backward(grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base

    def step() -> None:
        y = logits.detach().requires_grad_(True)
        LanguageModule.compute_language_model_loss(module, labels, y).backward(grad_out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    return {
        "loss": loss.detach().float(),
        "grad": x.grad.float(),
        "grad_dtype": str(x.grad.dtype),
        "ms_fwd_bwd": (time.perf_counter() - start) / 10 * 1e3,
        "held_for_backward_gib": held / 2**30,
        "peak_above_logits_gib": peak / 2**30,
    }


def test_tes_cross_entropy_matches_megatrons_and_is_faster(process_group: Any, record: Any) -> None:
    logits, labels = logits_and_labels()
    grad_out = torch.rand(1, TOKENS, device="cuda") / TOKENS  # a loss mask / token count, as training scales it
    native = run("native", process_group, logits, labels, grad_out)
    te = run("te", process_group, logits, labels, grad_out)

    # FP64 reference from the same bf16 logits.
    x = logits.double().squeeze(1)
    target = labels.squeeze(0)
    ref_loss = torch.logsumexp(x, dim=-1) - x.gather(-1, target[:, None]).squeeze(-1)
    softmax = torch.softmax(x, dim=-1)
    softmax[torch.arange(TOKENS, device="cuda"), target] -= 1.0
    ref_grad = (softmax * grad_out.squeeze(0).double()[:, None]).unsqueeze(1)
    ref_loss = ref_loss[None, :]

    def errors(side: dict[str, Any]) -> dict[str, float]:
        grad_scale = float(ref_grad.abs().max())
        return {
            "loss_max_abs": float((side["loss"].double() - ref_loss).abs().max()),
            "grad_max_abs_rel_to_max": float((side["grad"].double() - ref_grad).abs().max()) / grad_scale,
            "grad_mean_abs_rel_to_mean": float((side["grad"].double() - ref_grad).abs().mean())
            / float(ref_grad.abs().mean()),
        }

    native_err, te_err = errors(native), errors(te)
    between = {
        "loss_max_abs": float((te["loss"] - native["loss"]).abs().max()),
        "grad_equal_fraction": float((te["grad"] == native["grad"]).float().mean()),
    }
    summary = {
        "tokens": TOKENS,
        "vocab": VOCAB,
        "native": {k: native[k] for k in ("ms_fwd_bwd", "held_for_backward_gib", "peak_above_logits_gib", "grad_dtype")}
        | {"error_vs_fp64": native_err},
        "te": {k: te[k] for k in ("ms_fwd_bwd", "held_for_backward_gib", "peak_above_logits_gib", "grad_dtype")}
        | {"error_vs_fp64": te_err},
        "te_vs_native": between,
        "speedup": native["ms_fwd_bwd"] / te["ms_fwd_bwd"],
    }
    record("cross_entropy", summary)
    print(summary)

    assert te["grad_dtype"] == native["grad_dtype"] == "torch.bfloat16"
    # Both are FP32 math on the same bf16 inputs: losses agree to FP32 rounding of values ~10-20.
    assert te_err["loss_max_abs"] < 1e-4 and native_err["loss_max_abs"] < 1e-4
    assert between["loss_max_abs"] < 1e-4
    # Gradients: bf16 rounding of the same FP32 values (relative error ~2^-8 at most, per element).
    assert te_err["grad_max_abs_rel_to_max"] < 2**-7
    assert te_err["grad_mean_abs_rel_to_mean"] <= 1.25 * native_err["grad_mean_abs_rel_to_mean"] + 1e-6
    # What llama-fp8 plan counts: TE keeps a bf16 copy of the logits (plus 8 bytes of statistics per token), Megatron
    # an FP32 softmax (measured 2026-12-04: 1.9571 and 3.9142 GiB).
    logits_gib = TOKENS * VOCAB / 2**30
    assert te["held_for_backward_gib"] == pytest.approx(2 * logits_gib, rel=0.01)
    assert native["held_for_backward_gib"] == pytest.approx(4 * logits_gib, rel=0.01)
    assert te["ms_fwd_bwd"] < native["ms_fwd_bwd"]
