"""Whether this machine can run an FP8 recipe: the GPU, Transformer Engine's own checks and its version."""

from __future__ import annotations

import torch
from packaging.version import Version

from lightning_llama_fp8._compat.versions import te_version
from lightning_llama_fp8.fp8.recipes import (
    FP8_ATTENTION_RECIPES,
    MIN_TE_VERSION,
    MIN_TE_VERSION_FP8_ATTENTION,
    RECIPES,
    TE_SUPPORT_CHECK,
    resolve_recipe,
)


class FP8UnavailableError(RuntimeError):
    """FP8 was asked for on a machine that cannot run it."""


def fp8_support(recipe: str = "delayed", fp8_attention: bool = False) -> tuple[bool, str]:
    """Can this machine run ``recipe`` (with FP8 attention if asked)? Returns (ok, reason).

    The reason names the GPU and, when something is missing, TE's own explanation and the check that gave it
    (``transformer_engine.pytorch.is_fp8_available`` / ``is_fp8_block_scaling_available`` /
    ``is_mxfp8_available``), or the Transformer Engine version the recipe needs.
    """
    recipe = resolve_recipe(recipe)
    if not torch.cuda.is_available():
        return False, _no_gpu_reason()
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{name} (compute capability {major}.{minor})"
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        return False, f"Transformer Engine is not importable on {gpu} ({err})."
    version = te_version()
    te_name = f"Transformer Engine {version}" if version is not None else "this Transformer Engine"
    check_name = TE_SUPPORT_CHECK[recipe]
    check = getattr(te, check_name, None)
    if check is None:
        return False, f"{te_name} has no transformer_engine.pytorch.{check_name}(): too old for the {recipe} recipe."
    ok, why = check(return_reason=True)
    if not ok:
        return (
            False,
            f"{gpu} cannot run {recipe} FP8: {why or 'unsupported'} (transformer_engine.pytorch.{check_name}).",
        )
    too_old = _te_too_old(version, MIN_TE_VERSION.get(recipe), f"the {recipe} recipe")
    if too_old is None and fp8_attention:
        if recipe not in FP8_ATTENTION_RECIPES:
            return False, f"FP8 attention is not available with the {recipe} recipe."
        too_old = _te_too_old(version, MIN_TE_VERSION_FP8_ATTENTION.get(recipe), f"FP8 attention with {recipe}")
    if too_old is not None:
        return False, f"{too_old} (on {gpu})."
    with_attention = " with FP8 attention" if fp8_attention else ""
    return True, f"{gpu} supports {recipe} FP8{with_attention} ({te_name})."


def _no_gpu_reason() -> str:
    reason = "no CUDA GPU is visible (torch.cuda.is_available() is False)."
    if torch.version.cuda is None:
        return f"{reason[:-1]}; this torch {torch.__version__} is a CPU-only build."
    # The usual cause on a machine that does have GPUs: a driver older than torch's CUDA needs.
    return (
        f"{reason[:-1]}; this torch {torch.__version__} is built for CUDA {torch.version.cuda}: if the machine has "
        "NVIDIA GPUs, check that nvidia-smi lists them and that the driver supports that CUDA version (CUDA 13.0 "
        "needs driver >= 580)."
    )


def _te_too_old(version: Version | None, minimum: str | None, what: str) -> str | None:
    """Why ``version`` is too old for ``what`` (None if it is new enough, unknown, or there is no minimum)."""
    if minimum is None or version is None or version >= Version(minimum):
        return None
    return f"{what} needs Transformer Engine >= {minimum}, this is {version}"


def supported_recipes(fp8_attention: bool = False) -> tuple[str, ...]:
    """The recipes (of :data:`RECIPES`) this machine runs, by :func:`fp8_support`."""
    return tuple(r for r in RECIPES if fp8_support(r, fp8_attention=fp8_attention)[0])
