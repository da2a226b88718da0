"""Memory settings of ``MegatronCPStrategy``: activation recompute and optimizer CPU offload.

Both are Megatron-Core features; this module only names them the way a Lightning user sets a strategy argument,
checks the combinations before anything is built, and turns them into Megatron's config fields:

- :class:`RecomputeSettings` -> ``TransformerConfig.recompute_granularity`` / ``recompute_method`` /
  ``recompute_num_layers`` / ``recompute_modules`` (Megatron-LM's ``--recompute-*`` flags).
- :class:`OptimizerOffloadSettings` -> ``OptimizerConfig.optimizer_cpu_offload`` / ``optimizer_offload_fraction`` /
  ``overlap_cpu_optimizer_d2h_h2d`` (Megatron-LM's ``--optimizer-cpu-offload`` ...), with
  ``use_precision_aware_optimizer``, which Megatron's offload path needs (Megatron-LM asserts it).

From YAML::

    trainer:
      strategy:
        class_path: lightning_llama_fp8.MegatronCPStrategy
        init_args:
          activation_recompute: {granularity: full, method: uniform, num_layers: 1, modules: null}
          optimizer_offload: {fraction: 0.5, overlap_d2h_h2d: false}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_llama_fp8.validate import SettingError, as_optional_int

RecomputeGranularity = Literal["selective", "full"]
RecomputeMethod = Literal["uniform", "block"]

# What each of megatron-core 0.19.2's recompute_modules does in a dense Llama layer.
RECOMPUTE_MODULES: dict[str, str] = {
    "core_attn": "the attention kernel (softmax(QK^T)V): keeps Q, K, V, drops its output and softmax statistics",
    "mlp": "the whole MLP (fc1, SwiGLU, fc2): keeps its input only",
    "layernorm": "the RMSNorms (separate modules only, i.e. transformer_impl: local): drops their outputs",
}
# Megatron-core 0.19.2 knows these too, but a dense Llama has nothing they could recompute.
NOT_IN_A_DENSE_LLAMA: dict[str, str] = {
    "moe_act": "MoE layers",
    "moe": "MoE layers",
    "shared_experts": "MoE shared experts",
    "mla_up_proj": "multi-latent attention",
    "gdn_norm_out": "GatedDeltaNet attention",
}
DEFAULT_SELECTIVE_MODULES = ("core_attn",)  # Megatron's default (Megatron-LM's --recompute-activations)


@dataclass
class RecomputeSettings:
    """Activation recompute (checkpointing): recompute in the backward pass what the forward pass did not keep.

    Args:
        granularity: ``selective`` recomputes the chosen ``modules`` inside every layer (cheap, saves part of a
            layer's activations); ``full`` checkpoints whole transformer layers, keeping only their inputs
            (Megatron's ``recompute_granularity``).
        method: full granularity only. ``uniform`` (default) checkpoints every layer, in chunks of ``num_layers``
            consecutive layers (one input kept per chunk); ``block`` checkpoints only the first ``num_layers``
            layers and keeps all activations of the others (trade memory for speed).
        num_layers: full granularity only; layers per chunk (``uniform``, default 1) or layers checkpointed
            (``block``, default all), between 1 and the number of transformer layers.
        modules: selective granularity only; any of ``core_attn`` (default), ``mlp`` and ``layernorm`` (the last
            with ``transformer_impl: local`` only: Transformer Engine fuses the norms into the next linear layer).
    """

    granularity: RecomputeGranularity
    method: RecomputeMethod | None = None
    num_layers: int | None = None
    modules: list[str] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.granularity not in ("selective", "full"):
            raise ValueError(
                f"activation_recompute.granularity must be 'selective' or 'full', got {self.granularity!r}."
            )
        if self.granularity == "selective":
            if self.method is not None or self.num_layers is not None:
                problems.append(
                    "method and num_layers choose which layers full recompute checkpoints; selective recompute "
                    "applies to every layer. Drop them, or set granularity: full"
                )
            if self.modules is not None:
                problems += _module_problems(self.modules)
        else:
            if self.method is not None and self.method not in ("uniform", "block"):
                problems.append(f"method must be 'uniform' or 'block', got {self.method!r}")
            if self.modules is not None:
                problems.append(
                    "modules choose what selective recompute recomputes; full recompute checkpoints whole layers. "
                    "Drop modules, or set granularity: selective"
                )
            try:  # a whole number: 2.5 would otherwise reach Megatron's layer arithmetic
                self.num_layers = as_optional_int(self.num_layers, "num_layers", at_least=1)
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        if problems:
            raise ValueError("activation_recompute: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ resolved values
    @property
    def resolved_method(self) -> RecomputeMethod | None:
        return (self.method or "uniform") if self.granularity == "full" else None

    @property
    def resolved_modules(self) -> tuple[str, ...]:
        if self.granularity != "selective":
            return ()
        return tuple(self.modules) if self.modules is not None else DEFAULT_SELECTIVE_MODULES

    def resolved_num_layers(self, num_layers: int) -> int | None:
        """Megatron's ``recompute_num_layers`` for a stage of ``num_layers`` transformer layers."""
        if self.granularity != "full":
            return None
        if self.num_layers is not None:
            return self.num_layers
        return 1 if self.resolved_method == "uniform" else num_layers

    # ------------------------------------------------------------------ checks with the model
    def check(self, num_layers: int, transformer_impl: str, fp8_recipe: str | None = None) -> None:
        """Raise ``ValueError`` if these settings cannot take effect on this model (``num_layers`` per stage)."""
        problems: list[str] = []
        if self.granularity == "full" and self.num_layers is not None and self.num_layers > num_layers:
            what = "layers per chunk" if self.resolved_method == "uniform" else "layers to checkpoint"
            problems.append(
                f"num_layers ({self.num_layers}, {what}) must be between 1 and the model's {num_layers} transformer "
                "layers"
            )
        if "layernorm" in self.resolved_modules:
            if transformer_impl == "transformer_engine":
                problems.append(
                    "'layernorm' recomputes nothing with transformer_impl: transformer_engine (Transformer Engine "
                    "fuses each RMSNorm into the next linear layer; Megatron would skip it silently). Use 'mlp' "
                    "or full recompute instead"
                )
            elif fp8_recipe == "delayed":
                problems.append("Megatron cannot recompute 'layernorm' with FP8 delayed scaling")
        if problems:
            raise ValueError("activation_recompute: " + "; ".join(problems) + ".")

    def transformer_config_kwargs(self, num_layers: int) -> dict[str, Any]:
        """The recompute fields of Megatron's ``TransformerConfig`` (``num_layers``: layers of this stage)."""
        kwargs: dict[str, Any] = {
            "recompute_granularity": self.granularity,
            "recompute_method": self.resolved_method,
            "recompute_num_layers": self.resolved_num_layers(num_layers),
        }
        if self.granularity == "selective":
            kwargs["recompute_modules"] = list(self.resolved_modules)
        return kwargs

    def describe(self, num_layers: int) -> str:
        """One line, e.g. ``full (uniform, 1 layer per chunk)`` or ``selective (core_attn, mlp)``."""
        if self.granularity == "selective":
            return f"selective ({', '.join(self.resolved_modules)})"
        k = self.resolved_num_layers(num_layers)
        if self.resolved_method == "uniform":
            return f"full (uniform, {k} layer{'s' if k != 1 else ''} per chunk)"
        return f"full (block, first {k} of {num_layers} layers)"


def _module_problems(modules: list[str]) -> list[str]:
    if isinstance(modules, str):
        return [f"modules must be a list of names, got the string {modules!r}"]
    if not modules:
        return ["modules is empty, so selective recompute would recompute nothing; name at least one or drop it"]
    problems = []
    for name in modules:
        if name in NOT_IN_A_DENSE_LLAMA:
            problems.append(f"module {name!r} recomputes {NOT_IN_A_DENSE_LLAMA[name]}, which a Llama does not have")
        elif name not in RECOMPUTE_MODULES:
            problems.append(f"unknown module {name!r} (known: {', '.join(RECOMPUTE_MODULES)})")
    if len(set(modules)) != len(modules):
        problems.append(f"modules lists a name twice: {modules}")
    return problems


@dataclass
class OptimizerOffloadSettings:
    """Keep part of the optimizer state (fp32 main weights, Adam moments, fp32 gradients) in CPU memory and step
    that part on the CPU (Megatron-Core's ``HybridDeviceOptimizer``).

    Saves GPU memory at the cost of host memory (16 bytes per offloaded parameter, pinned) and step time (the CPU
    Adam step and the gradient/weight copies over PCIe). Needs the distributed optimizer.

    Args:
        fraction: share of this rank's optimizer state offloaded, in (0, 1] (Megatron's
            ``optimizer_offload_fraction``; whole parameters are offloaded until the share is reached).
        overlap_d2h_h2d: overlap the CPU step with the gradient and weight copies (Megatron's
            ``overlap_cpu_optimizer_d2h_h2d``; one CPU optimizer per parameter).
    """

    fraction: float = 1.0
    overlap_d2h_h2d: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not 0 < self.fraction <= 1:
            raise ValueError(
                f"optimizer_offload.fraction must be in (0, 1], got {self.fraction!r}; to keep the optimizer on "
                "the GPU, leave optimizer_offload unset (null)."
            )

    def check(self, use_distributed_optimizer: bool, fp8_recipe: str | None, fp8_param_gather: bool) -> None:
        """Raise ``ValueError`` for the combinations Megatron's offload path does not support."""
        problems = []
        if not use_distributed_optimizer:
            problems.append(
                "needs use_distributed_optimizer=True (Megatron offloads through its precision-aware distributed "
                "optimizer)"
            )
        if fp8_param_gather and fp8_recipe not in (None, "delayed"):
            problems.append(
                f"with FP8 weights (fp8_param_gather) it needs the delayed recipe, not {fp8_recipe!r} (Megatron-LM "
                "refuses this combination too); set fp8_param_gather: false or recipe: delayed"
            )
        if problems:
            raise ValueError("optimizer_offload: " + "; ".join(problems) + ".")

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """The offload fields of Megatron's ``OptimizerConfig``."""
        return {
            "optimizer_cpu_offload": True,
            "optimizer_offload_fraction": float(self.fraction),
            "overlap_cpu_optimizer_d2h_h2d": self.overlap_d2h_h2d,
            # Megatron's offload reuses the precision-aware optimizer's code path (Megatron-LM asserts both are on);
            # with its default dtypes (fp32 main weights, moments and gradients) the update is plain AdamW.
            "use_precision_aware_optimizer": True,
        }

    def describe(self) -> str:
        return f"{self.fraction:.0%} of the optimizer state on the CPU" + (
            ", copies overlapped" if self.overlap_d2h_h2d else ""
        )
