"""Training plans of the plan/ tests."""

from __future__ import annotations

from lightning_llama_fp8.config import llama3_8b
from lightning_llama_fp8.parallel.layout import ParallelLayout
from lightning_llama_fp8.plan.estimate import TrainingPlan, plan_training


def reference_plan(**kwargs: object) -> TrainingPlan:
    """Megatron-LM's 8B FP8 recipe: 8 GPUs, TP1 CP2, GBS 128, MBS 1, FP8 param gather."""
    args: dict = dict(
        arch=llama3_8b(),
        layout=ParallelLayout(tensor_model_parallel_size=1, context_parallel_size=2),
        world_size=8,
        global_batch_size=128,
        micro_batch_size=1,
        precision="fp8",
        fp8_param_gather=True,
    )
    args.update(kwargs)
    return plan_training(**args)
