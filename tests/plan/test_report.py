"""The plan as a table (plan/report.py)."""

from __future__ import annotations

from lightning_llama_fp8.plan.estimate import GIB
from lightning_llama_fp8.plan.report import format_plan
from tests.helpers.plans import reference_plan


def test_format_plan_contains_the_numbers() -> None:
    plan = reference_plan()
    text = format_plan(plan)
    assert "8,030,261,248" in text
    assert "TP 1 x CP 2 x DP 4 = 8 GPUs" in text
    assert "32 micro batches" in text
    for value in (plan.memory.weights, plan.memory.optimizer, plan.memory.activations, plan.memory.total):
        assert f"{value / GIB:,.2f} GiB" in text
    assert f"{plan.flops_per_step / 1e12:,.2f} TFLOP" in text
    assert f"{plan.flops_per_gpu_per_step / 1e12:,.2f} TFLOP" in text
    assert "estimate" in text


def test_format_plan_says_whether_documents_are_masked() -> None:
    from lightning_llama_fp8.config import llama3_8b
    from lightning_llama_fp8.parallel.layout import ParallelLayout
    from lightning_llama_fp8.plan.estimate import plan_training

    unmasked = format_plan(reference_plan())
    assert "Document masking" in unmasked and "off (one causal mask" in unmasked
    plan = plan_training(llama3_8b(), ParallelLayout(), 1, 8, 1, "fp8", document_masking=True)
    text = format_plan(plan)
    assert "on: each document of a packed sample attends only to itself" in text
    assert "RoPE tables cached per longest-document length 124 MiB, document boundaries 32 KiB" in text
    assert f"{(plan.memory.rope_cache + plan.activations.packed_bytes) / GIB:,.2f} GiB" in text
