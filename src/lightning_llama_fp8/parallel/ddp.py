"""Megatron DDP around the model chunks: wrapping, the schedule's hooks, and weight-gradient accumulation fusion.

``MegatronCPStrategy.setup`` calls these in order once the model is built: :func:`wrap_megatron_modules` replaces
each Megatron model (chunk) of the LightningModule with Megatron's ``DistributedDataParallel`` (contiguous gradient
buffers, bucketed and optionally overlapped reduce-scatter); :func:`fuse_te_weight_gradient_accumulation` then has
Transformer Engine's layers add their weight gradients straight into those buffers where
:func:`resolve_gradient_accumulation_fusion` says so; and after the optimizer exists,
:func:`connect_schedule_hooks` gives Megatron's forward-backward schedule the per-chunk DDP and optimizer hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallelConfig

log = logging.getLogger(__name__)


def megatron_children(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The attributes of ``module`` that are Megatron models: a model, or a ``ModuleList`` of model chunks."""
    from megatron.core.transformer.module import MegatronModule

    def is_megatron(child: torch.nn.Module) -> bool:
        return isinstance(child, MegatronModule)

    return {
        name: child
        for name, child in module.named_children()
        if is_megatron(child)
        or (isinstance(child, torch.nn.ModuleList) and len(child) > 0 and all(map(is_megatron, child)))
    }


def wrap_megatron_modules(module: torch.nn.Module, ddp_config: DistributedDataParallelConfig) -> list[torch.nn.Module]:
    """Replace each Megatron model of ``module`` with Megatron DDP around it; returns the wrappers, chunk order.

    A Megatron model is a direct attribute (``self.model = GPTModel(...)``) or each element of a
    ``torch.nn.ModuleList`` attribute (the model chunks of a virtual pipeline stage), wrapped in place.
    """
    from megatron.core.distributed import DistributedDataParallel

    def wrap(child: torch.nn.Module, chunk_index: int) -> torch.nn.Module:
        if isinstance(child, DistributedDataParallel):
            return child
        # As Megatron-LM: only the first chunk is bucketed; the others reduce in one bucket each, whose
        # reduce-scatter happens while the earlier chunks still run their backward.
        wrapped = DistributedDataParallel(
            config=child.config, ddp_config=ddp_config, module=child, disable_bucketing=chunk_index > 0
        )
        # Same weights on every DP rank even if a user's init is not seeded identically.
        wrapped.broadcast_params()
        return wrapped

    wrappers: list[torch.nn.Module] = []
    for name, child in megatron_children(module).items():
        if isinstance(child, torch.nn.ModuleList):
            for index, chunk in enumerate(child):
                child[index] = wrap(chunk, index)
                wrappers.append(child[index])
        else:
            setattr(module, name, wrap(child, 0))
            wrappers.append(getattr(module, name))
    if not wrappers:
        raise TypeError(
            f"{type(module).__name__} has no Megatron-Core model as a direct attribute after configure_model(); "
            "MegatronCPStrategy needs one (e.g. self.model = GPTModel(...)) to wrap in Megatron DDP."
        )
    return wrappers


def connect_schedule_hooks(
    chunks: list[torch.nn.Module],
    optimizer: Any,
    *,
    overlap_grad_reduce: bool,
    pipelined: bool,
    overlap_param_gather: bool,
    align_param_gather: bool,
) -> None:
    """Give Megatron's forward-backward schedule the DDP and optimizer hooks Megatron-LM wires up.

    The chunks of one rank share one TransformerConfig, which the schedule reads: the per-chunk hooks go in as
    lists (one per chunk, as Megatron-LM's ``train`` sets them), a single chunk's as the function itself.
    """
    from megatron.core.distributed import finalize_model_grads

    if not chunks:
        return
    config = chunks[0].config

    def per_chunk(method: str) -> Any:
        hooks = [getattr(ddp, method) for ddp in chunks]
        return hooks[0] if len(hooks) == 1 else hooks

    config.no_sync_func = per_chunk("no_sync")
    if overlap_grad_reduce and pipelined:
        # Start each chunk's gradient reduce as soon as its last micro batch's backward is done.
        config.grad_sync_func = per_chunk("start_grad_sync")
    config.finalize_model_grads_func = finalize_model_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss
    if overlap_param_gather and align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


