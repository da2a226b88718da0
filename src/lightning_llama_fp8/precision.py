"""Precision plugins: BF16 for Megatron models, and Transformer Engine FP8 on top of it.

Megatron-Core models carry their precision in their ``TransformerConfig``: parameters are built in bf16 and,
when ``config.fp8`` is set, every TransformerBlock enters TE's FP8 autocast itself with the amax-reduction
group TP x DP x CP. So for a Megatron model these plugins only *describe* the precision
(:meth:`MegatronPrecision.transformer_config_kwargs`, read by the LightningModule before it builds the
model) and never wrap a second autocast around it: TE reduces delayed-scaling amaxes when the *outermost*
autocast exits, so an outer wrapper would move that reduction from once per layer-block forward to once per
training step, with a different group.

For plain TE modules (anything that is not a Megatron model) :class:`TEFP8Precision` enters TE's autocast
itself, with the same amax group Megatron would use.

FP8 recipes (:data:`RECIPES`): ``delayed``, ``current`` (Megatron's ``tensorwise``), ``blockwise`` and
``mxfp8``. Everything a recipe cannot do is rejected when the plugin is constructed; what the machine cannot
do is checked by :meth:`TEFP8Precision.check_supported` before training starts (the strategy calls it before
any process group exists).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_llama_fp8.fp8 import support
from lightning_llama_fp8.fp8.recipes import (
    BF16_LAYER_RECIPES,
    DELAYED_DEFAULTS,
    FP8_ATTENTION_RECIPES,
    MEGATRON_RECIPE,
    RECIPE_NEEDS,
    RECIPE_TITLES,
    RECIPES,
    AmaxComputeAlgo,
    FP8Format,
    RecipeName,
    check_bf16_layers,
    resolve_recipe,
)
from lightning_llama_fp8.fp8.support import FP8UnavailableError, fp8_support
from lightning_llama_fp8.validate import SettingError, as_bool, as_int

# The documented paths lightning_llama_fp8.precision.fp8_support / FP8UnavailableError / RECIPES / check_bf16_layers.
__all__ = [
    "RECIPES",
    "FP8UnavailableError",
    "MegatronPrecision",
    "TEFP8Precision",
    "check_bf16_layers",
    "fp8_support",
]

log = logging.getLogger(__name__)


def is_megatron_model(module: nn.Module) -> bool:
    """True if ``module`` is, or contains, a Megatron-Core model (which manages its own FP8 autocast)."""
    try:
        from megatron.core.transformer.module import MegatronModule
    except ImportError:
        return False
    return any(isinstance(m, MegatronModule) for m in module.modules())


class MegatronPrecision(Precision):
    """BF16 training of Megatron-Core models, Megatron-LM style.

    Parameters are created in bf16; Megatron's distributed optimizer keeps fp32 main weights and moments.
    Nothing is autocast: Megatron's modules already run in the parameters' dtype.
    """

    precision: str = "bf16-true"

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Fields this plugin sets in the model's ``TransformerConfig`` (read before the model is built)."""
        return {"bf16": True, "params_dtype": torch.bfloat16}

    def ddp_config_kwargs(self) -> dict[str, Any]:
        """Fields this plugin sets in Megatron's ``DistributedDataParallelConfig``."""
        return {}

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """Fields this plugin sets in Megatron's ``OptimizerConfig``."""
        return {}

    def check_supported(self) -> None:
        """Raise if this machine cannot train in this precision. BF16 runs wherever Megatron does."""

    def check_num_layers(self, num_layers: int, pipeline_model_parallel_size: int = 1) -> None:
        """Raise if a setting of this plugin cannot take effect on a model of ``num_layers`` transformer layers
        split over ``pipeline_model_parallel_size`` stages."""

    @property
    def fp8_active(self) -> bool:
        return False

    def optimizer_step_context(self, modules: list[nn.Module]) -> contextlib.AbstractContextManager[Any]:
        """Entered around Megatron's ``optimizer.step()`` of ``modules`` (the strategy's DDP-wrapped chunks)."""
        return contextlib.nullcontext()


