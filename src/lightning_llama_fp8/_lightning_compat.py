"""The only place this package touches Lightning's private (underscored) API.

Lightning's own ``ModelParallelStrategy`` and ``DDPStrategy`` use these helpers to launch processes and start
torch.distributed; a custom strategy has no public equivalent. Each one is wrapped here so that a Lightning
upgrade that moves them breaks one file, and ``tests/test_lightning_compat.py`` notices.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed as _reset_seed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor


def subprocess_script_launcher(cluster_environment: Any, num_processes: int, num_nodes: int) -> Any:
    """Lightning's launcher that re-runs the script once per local device (``devices=N`` without torchrun)."""
    return _SubprocessScriptLauncher(cluster_environment, num_processes, num_nodes)


def init_dist_connection(cluster_environment: Any, backend: str, timeout: timedelta | None) -> None:
    """Start torch.distributed from the cluster environment (no-op if it is already running)."""
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    _init_dist_connection(cluster_environment, backend, **kwargs)


def set_rank_zero(global_rank: int) -> None:
    """Tell Lightning's ``rank_zero_only`` utilities which rank this process is."""
    rank_zero_only.rank = utils_rank_zero_only.rank = global_rank  # type: ignore[attr-defined]


def evaluate_without_inference_mode(trainer: Any) -> None:
    """Run validation/test/predict under ``torch.no_grad`` instead of ``torch.inference_mode``.

    Tensors created under inference mode can never be used by autograd later; Transformer Engine caches FP8
    weight copies and scaling state during forward passes, and Megatron-LM evaluates under ``no_grad`` for
    that reason. Same effect as ``Trainer(inference_mode=False)``, applied by the strategy so users cannot
    forget it.
    """
    loops = [
        trainer.validate_loop,
        trainer.test_loop,
        trainer.predict_loop,
        trainer.fit_loop.epoch_loop.val_loop,
    ]
    for loop in loops:
        loop.inference_mode = False


def run_closure_and_before_optimizer_step_hooks(precision: Any, model: Any, optimizer: Any, closure: Any) -> Any:
    """Run ``closure``, then every callback's and the module's ``on_before_optimizer_step`` hook.

    What Lightning's ``Precision.optimizer_step`` does before it steps; needed by a strategy that steps an
    optimizer without a closure argument (Megatron's), so callbacks such as ``NaNGuard`` still see the gradients
    between backward and the update, and may veto the update.
    """
    return precision._wrap_closure(model, optimizer, closure)


def reset_seed() -> None:
    """Re-apply ``seed_everything``'s seed in a freshly launched process."""
    _reset_seed()


def sync_ddp_if_available(tensor: Tensor, group: Any, reduce_op: Any) -> Tensor:
    return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)


def all_gather_ddp_if_available(tensor: Tensor, group: Any, sync_grads: bool) -> Tensor:
    return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)
