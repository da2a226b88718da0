"""``llama-fp8 plan``: parameters, memory per GPU and FLOPs of a training configuration, before anything is built."""

from lightning_llama_fp8.plan.estimate import TrainingPlan, plan_training
from lightning_llama_fp8.plan.report import format_plan

__all__ = ["TrainingPlan", "format_plan", "plan_training"]