class TEFP8Precision(MegatronPrecision):
    """Transformer Engine FP8 training.

    The defaults are the reference recipe of Megatron-LM's ``train_llama3_8b_h100_fp8.sh``: delayed scaling,
    ``hybrid`` format (E4M3 forward, E5M2 gradients), margin 0, amax history 1024, ``max`` over the history.

    Recipes (what each needs from the GPU is checked by :meth:`check_supported` before training starts):

    - ``delayed``: per-tensor scales from an amax history (TE ``DelayedScaling``); compute capability >= 8.9.
      No BF16 layers; FP8 attention yes.
    - ``current``: per-tensor scales from each tensor's current amax (TE ``Float8CurrentScaling``, Megatron
      ``tensorwise``); compute capability >= 8.9. BF16 layers yes; FP8 attention with TE >= 2.9.
    - ``blockwise``: 1x128 activation/gradient and 128x128 weight blocks (TE ``Float8BlockScaling``); compute
      capability >= 9.0 (Hopper) and CUDA >= 12.9. BF16 layers yes; no FP8 attention.
    - ``mxfp8``: 32-element blocks with power-of-2 scales (TE ``MXFP8BlockScaling``); compute capability 10.x
      or 11.x (Blackwell). BF16 layers yes; FP8 attention with TE >= 2.16.

    ``tensorwise`` (Megatron's name for current scaling) is accepted and resolves to ``current``. Combinations
    that Megatron or Transformer Engine reject (BF16 layers with delayed scaling, FP8 attention with blockwise
    scaling, delayed-scaling settings with another recipe, counts that are negative or not whole numbers) raise
    ``ValueError`` here, when the plugin is built; a machine that cannot run the recipe raises
    :class:`FP8UnavailableError` naming the missing capability and the recipes that would work. Once the check
    passes, :meth:`describe` is logged once on global rank zero.

    Args:
        recipe: ``delayed``, ``current`` (alias ``tensorwise``), ``blockwise`` or ``mxfp8`` (see above).
        fp8_format: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3``.
        margin: delayed scaling only: scale = 2^-margin * fp8_max / amax (a whole number >= 0).
        amax_history_len: delayed scaling only: the amax history length (>= 1).
        amax_compute_algo: delayed scaling only: ``max`` or ``most_recent`` over the amax history.
        fp8_param_gather: keep TE weights in FP8 and all-gather them in FP8 (Megatron-LM ``--fp8-param-gather``).
        bf16_first_layers: keep this many transformer layers at the start of the model in BF16
            (``TransformerConfig.first_last_layers_bf16`` / ``num_layers_at_start_in_bf16``); not with
            ``delayed``. Megatron checks it against the layers per pipeline stage when it builds the config.
        bf16_last_layers: the same for the layers at the end (``num_layers_at_end_in_bf16``).
        fp8_attention: run dot-product attention in FP8 too (``TransformerConfig.fp8_dot_product_attention``,
            TE's ``fp8_dpa``); beta in TE, cuDNN fused attention only (``attention_backend: fused``); not with
            ``blockwise``.
        fallback: ``"bf16"`` to train in BF16 (and say so in the log) on a machine without FP8; ``None`` raises.
        fast_weight_refresh: with ``fp8_param_gather`` and ``delayed``: after each optimizer step, cast the updated
            main weights into the FP8 weights without the transpose TE computes for each one-row shard and then
            drops (same bytes, faster steps: README "Speed"; ``fp8/weights.py``).
            ``False``: Megatron's and TE's own path, as Megatron-LM runs it. No effect with optimizer offload
            (Megatron's precision-aware optimizer writes the weights back itself).
    """

    precision: str = "transformer-engine-fp8"

    def __init__(
        self,
        recipe: RecipeName = "delayed",
        fp8_format: FP8Format = "hybrid",
        margin: int = 0,
        amax_history_len: int = 1024,
        amax_compute_algo: AmaxComputeAlgo = "max",
        fp8_param_gather: bool = False,
        bf16_first_layers: int = 0,
        bf16_last_layers: int = 0,
        fp8_attention: bool = False,
        fallback: Literal["bf16"] | None = None,
        fast_weight_refresh: bool = True,
    ) -> None:
        super().__init__()
        self.recipe = resolve_recipe(recipe)
        self.fp8_format = fp8_format
        self.margin = margin
        self.amax_history_len = amax_history_len
        self.amax_compute_algo = amax_compute_algo
        self.fp8_param_gather = fp8_param_gather
        self.bf16_first_layers = bf16_first_layers
        self.bf16_last_layers = bf16_last_layers
        self.fp8_attention = fp8_attention
        self.fallback = fallback
        self.fast_weight_refresh = fast_weight_refresh
        self._validate()
        self._fp8_active: bool | None = None  # decided once, by check_supported()
        self._manages_autocast = True  # False once convert_module() sees a Megatron model
        self._suspended_fp8: dict[int, tuple[Any, Any]] = {}  # config id -> (TransformerConfig, its fp8 format)
        self._fp8_suspended = False  # set_fp8_enabled(False) is in effect

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Reject what Megatron or TE would refuse (or silently ignore), before the strategy starts anything."""
        self._validate_numbers()
        if self.fp8_format not in ("hybrid", "e4m3"):
            raise ValueError(f"Unknown FP8 format {self.fp8_format!r}: use hybrid or e4m3.")
        if self.fallback not in (None, "bf16"):
            raise ValueError(f"fallback must be None or 'bf16', got {self.fallback!r}.")
        self._validate_delayed_settings()
        self._validate_bf16_layers()
        self._validate_fp8_attention()

    def _validate_numbers(self) -> None:
        """Counts are whole numbers in range and switches true or false (``validate``'s rules: ``margin: 2.0`` from
        YAML is 2; ``2.5``, NaN or ``"false"`` are refused instead of reaching TE); all problems at once."""
        problems = []
        # margin >= 0: a negative one would set scales above fp8_max / amax, saturating the largest values.
        counts = {"margin": 0, "amax_history_len": 1, "bf16_first_layers": 0, "bf16_last_layers": 0}
        for name, at_least in counts.items():
            try:
                setattr(self, name, as_int(getattr(self, name), name, at_least=at_least))
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        for name in ("fp8_param_gather", "fp8_attention", "fast_weight_refresh"):
            try:
                as_bool(getattr(self, name), name)
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        if problems:
            raise SettingError("TEFP8Precision: " + "; ".join(problems) + ".")

    def _validate_delayed_settings(self) -> None:
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"Unknown amax_compute_algo {self.amax_compute_algo!r}: use max or most_recent.")
        if self.recipe == "delayed":
            return
        # The other recipes compute their scales from the tensor itself; Megatron reads these settings only for
        # delayed scaling, so a non-default value here would be silently ignored.
        changed = {k: getattr(self, k) for k, default in DELAYED_DEFAULTS.items() if getattr(self, k) != default}
        if changed:
            settings = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            raise ValueError(
                f"{settings} only apply to delayed scaling; the {self.recipe} recipe computes its scales from "
                "each tensor's current values. Remove them or use recipe='delayed'."
            )

    def _validate_bf16_layers(self) -> None:
        if self.keeps_bf16_layers and self.recipe not in BF16_LAYER_RECIPES:
            raise ValueError(
                f"bf16_first_layers={self.bf16_first_layers} / bf16_last_layers={self.bf16_last_layers} need a "
                f"recipe that allows BF16 layers: {', '.join(BF16_LAYER_RECIPES)}. Delayed scaling reduces its "
                "amaxes when the one FP8 autocast around all layers exits, so Megatron rejects BF16 layers with it."
            )

    def _validate_fp8_attention(self) -> None:
        if self.fp8_attention and self.recipe not in FP8_ATTENTION_RECIPES:
            raise ValueError(
                f"fp8_attention=True is not available with the {self.recipe} recipe (Transformer Engine's "
                f"Float8BlockScaling has no FP8 attention). Use one of {', '.join(FP8_ATTENTION_RECIPES)}, or "
                "fp8_attention=False."
            )

    @property
    def keeps_bf16_layers(self) -> bool:
        """True if some transformer layers stay in BF16."""
        return self.bf16_first_layers > 0 or self.bf16_last_layers > 0

    def check_num_layers(self, num_layers: int, pipeline_model_parallel_size: int = 1) -> None:
        """Refuse BF16 first/last layers that leave no layer in FP8 or that Megatron refuses for the pipeline split
        (the strategy calls it before building)."""
        check_bf16_layers(self.bf16_first_layers, self.bf16_last_layers, num_layers, pipeline_model_parallel_size)

    # ------------------------------------------------------------------ support
    def check_supported(self) -> None:
        """Decide, once, whether FP8 runs here; raise a clear error or fall back to BF16 if asked to.

        On success the resolved recipe (:meth:`describe`) is logged once, on global rank zero.
        """
        if self._fp8_active is not None:
            return
        ok, reason = support.fp8_support(self.recipe, fp8_attention=self.fp8_attention)
        if ok:
            self._fp8_active = True
            rank_zero_info(self.describe())
            return
        if self.fallback == "bf16":
            log.warning("FP8 is not available: %s Training in BF16 instead (TEFP8Precision(fallback='bf16')).", reason)
            self._fp8_active = False
            return
        raise FP8UnavailableError(self._unavailable_message(reason))

    def _unavailable_message(self, reason: str) -> str:
        """What is missing, what the recipe needs, and what would work on this machine instead."""
        what = f"{self.recipe} scaling" + (", FP8 attention" if self.fp8_attention else "")
        needs = f"The {self.recipe} recipe needs an NVIDIA GPU with {RECIPE_NEEDS[self.recipe]}."
        bf16 = "TEFP8Precision(fallback='bf16') (or MegatronPrecision()) to train in BF16 instead."
        working = support.supported_recipes()
        if not working:
            return (
                f"FP8 training ({what}) is not possible here: {reason} {needs} No FP8 recipe works on this machine: "
                "run on such a GPU with Transformer Engine installed (`pip install 'lightning-llama-fp8[te]'` "
                f"or NVIDIA's PyTorch container), or pass {bf16}"
            )
        if self.recipe in working:  # only FP8 attention is missing
            instead = f"The {self.recipe} recipe itself works here with fp8_attention=False."
        else:
            instead = f"Recipes that work on this machine: {', '.join(working)} (TEFP8Precision(recipe=...))."
        return f"FP8 training ({what}) is not possible here: {reason} {needs} {instead} Or pass {bf16}"

    @property
    def fp8_active(self) -> bool:
        self.check_supported()
        return bool(self._fp8_active)

    def describe(self) -> str:
        """The resolved recipe in one line (logged once when :meth:`check_supported` passes)."""
        parts = [f"format {self.fp8_format}"]
        if self.recipe == "delayed":
            parts += [
                f"margin {self.margin}",
                f"amax history {self.amax_history_len} ({self.amax_compute_algo})",
            ]
        parts.append(f"FP8 param gather {'on' if self.fp8_param_gather else 'off'}")
        if self.fp8_param_gather and self.recipe == "delayed":
            parts.append(f"fast weight refresh {'on' if self.fast_weight_refresh else 'off'}")
        layers = f"first {self.bf16_first_layers} / last {self.bf16_last_layers}" if self.keeps_bf16_layers else "none"
        parts.append(f"BF16 layers: {layers}")
        parts.append(f"FP8 attention {'on' if self.fp8_attention else 'off'}")
        return f"FP8 {RECIPE_TITLES[self.recipe]}: {', '.join(parts)}"

    def optimizer_step_context(self, modules: list[nn.Module]) -> contextlib.AbstractContextManager[Any]:
        """With FP8 weights and delayed scaling (and ``fast_weight_refresh``): the weight refresh at the end of
        the step casts without the discarded transposes (:func:`~lightning_llama_fp8.fp8.weights.
        rowwise_only_weight_refresh`)."""
        if self.fast_weight_refresh and self.fp8_param_gather and self.recipe == "delayed" and self.fp8_active:
            from lightning_llama_fp8.fp8.weights import rowwise_only_weight_refresh

            return rowwise_only_weight_refresh(modules)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ megatron
    def transformer_config_kwargs(self) -> dict[str, Any]:
        """The FP8 fields of Megatron's ``TransformerConfig`` for this recipe (BF16 only in the fallback)."""
        kwargs = super().transformer_config_kwargs()
        if not self.fp8_active:
            return kwargs
        kwargs.update(
            fp8=self.fp8_format,
            fp8_recipe=MEGATRON_RECIPE[self.recipe],
            fp8_param=self.fp8_param_gather,
            fp8_dot_product_attention=self.fp8_attention,
        )
        if self.recipe == "delayed":  # Megatron reads these for delayed scaling only
            kwargs.update(
                fp8_margin=self.margin,
                fp8_amax_history_len=self.amax_history_len,
                fp8_amax_compute_algo=self.amax_compute_algo,
            )
        if self.keeps_bf16_layers:
            kwargs.update(
                first_last_layers_bf16=True,
                num_layers_at_start_in_bf16=self.bf16_first_layers,
                num_layers_at_end_in_bf16=self.bf16_last_layers,
            )
        return kwargs

    def ddp_config_kwargs(self) -> dict[str, Any]:
        # With FP8 parameters the distributed optimizer must re-quantize its fp32 main weights into the FP8
        # model weights after each step (and all-gather them in FP8); DDP's config tells it to.
        return {"fp8_param_gather": self.fp8_active and self.fp8_param_gather}

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        # The distributed optimizer reads the recipe for FP8 weights only (MXFP8 weights, for instance, are gathered
        # differently). With bf16 weights it must not see one: its precision-aware path would otherwise keep fp32
        # main weights and an fp32 gradient copy itself for every recipe but delayed scaling.
        return {"fp8_recipe": MEGATRON_RECIPE[self.recipe]} if self.fp8_active and self.fp8_param_gather else {}

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Note whether the model is Megatron's (it autocasts itself) and check it was built for FP8."""
        if is_megatron_model(module):
            self._manages_autocast = False
            configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
            built_fp8 = [c for c in configs.values() if getattr(c, "fp8", None)]
            if self.fp8_active and not built_fp8:
                raise RuntimeError(
                    "The Megatron model was built without FP8 settings, so TEFP8Precision cannot make it train "
                    "in FP8. Build its TransformerConfig with `precision.transformer_config_kwargs()` (what "
                    "LlamaLightningModule.configure_model does)."
                )
        elif self.fp8_active and self.keeps_bf16_layers:
            # One autocast around a plain module has no notion of layer numbers to leave out.
            raise ValueError(
                "bf16_first_layers / bf16_last_layers apply to Megatron models only (they set Megatron's "
                f"TransformerConfig); {type(module).__name__} is a plain module. Set both to 0."
            )
        return module

    # ------------------------------------------------------------------ switching FP8 off for a while
    def set_fp8_enabled(self, module: nn.Module, enabled: bool) -> None:
        """Run the following forward passes without FP8 (``False``) or with it again (``True``).

        Used by ``NaNGuard(policy="rollback", bf16_steps_after_rollback=N)``. Megatron models read
        ``TransformerConfig.fp8`` at every forward (their TransformerBlock enters TE autocast only when it is set),
        so clearing it makes the next steps compute in BF16; plain TE modules skip :meth:`forward_context`'s
        autocast. The FP8 scaling state is left as it is and picks up again when FP8 comes back.
        """
        if not enabled and self.fp8_param_gather:
            raise ValueError(
                "FP8 cannot be switched off while weights are stored in FP8 (fp8_param_gather=True): the model "
                "has no BF16 copy of them. Use TEFP8Precision(fp8_param_gather=False) for BF16 steps after a "
                "rollback, or NaNGuard(bf16_steps_after_rollback=0)."
            )
        if not enabled:
            for m in module.modules():
                config = getattr(m, "config", None)
                if getattr(config, "fp8", None) and id(config) not in self._suspended_fp8:
                    self._suspended_fp8[id(config)] = (config, config.fp8)
                    config.fp8 = None
            self._fp8_suspended = True
            return
        for config, fp8_format in self._suspended_fp8.values():
            config.fp8 = fp8_format
        self._suspended_fp8 = {}
        self._fp8_suspended = False

    # ------------------------------------------------------------------ plain TE modules
    def te_recipe(self) -> Any:
        """The Transformer Engine recipe object for this configuration."""
        from transformer_engine.common import recipe as te_recipe

        fmt = te_recipe.Format.HYBRID if self.fp8_format == "hybrid" else te_recipe.Format.E4M3
        if self.recipe == "delayed":
            return te_recipe.DelayedScaling(
                margin=self.margin,
                fp8_format=fmt,
                amax_history_len=self.amax_history_len,
                amax_compute_algo=self.amax_compute_algo,
                fp8_dpa=self.fp8_attention,
            )
        if self.recipe == "current":
            return te_recipe.Float8CurrentScaling(fp8_format=fmt, fp8_dpa=self.fp8_attention)
        if self.recipe == "blockwise":
            return te_recipe.Float8BlockScaling(fp8_format=fmt)  # no FP8 attention (rejected at construction)
        return te_recipe.MXFP8BlockScaling(fp8_format=fmt, fp8_dpa=self.fp8_attention)

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """TE autocast for plain TE modules; nothing for Megatron models (they enter it themselves)."""
        if not self._manages_autocast or not self.fp8_active or self._fp8_suspended:
            yield
            return
        import transformer_engine.pytorch as te

        with te.autocast(enabled=True, recipe=self.te_recipe(), amax_reduction_group=amax_reduction_group()):
            yield


def amax_reduction_group() -> Any:
    """The group FP8 amaxes are reduced over: TP x DP x CP when Megatron's groups exist, else the world."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_amax_reduction_group(with_context_parallel=True)
    return None