# ---------------------------------------------------------------------------- gradient accumulation fusion
def callbacks_needing_unfused_weight_gradients(callbacks: Iterable[Any]) -> list[str]:
    """Names of the callbacks that hook weight gradients the fused path never produces (``FaultInjector``'s
    gradient injection says so by ``needs_unfused_weight_gradients``)."""
    return [type(cb).__name__ for cb in callbacks if getattr(cb, "needs_unfused_weight_gradients", False)]


def gradient_accumulation_fusion_problem(setting: bool | None, arch: Any, callbacks: Iterable[Any]) -> str | None:
    """Why ``gradient_accumulation_fusion=setting`` cannot work for this model and these callbacks (or None).

    Only an explicit ``True`` can be wrong: the default resolves to off where it cannot apply.
    """
    if setting is not True:
        return None
    if arch is not None and arch.transformer_impl != "transformer_engine":
        return (
            "MegatronCPStrategy(gradient_accumulation_fusion=True) fuses the weight-gradient accumulation of "
            "Transformer Engine's layers; this model uses Megatron-Core's local layer spec "
            f"(transformer_impl: {arch.transformer_impl!r}). Set transformer_impl: transformer_engine, or "
            "gradient_accumulation_fusion: false (or leave it unset: on only where it applies)."
        )
    needing = callbacks_needing_unfused_weight_gradients(callbacks)
    if needing:
        return (
            f"MegatronCPStrategy(gradient_accumulation_fusion=True) with {', '.join(needing)}: the fused path "
            "adds Transformer Engine's weight gradients into Megatron's buffer inside the GEMM, so the gradient "
            "hook that callback relies on never sees them. Set gradient_accumulation_fusion: false, or leave it "
            "unset (then it is off while such a callback is there)."
        )
    return None


def resolve_gradient_accumulation_fusion(setting: bool | None, arch: Any, callbacks: Iterable[Any]) -> bool:
    """Whether to fuse: ``setting`` when given; by default (``None``) on for the Transformer Engine layer spec
    unless a callback needs the unfused weight gradients."""
    if setting is not None:
        return setting
    if arch is None or arch.transformer_impl != "transformer_engine":
        return False
    needing = callbacks_needing_unfused_weight_gradients(callbacks)
    if needing:
        log.info("Gradient accumulation fusion off: %s hooks the unfused weight gradients.", ", ".join(needing))
        return False
    return True


def fuse_te_weight_gradient_accumulation(ddp_modules: list[torch.nn.Module], required: bool = True) -> int:
    """Have every Transformer Engine module under ``ddp_modules`` accumulate its weight gradients into the
    parameters' ``main_grad`` (Megatron DDP's buffer, which exists once the model is wrapped); returns how many.

    The switch is TE's ``fuse_wgrad_accumulation`` attribute, which its modules read at every forward; Megatron's
    own linear layers (the output layer) keep theirs off. With ``required``, raises if there is no TE module to
    switch; without, returns 0.
    """
    modules = [
        module
        for ddp in ddp_modules
        for module in ddp.modules()
        if type(module).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
        and hasattr(module, "fuse_wgrad_accumulation")
    ]
    if not modules and not required:
        return 0
    if not modules:
        raise ValueError(
            "MegatronCPStrategy(gradient_accumulation_fusion=True) found no Transformer Engine layer in the model; "
            "build it with the Transformer Engine layer spec or turn the setting off."
        )
    for module in modules:
        module.fuse_wgrad_accumulation = True
    log.info("Gradient accumulation fusion: %d Transformer Engine modules add into main_grad.", len(modules))
    return len(modules)
