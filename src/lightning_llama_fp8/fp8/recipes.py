"""The FP8 recipes ``TEFP8Precision`` offers, what each needs and allows, and the checks of their settings that need
no GPU."""

from __future__ import annotations

from typing import Any, Literal

RecipeName = Literal["delayed", "current", "tensorwise", "blockwise", "mxfp8"]
FP8Format = Literal["hybrid", "e4m3"]
AmaxComputeAlgo = Literal["max", "most_recent"]

#: The recipes TEFP8Precision offers, in the order messages list them.
RECIPES: tuple[str, ...] = ("delayed", "current", "blockwise", "mxfp8")
#: Other accepted names: Megatron (and Megatron-LM's ``--fp8-recipe``) calls current scaling "tensorwise".
RECIPE_ALIASES: dict[str, str] = {"tensorwise": "current"}
#: ``TransformerConfig.fp8_recipe`` for each recipe.
MEGATRON_RECIPE: dict[str, str] = {
    "delayed": "delayed",
    "current": "tensorwise",
    "blockwise": "blockwise",
    "mxfp8": "mxfp8",
}
#: TE's own support check per recipe: ``transformer_engine.pytorch.<name>(return_reason=True)``.
TE_SUPPORT_CHECK: dict[str, str] = {
    "delayed": "is_fp8_available",
    "current": "is_fp8_available",
    "blockwise": "is_fp8_block_scaling_available",
    "mxfp8": "is_mxfp8_available",
}
#: What each recipe needs from the GPU (the conditions of TE's checks above), for error messages.
RECIPE_NEEDS: dict[str, str] = {
    "delayed": "compute capability >= 8.9 (Ada, Hopper, Blackwell)",
    "current": "compute capability >= 8.9 (Ada, Hopper, Blackwell)",
    "blockwise": "compute capability >= 9.0 (Hopper, Blackwell) and CUDA >= 12.9",
    "mxfp8": "compute capability 10.x or 11.x (Blackwell, e.g. B200/GB200)",
}
#: Oldest Transformer Engine for each recipe (Megatron's ``fp8_utils.get_fp8_recipe`` gates them the same way).
MIN_TE_VERSION: dict[str, str] = {"current": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}
#: Recipes that may keep their first/last layers in BF16. Not delayed scaling: its amaxes are reduced when the
#: one autocast around all layers exits, so per-layer autocasts would break that (Megatron rejects it too).
BF16_LAYER_RECIPES: tuple[str, ...] = ("current", "blockwise", "mxfp8")
#: Recipes with FP8 attention. TE's Float8BlockScaling asserts "FP8 attention is not supported" (and Megatron
#: does not even pass ``fp8_dpa`` to it, so it would silently run attention in BF16).
FP8_ATTENTION_RECIPES: tuple[str, ...] = ("delayed", "current", "mxfp8")
#: Oldest Transformer Engine with FP8 attention for a recipe: current scaling arrived in TE 2.9 (and needs
#: cuDNN >= 9.14), MXFP8 attention in TE 2.16.
MIN_TE_VERSION_FP8_ATTENTION: dict[str, str] = {"current": "2.9", "mxfp8": "2.16"}
#: Delayed scaling's own settings and their defaults (the reference recipe's values).
DELAYED_DEFAULTS: dict[str, Any] = {"margin": 0, "amax_history_len": 1024, "amax_compute_algo": "max"}

RECIPE_TITLES: dict[str, str] = {
    "delayed": "delayed scaling",
    "current": "current scaling (per tensor, Megatron 'tensorwise')",
    "blockwise": "blockwise scaling (1x128 activation/gradient blocks, 128x128 weight blocks)",
    "mxfp8": "MXFP8 block scaling (32-element blocks, power-of-2 scales)",
}


def resolve_recipe(name: str) -> str:
    """The canonical name of recipe ``name`` (``tensorwise`` -> ``current``); ValueError for unknown names."""
    resolved = RECIPE_ALIASES.get(name, name)
    if resolved not in RECIPES:
        raise ValueError(f"Unknown FP8 recipe {name!r}: use delayed, current (alias tensorwise), blockwise or mxfp8.")
    return resolved


def check_bf16_layers(first: int, last: int, num_layers: int, pipeline_model_parallel_size: int = 1) -> None:
    """Raise ``ValueError`` if ``first`` + ``last`` BF16 layers cover all ``num_layers``: every layer would run in
    BF16 while the log says FP8 (Megatron accepts it; only the LM head and embeddings are outside FP8 anyway); or if
    either exceeds the layers per pipeline stage, which Megatron's TransformerConfig refuses once the model is built.
    """
    per_stage = num_layers // max(pipeline_model_parallel_size, 1)
    if pipeline_model_parallel_size > 1 and max(first, last) > per_stage:
        raise ValueError(
            f"TEFP8Precision(bf16_first_layers={first}, bf16_last_layers={last}): with pipeline_model_parallel_size "
            f"{pipeline_model_parallel_size} Megatron allows at most num_layers / PP = {per_stage} BF16 layers at "
            f"either end; lower them to <= {per_stage}."
        )
    if (first or last) and first + last >= num_layers:
        raise ValueError(
            f"TEFP8Precision(bf16_first_layers={first}, bf16_last_layers={last}) keeps {first + last} layers in BF16, "
            f"but the model has {num_layers}: no layer would train in FP8. Lower them (first + last < {num_layers}), "
            "or train in BF16 with MegatronPrecision()."
        )
