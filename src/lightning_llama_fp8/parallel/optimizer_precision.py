"""Optimizer-state precision of ``MegatronCPStrategy``: Megatron-Core's precision-aware distributed optimizer.

Megatron's default mixed-precision Adam keeps, per parameter, an fp32 main weight and two fp32 Adam moments (12
bytes, sharded by the distributed optimizer) and copies the bf16 gradient shard to fp32 before each step (4 bytes
more at the step). Its precision-aware optimizer (``OptimizerConfig.use_precision_aware_optimizer``) hands the update
to Transformer Engine's ``FusedAdam``, which:

- reads the gradients straight from DDP's gradient buffer (no fp32 copy);
- keeps the fp32 main weights itself; with bf16 weights only their 16 low bits (``store_param_remainders``): the
  bf16 weight is the high half, so the fp32 main weight is exact and the update is that of fp32 main weights;
- stores the Adam moments in the dtypes asked for (bf16 halves them; the update itself is computed in fp32).

:class:`OptimizerPrecisionSettings` names these the way a strategy argument is set, checks the combinations before
anything is built and turns them into Megatron's ``OptimizerConfig`` fields. From YAML::

    trainer:
      strategy:
        class_path: lightning_llama_fp8.MegatronCPStrategy
        init_args:
          optimizer_precision: {exp_avg_dtype: bf16, exp_avg_sq_dtype: bf16}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MomentDtype = Literal["fp32", "bf16"]
#: Moment dtype names -> torch dtype names (torch is imported only where Megatron's config is built: `llama-fp8 plan`
#: stays light).
MOMENT_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
MOMENT_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2}


@dataclass
class OptimizerPrecisionSettings:
    """Megatron-Core's precision-aware distributed optimizer (Transformer Engine's ``FusedAdam``).

    Bytes per parameter of this rank's optimizer shard: main weights 2 (bf16 weights, remainders) or 4, plus each
    moment 2 (bf16) or 4 (fp32); no fp32 gradient copy at the step. Needs the distributed optimizer and Transformer
    Engine.

    Args:
        exp_avg_dtype: dtype of Adam's first moment, ``bf16`` (default) or ``fp32``.
        exp_avg_sq_dtype: dtype of Adam's second moment, ``bf16`` (default) or ``fp32``.
        store_param_remainders: with bf16 weights, keep only the 16 low bits of each fp32 main weight (its high
            half is the bf16 weight): exact, 2 bytes per parameter instead of 4 (default). ``False``: whole fp32
            main weights. With FP8 weights (``fp8_param_gather``) there is no bf16 half and it does not apply.
    """

    exp_avg_dtype: MomentDtype = "bf16"
    exp_avg_sq_dtype: MomentDtype = "bf16"
    store_param_remainders: bool = True

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be one of {', '.join(MOMENT_DTYPES)}, got {value!r}"
            for name, value in (("exp_avg_dtype", self.exp_avg_dtype), ("exp_avg_sq_dtype", self.exp_avg_sq_dtype))
            if value not in MOMENT_DTYPES
        ]
        if not isinstance(self.store_param_remainders, bool):
            problems.append(f"store_param_remainders must be true or false, got {self.store_param_remainders!r}")
        if problems:
            raise ValueError("optimizer_precision: " + "; ".join(problems) + ".")

    @property
    def low_precision_moments(self) -> bool:
        return self.exp_avg_dtype != "fp32" or self.exp_avg_sq_dtype != "fp32"

    def check(
        self,
        use_distributed_optimizer: bool,
        fp8_recipe: str | None,
        fp8_param_gather: bool,
        optimizer_offloaded: bool,
    ) -> None:
        """Raise ``ValueError`` for the combinations Megatron or Transformer Engine cannot run (or that were never
        shown to train: those are refused rather than run unchecked)."""
        problems = []
        if not use_distributed_optimizer:
            problems.append(
                "needs use_distributed_optimizer=True (Megatron's precision-aware optimizer is its distributed one)"
            )
        if optimizer_offloaded:
            problems.append(
                "cannot be combined with optimizer_offload (the offloaded optimizer keeps fp32 state on the CPU with "
                "its own Adam); choose one"
            )
        if fp8_param_gather:
            if fp8_recipe not in (None, "delayed"):
                problems.append(
                    f"with FP8 weights (fp8_param_gather) it needs the delayed recipe, not {fp8_recipe!r} (Megatron "
                    "then keeps fp32 main weights and gradients itself; that path was never shown to train here); "
                    "set fp8_param_gather: false"
                )
            if self.low_precision_moments:
                problems.append(
                    "bf16 Adam moments do not work with FP8 weights (fp8_param_gather): Transformer Engine's FP8 Adam "
                    "kernel takes fp32 moments only (multi_tensor_adam_fp8 fails at the first step). Set "
                    "fp8_param_gather: false (bf16 weights, FP8 compute) or exp_avg_dtype/exp_avg_sq_dtype: fp32"
                )
        if problems:
            raise ValueError("optimizer_precision: " + "; ".join(problems) + ".")

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """The precision fields of Megatron's ``OptimizerConfig``."""
        import torch

        return {
            "use_precision_aware_optimizer": True,
            "exp_avg_dtype": getattr(torch, MOMENT_DTYPES[self.exp_avg_dtype]),
            "exp_avg_sq_dtype": getattr(torch, MOMENT_DTYPES[self.exp_avg_sq_dtype]),
            "main_params_dtype": torch.float32,
            "store_param_remainders": self.store_param_remainders,
        }

    def bytes_per_parameter(self, fp8_param_gather: bool) -> int:
        """GPU bytes per parameter of the optimizer shard: main weights (or their remainders) and both moments."""
        remainders = self.store_param_remainders and not fp8_param_gather
        main = 2 if remainders else 4
        return main + MOMENT_BYTES[self.exp_avg_dtype] + MOMENT_BYTES[self.exp_avg_sq_dtype]

    def describe(self, fp8_param_gather: bool = False) -> str:
        """One line, e.g. ``precision-aware Adam: bf16 moments, fp32 main weights as 16-bit remainders``."""
        if self.exp_avg_dtype == self.exp_avg_sq_dtype:
            moments = f"{self.exp_avg_dtype} moments"
        else:
            moments = f"exp_avg {self.exp_avg_dtype}, exp_avg_sq {self.exp_avg_sq_dtype}"
        remainders = self.store_param_remainders and not fp8_param_gather
        main = "fp32 main weights as 16-bit remainders" if remainders else "fp32 main weights"
        return f"precision-aware Adam: {moments}, {main}, no fp32 gradient copy"

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint records of these settings (its optimizer state has these dtypes)."""
        return {
            "exp_avg_dtype": self.exp_avg_dtype,
            "exp_avg_sq_dtype": self.exp_avg_sq_dtype,
            "store_param_remainders": self.store_param_remainders,
            "precision_aware": True,
        }


#: The record of Megatron's default optimizer (no ``optimizer_precision``), and of checkpoints written before it.
DEFAULT_OPTIMIZER_PRECISION_RECORD: dict[str, Any] = {
    "exp_avg_dtype": "fp32",
    "exp_avg_sq_dtype": "fp32",
    "store_param_remainders": False,
    "precision_aware": False,
}
