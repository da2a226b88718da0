"""What ``MegatronCPStrategy`` checks once the processes exist and before anything expensive is built.

Lightning builds the data, the model, Megatron's DDP and the optimizer before it reads a checkpoint, and writes
the first output only at the first save; whatever is wrong with either would otherwise surface after minutes (a
big model) or hours (the first save). Here, in ``setup_environment``:

- the checkpoint to load: ``weights_only=True`` is refused (Lightning drops that argument for strategies that
  restore after setup), ``ckpt_path="last"`` must be the newest complete checkpoint (Lightning treats a dangling
  ``last.ckpt`` link as "no checkpoint" and would start a new run), and the checkpoint must be complete, intact and
  fit this run: architecture, layout, global batch size, learning rates, a readable ``lightning.pt``;
- every directory the run will write into (:mod:`.outputs`), on the ranks that write there.

A failure on any rank is raised on every rank, so none waits for the others at the next collective.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_llama_fp8._compat import lightning as compat
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import resume, state_io
from lightning_llama_fp8.checkpoint.outputs import (
    UnwritableOutputError,
    checkpoint_bytes_estimate,
    free_bytes,
    output_locations,
    unwritable_reason,
)
from lightning_llama_fp8.parallel.optimizer_precision import AUTO, state_record
from lightning_llama_fp8.validate import format_bytes

__all__ = [
    "check_before_building",
    "check_output_locations",
    "checkpoint_to_load",
    "resume_records",
    "resume_settings",
]


def check_before_building(strategy: Any) -> tuple[Path, dict[str, Any]] | None:
    """Everything in the module docstring, on every rank of ``strategy`` (a ``MegatronCPStrategy`` whose process
    groups exist). Returns the checkpoint's path and its ``lightning.pt`` contents, read here to find a damaged one
    early, for the strategy's load to reuse; ``None`` when nothing is loaded (or outside a Trainer method)."""
    if not compat.has_trainer(strategy):
        return None
    module = strategy.lightning_module
    trainer = module.trainer
    error: Exception | None = None
    early: tuple[Path, dict[str, Any]] | None = None
    try:
        path = checkpoint_to_load(trainer)
        if path is not None:
            # Only a module with an architecture (LlamaLightningModule) is known to bring Megatron's optimizer.
            fitting = trainer.state.fn == TrainerFn.FITTING
            resuming = fitting and getattr(module, "arch", None) is not None
            settings = resume_settings(module, trainer.datamodule) if fitting else {}
            info = strategy.check_checkpoint(path, with_optimizer=resuming, **settings)
            if resuming:  # optimizer_precision "auto" keeps the checkpoint's optimizer state
                strategy.adopt_resumed_optimizer_state(str(path), info.optimizer_state)
            early = (path, state_io.load_lightning_state(path))
    except ckpt.CheckpointError as err:
        error = err
    failure = strategy.first_failure(str(error) if error is not None else None)
    if error is not None:
        raise error
    if failure is not None:
        raise ckpt.CheckpointError(failure)
    check_output_locations(trainer, strategy.is_global_zero, strategy.first_failure)
    return early


