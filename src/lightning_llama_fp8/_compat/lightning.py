"""The only place this package touches Lightning's private (underscored) API.

Lightning's own ``ModelParallelStrategy`` and ``DDPStrategy`` use these helpers to launch processes and start
torch.distributed; a custom strategy has no public equivalent. Each one is wrapped here so that a Lightning
upgrade that moves them breaks one file, and ``tests/_compat/test_lightning.py`` notices.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
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


def has_trainer(strategy: Any) -> bool:
    """Whether ``strategy`` has a LightningModule attached to a Trainer (its protected ``_lightning_module`` and the
    module's ``_trainer``; the public properties raise or warn without them)."""
    return strategy._lightning_module is not None and strategy.lightning_module._trainer is not None


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


@dataclass(frozen=True)
class CheckpointArguments:
    """What the running ``Trainer.fit/validate/test/predict`` call was asked to load, and what Lightning made of it.

    ``requested``: the caller's ``ckpt_path`` (``"last"`` stays ``"last"``); ``resolved``: the path Lightning will
    load (``None``: none, e.g. for ``"last"`` when the only last checkpoint is a dangling link); ``weights_only``:
    the caller's argument, which Lightning does not pass on to a strategy that restores after setup.
    """

    requested: Any
    resolved: Any
    weights_only: bool | None


def checkpoint_arguments(trainer: Any) -> CheckpointArguments | None:
    """The checkpoint arguments of the ``trainer`` method running now, or ``None`` outside of one.

    Lightning keeps neither the caller's ``ckpt_path`` nor ``weights_only`` anywhere a strategy can read them before
    it restores (``trainer.ckpt_path`` is only set once loading starts, and keeps the previous run's value until
    then), so they are read from the frames of ``Trainer.fit`` (or ``validate``/``test``/``predict``) and of
    ``Trainer._run`` on the call stack, by their argument names.
    """
    from lightning.pytorch import Trainer

    entry_points = {getattr(Trainer, name).__code__ for name in ("fit", "validate", "test", "predict")}
    run = Trainer._run.__code__
    requested: dict[str, Any] | None = None
    resolved: dict[str, Any] | None = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is trainer:
            if frame.f_code is run and resolved is None:
                resolved = dict(frame.f_locals)
            elif frame.f_code in entry_points:
                requested = dict(frame.f_locals)
                break
        frame = frame.f_back
    if requested is None or resolved is None:
        return None
    return CheckpointArguments(requested.get("ckpt_path"), resolved.get("ckpt_path"), requested.get("weights_only"))


# The profiler action Lightning's training loop wraps around each ``next()`` on the training dataloader
# (``[_TrainingEpochLoop].train_dataloader_next`` in Lightning 2.6; the loop's class name is private).
TRAINING_FETCH_ACTION_SUFFIX = "].train_dataloader_next"


def time_training_batch_fetches(
    trainer: Any, on_fetch: Callable[[float], None], clock: Callable[[], float]
) -> Callable[[], None]:
    """Call ``on_fetch(seconds)`` after each batch the training loop takes from its dataloader; return an undo.

    The training loop reports exactly the fetch (and nothing else of the step) to ``trainer.profiler`` as a
    ``start``/``stop`` pair of that action; this wraps the two methods of the Trainer's profiler instance (whatever
    profiler it is, the default pass-through one included), which go on working as before.
    """
    profiler = trainer.profiler
    own = {name: vars(profiler)[name] for name in ("start", "stop") if name in vars(profiler)}
    start, stop = profiler.start, profiler.stop
    started: list[float] = []

    def timed_start(action_name: str) -> None:
        start(action_name)
        if action_name.endswith(TRAINING_FETCH_ACTION_SUFFIX):
            started.append(clock())

    def timed_stop(action_name: str) -> None:
        if action_name.endswith(TRAINING_FETCH_ACTION_SUFFIX) and started:
            on_fetch(clock() - started.pop())
        stop(action_name)

    profiler.start, profiler.stop = timed_start, timed_stop

    def undo() -> None:
        for name in ("start", "stop"):
            if name in own:
                setattr(profiler, name, own[name])
            else:
                vars(profiler).pop(name, None)

    return undo
