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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn

log = logging.getLogger(__name__)

RecipeName = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
FP8Format = Literal["hybrid", "e4m3"]


class FP8UnavailableError(RuntimeError):
    """FP8 was asked for on a machine that cannot run it."""


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

    def check_supported(self) -> None:
        """Raise if this machine cannot train in this precision. BF16 runs wherever Megatron does."""

    @property
    def fp8_active(self) -> bool:
        return False


class TEFP8Precision(MegatronPrecision):
    """Transformer Engine FP8 training.

    The defaults are the reference recipe of Megatron-LM's ``train_llama3_8b_h100_fp8.sh``: delayed scaling,
    ``hybrid`` format (E4M3 forward, E5M2 gradients), margin 0, amax history 1024, ``max`` over the history.

    Args:
        recipe: ``delayed`` (per-tensor scales from an amax history), ``tensorwise`` (current scaling),
            ``blockwise`` (Hopper, CUDA >= 12.9) or ``mxfp8`` (Blackwell).
        fp8_format: ``hybrid`` or ``e4m3``.
        margin: delayed scaling's margin (scale = 2^-margin * fp8_max / amax).
        amax_history_len: delayed scaling's amax history length.
        amax_compute_algo: ``max`` or ``most_recent`` over the amax history.
        fp8_param_gather: keep TE weights in FP8 and all-gather them in FP8 (Megatron-LM ``--fp8-param-gather``).
        fallback: ``"bf16"`` to train in BF16 (and say so in the log) on a machine without FP8; ``None`` raises.
    """

    precision: str = "transformer-engine-fp8"

    def __init__(
        self,
        recipe: RecipeName = "delayed",
        fp8_format: FP8Format = "hybrid",
        margin: int = 0,
        amax_history_len: int = 1024,
        amax_compute_algo: Literal["max", "most_recent"] = "max",
        fp8_param_gather: bool = False,
        fallback: Literal["bf16"] | None = None,
    ) -> None:
        super().__init__()
        if recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
            raise ValueError(f"Unknown FP8 recipe {recipe!r}: use delayed, tensorwise, blockwise or mxfp8.")
        if fp8_format not in ("hybrid", "e4m3"):
            raise ValueError(f"Unknown FP8 format {fp8_format!r}: use hybrid or e4m3.")
        if fallback not in (None, "bf16"):
            raise ValueError(f"fallback must be None or 'bf16', got {fallback!r}.")
        self.recipe = recipe
        self.fp8_format = fp8_format
        self.margin = margin
        self.amax_history_len = amax_history_len
        self.amax_compute_algo = amax_compute_algo
        self.fp8_param_gather = fp8_param_gather
        self.fallback = fallback
        self._fp8_active: bool | None = None  # decided once, by check_supported()
        self._manages_autocast = True  # False once convert_module() sees a Megatron model

    # ------------------------------------------------------------------ support
    def check_supported(self) -> None:
        """Decide, once, whether FP8 runs here; raise a clear error or fall back to BF16 if asked to."""
        if self._fp8_active is not None:
            return
        ok, reason = fp8_support(self.recipe)
        if ok:
            self._fp8_active = True
            return
        if self.fallback == "bf16":
            log.warning("FP8 is not available: %s Training in BF16 instead (TEFP8Precision(fallback='bf16')).", reason)
            self._fp8_active = False
            return
        raise FP8UnavailableError(
            f"FP8 training ({self.recipe} scaling) is not possible here: {reason} "
            "Run on an NVIDIA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell) with Transformer "
            "Engine installed (`pip install 'lightning-llama-fp8[te]'` or NVIDIA's PyTorch container), or pass "
            "TEFP8Precision(fallback='bf16') to train in BF16 instead."
        )

    @property
    def fp8_active(self) -> bool:
        self.check_supported()
        return bool(self._fp8_active)

    # ------------------------------------------------------------------ megatron
    def transformer_config_kwargs(self) -> dict[str, Any]:
        kwargs = super().transformer_config_kwargs()
        if not self.fp8_active:
            return kwargs
        kwargs.update(
            fp8=self.fp8_format,
            fp8_recipe=self.recipe,
            fp8_margin=self.margin,
            fp8_amax_history_len=self.amax_history_len,
            fp8_amax_compute_algo=self.amax_compute_algo,
            fp8_param=self.fp8_param_gather,
        )
        return kwargs

    def ddp_config_kwargs(self) -> dict[str, Any]:
        # With FP8 parameters the distributed optimizer must re-quantize its fp32 main weights into the FP8
        # model weights after each step (and all-gather them in FP8); DDP's config tells it to.
        return {"fp8_param_gather": self.fp8_active and self.fp8_param_gather}

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
        return module

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
            )
        if self.recipe == "tensorwise":
            return te_recipe.Float8CurrentScaling(fp8_format=fmt)
        if self.recipe == "blockwise":
            return te_recipe.Float8BlockScaling(fp8_format=fmt)
        return te_recipe.MXFP8BlockScaling(fp8_format=fmt)

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """TE autocast for plain TE modules; nothing for Megatron models (they enter it themselves)."""
        if not self._manages_autocast or not self.fp8_active:
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


def fp8_support(recipe: str = "delayed") -> tuple[bool, str]:
    """Can this machine run ``recipe``? Returns (ok, reason) with the GPU named in the reason."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)."
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{name} (compute capability {major}.{minor})"
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        return False, f"Transformer Engine is not importable on {gpu} ({err})."
    checks = {
        "delayed": te.is_fp8_available,
        "tensorwise": te.is_fp8_available,
        "blockwise": te.is_fp8_block_scaling_available,
        "mxfp8": te.is_mxfp8_available,
    }
    ok, why = checks[recipe](return_reason=True)
    if ok:
        return True, f"{gpu} supports {recipe} FP8."
    return False, f"{gpu} cannot run {recipe} FP8: {why or 'unsupported'}."
