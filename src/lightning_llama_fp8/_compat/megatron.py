"""megatron-core's private calls this package makes (checked against megatron-core 0.19.2)."""

from __future__ import annotations

from typing import Any


def copy_main_params_to_model_params(optimizer: Any) -> None:
    """Write the fp32 main weights of Megatron's (chained) ``optimizer`` into the model's weights, quantizing FP8
    weights on the way: the copy Megatron's ``optimizer.step()`` ends with (``_copy_main_params_to_model_params``)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part._copy_main_params_to_model_params()