def own_checkpoint_directories(
    checkpoint: Path, checkpoint_callbacks: list[Any], lightning_state: dict[str, Any] | None = None
) -> list[str]:
    """The ModelCheckpoint directories (as Lightning names them) that a run resumed from ``checkpoint`` continues to
    write into (``resume.resumes_into``); empty for a checkpoint that is not this package's. ``lightning_state``:
    the checkpoint's ``lightning.pt`` contents where already read."""
    directories = [cb.dirpath for cb in checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if not directories or not (checkpoint / ckpt.LIGHTNING_FILENAME).is_file():
        return []
    recorded: set[Path] = set()
    if not all(resume.resumes_into(checkpoint, Path(d), recorded) for d in directories):
        try:  # an hpc_ckpt (default_root_dir) or a checkpoint copied elsewhere: which directory did its run write to?
            state = lightning_state if lightning_state is not None else state_io.load_lightning_state(checkpoint)
            recorded = resume.recorded_checkpoint_directories(state)
        except ckpt.CheckpointError:
            return []
    return [str(d) for d in directories if resume.resumes_into(checkpoint, Path(d), recorded)]


def checkpoint_to_load(trainer: Any) -> Path | None:
    """The checkpoint the running ``trainer`` method will load (``None``: none), after refusing what cannot work.

    Raises:
        CheckpointError: ``weights_only=True``; ``ckpt_path="last"`` where Lightning picked something other than
            the newest complete checkpoint (or nothing, while one exists), or no complete one exists.
    """
    arguments = compat.checkpoint_arguments(trainer)
    if arguments is None:  # not inside trainer.fit/validate/...: nothing will be loaded by Lightning
        return None
    if arguments.weights_only and arguments.resolved is not None:
        raise ckpt.CheckpointError(
            f"Cannot load {arguments.resolved} with weights_only=True: MegatronCPStrategy checkpoints hold pickled "
            "data (torch.distributed.checkpoint's index, Transformer Engine's FP8 state, Lightning's state), which "
            "weights_only loading refuses. Load only checkpoints you trust, without weights_only=True."
        )
    if arguments.requested == "last" and trainer.state.fn == TrainerFn.FITTING:
        _check_last_is_newest(trainer, arguments.resolved)
    return None if arguments.resolved is None else Path(arguments.resolved)


def _check_last_is_newest(trainer: Any, chosen: Any) -> None:
    directories = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    # Raises when checkpoints exist but none is complete; Lightning's SLURM requeue saves (hpc_ckpt_*) count too.
    newest = resume.resolve_last_checkpoint(directories, run_directories=[Path(trainer.default_root_dir)])
    if newest is None:
        return
    newest_step = ckpt.read_checkpoint_info(newest).global_step
    chosen_step: int | None = None
    if chosen is not None:
        try:
            chosen_step = ckpt.read_checkpoint_info(chosen).global_step
        except ckpt.CheckpointError:
            chosen_step = None
    if chosen_step == newest_step:
        return
    links = [link for directory in directories if directory.is_dir() for link in directory.glob("last*.ckpt")]
    dangling = [str(link) for link in links if link.is_symlink() and not link.exists()]
    why = f" ({', '.join(dangling)}: a link whose target is gone, left by an interrupted save)" if dangling else ""
    picked = f"{chosen}, which is not a complete checkpoint or is older" if chosen is not None else "nothing"
    raise ckpt.CheckpointError(
        f"ckpt_path='last': Lightning found {picked}{why}, and would "
        + ("start a new run" if chosen is None else "resume from it")
        + f", but the newest complete checkpoint is {newest} (step {newest_step}). Pass ckpt_path='{newest}'."
    )


def resume_settings(module: Any, datamodule: Any) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, as far as this module and data module say.

    Keyword arguments of :func:`~lightning_llama_fp8.checkpoint.resume.check_can_resume`: ``global_batch_size`` (a
    ``GPTDataModule``'s) and ``optimizer_settings`` (``LlamaLightningModule.optim`` as a dict); ``None`` where the
    module or data module has no such thing.
    """
    optim = getattr(module, "optim", None)
    batch = getattr(datamodule, "global_batch_size", None)
    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    auto = getattr(strategy, "optimizer_precision", None) == AUTO  # it keeps the checkpoint's: nothing to compare
    return {
        "global_batch_size": batch if isinstance(batch, int) else None,
        "optimizer_settings": dataclasses.asdict(optim) if dataclasses.is_dataclass(optim) else None,
        "optimizer_state": None if auto else optimizer_state_record(strategy),
    }


def optimizer_state_record(strategy: Any) -> dict[str, Any]:
    """The dtypes of the optimizer state ``strategy`` (a ``MegatronCPStrategy``) keeps, as checkpoints record them."""
    return state_record(getattr(strategy, "optimizer_precision_in_use", None))


def resume_records(module: Any) -> dict[str, Any]:
    """What a checkpoint's info JSON records for :func:`resume_settings` to compare at the next start:
    ``CheckpointInfo`` fields ``data`` (``GPTDataModule.checkpoint_info()``) and ``optimizer_settings``."""
    trainer = getattr(module, "_trainer", None)
    data_info = getattr(getattr(trainer, "datamodule", None), "checkpoint_info", None)
    settings = resume_settings(module, None)
    return {
        "data": dict(data_info()) if callable(data_info) else {},
        "optimizer_settings": settings["optimizer_settings"] or {},
        "optimizer_state": optimizer_state_record(getattr(trainer, "strategy", None)),
    }


def _warn_if_short_of_space(directory: Path, arch: Any) -> None:
    """Warn when the file system of a checkpoint directory has less free space than one checkpoint of ``arch``
    needs (an estimate: weights, fp32 main weights, Adam moments), instead of failing at the first save."""
    if arch is None:
        return
    needed, free = checkpoint_bytes_estimate(arch), free_bytes(directory)
    if free is not None and free < needed:
        rank_zero_warn(
            f"Checkpoints into {directory}: one takes about {format_bytes(needed)} (weights and optimizer state), "
            f"its file system has {format_bytes(free)} free. The first save would fail there; free space or move "
            "ModelCheckpoint(dirpath=...)."
        )


def check_output_locations(trainer: Any, is_global_zero: bool, agree: Any) -> None:
    """Try every directory the run writes into on the ranks that write there; raise on all ranks if one fails.

    ``agree(text_or_none)`` is the strategy's collective returning the first rank's failure (or None).
    """
    failure = None
    if trainer.state.fn == TrainerFn.FITTING:
        for location in output_locations(trainer):
            if not (location.every_rank or is_global_zero):
                continue
            if is_global_zero and location.what.startswith("ModelCheckpoint"):
                _warn_if_short_of_space(location.path, getattr(trainer.lightning_module, "arch", None))
            reason = unwritable_reason(location.path)
            if reason is not None:
                failure = (
                    f"{location.what} {location.path} cannot be written ({reason}). The run would fail there at "
                    "its first write, after the steps before it were trained; fix the path or its permissions."
                )
                break
    failure = agree(failure)
    if failure is not None:
        raise UnwritableOutputError(failure)
