"""May a run resume from a checkpoint: the newest complete checkpoint of a run (``ckpt_path="last"``), whether one
fits the model, layout, batch size and learning rates of this run (checked before anything is built), and how a
resumed run goes on with its own ``last.ckpt``."""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_llama_fp8.checkpoint.info import (
    INFO_FILENAME,
    SHAPE_FIELDS,
    CheckpointError,
    CheckpointInfo,
    read_checkpoint_info,
)
from lightning_llama_fp8.parallel.optimizer_precision import (
    DEFAULT_OPTIMIZER_PRECISION_RECORD,
    state_description,
    state_key,
)

if TYPE_CHECKING:
    from lightning_llama_fp8.config import LlamaConfig

#: ``OptimizerSettings`` fields by which Megatron pairs saved optimizer groups with the current ones (their
#: ``max_lr``/``min_lr``); a change makes Megatron's load fail, so it is refused before anything is built.
PAIRED_OPTIMIZER_FIELDS: tuple[str, ...] = ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr")

#: ``OptimizerSettings`` fields that a resume would silently drop for the checkpoint's: Megatron's load takes each
#: saved parameter group whole (megatron-core 0.19.2: ``optimizer/distrib_optimizer.py`` lines 969-970 merge only
#: the current ``params`` into the saved group and lines 1046-1048 load that into Adam; ``optimizer/optimizer.py``
#: lines 646-649 do the same for the plain optimizer), so Adam's ``betas`` and ``eps`` stay the saved ones. (The
#: weight decay is set again after every step by the scheduler from this run's setting, ``optimizer_param_scheduler.py``
#: line 300: a change takes effect from the second resumed step on.)
RESTORED_OPTIMIZER_FIELDS: tuple[str, ...] = ("adam_beta1", "adam_beta2", "adam_eps")

#: ``LlamaConfig`` fields that change what the stored tensors mean without changing their shapes (with
#: ``zero_centered_gamma`` the norm weights are stored as ``gamma - 1``): loaded with another value, the weights
#: would load without an error and compute another function.
STORED_FORMAT_FIELDS: tuple[str, ...] = ("zero_centered_gamma",)


#: Lightning's SLURM auto-requeue saves ``hpc_ckpt_<n>.ckpt`` into the Trainer's ``default_root_dir``.
HPC_CHECKPOINT_PATTERN = "hpc_ckpt_*.ckpt"


def resolve_last_checkpoint(directories: list[Path], run_directories: Sequence[Path] = ()) -> Path | None:
    """The newest complete checkpoint (by global step) for ``ckpt_path="last"``; ``None`` if there is none at all.

    Looks at every ``*.ckpt`` in ``directories`` (the ModelCheckpoint ``dirpath``: its step checkpoints,
    ``last*.ckpt``, a PreemptionCheckpoint save) and at the ``hpc_ckpt_*.ckpt`` that Lightning's SLURM requeue signal
    saved into ``run_directories`` (the Trainer's ``default_root_dir``), whatever their names and modification times
    say: a checkpoint of a later step is newer. On the same step a ``last*`` name comes first: resumed through it,
    ModelCheckpoint's ``save_top_k`` rotation later deletes the step checkpoint it links to, which Lightning keeps
    forever when that was the path the run resumed from; then the newest modification time.

    Unlike Lightning's lookup (the newest ``last*.ckpt`` by modification time, a dangling link counting as none)
    this sees through what an interrupted save leaves: a ``last.ckpt`` link whose target was deleted before the
    link was renewed (``save_top_k`` with ``save_last="link"``), a ``.saving`` or ``.replaced`` directory.

    Raises:
        CheckpointError: there are checkpoints, but none is complete (the message lists each and what is wrong).
    """
    candidates: list[tuple[int, bool, float, Path]] = []
    problems: list[str] = []
    searched = [(directory, "*.ckpt") for directory in directories]
    searched += [(directory, HPC_CHECKPOINT_PATTERN) for directory in run_directories]
    seen: set[Path] = set()
    for directory, pattern in searched:
        if not directory.is_dir():
            continue
        for entry in sorted(directory.glob(pattern)):  # leaves out <name>.ckpt.saving / .replaced
            if entry.absolute() in seen:
                continue
            seen.add(entry.absolute())
            try:  # the step from the info file alone first: fully checking every checkpoint would read them all
                step = int(json.loads((entry / INFO_FILENAME).read_text())["global_step"])
                candidates.append((step, entry.name.startswith("last"), entry.resolve().stat().st_mtime, entry))
            except (OSError, ValueError, KeyError, TypeError):
                try:
                    read_checkpoint_info(entry)
                except CheckpointError as err:
                    problems.append(str(err))
        for entry in sorted(directory.glob(pattern + ".replaced")):
            problems.append(f"{entry} is the previous version of {entry.name[: -len('.replaced')]} set aside by a save")
    for *_, entry in sorted(candidates, key=lambda item: item[:3], reverse=True):  # newest first
        try:
            read_checkpoint_info(entry)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return entry
    if problems:
        where = [str(d) for d in directories] + [f"{d} ({HPC_CHECKPOINT_PATTERN})" for d in run_directories]
        raise CheckpointError(
            "ckpt_path='last': no complete checkpoint in "
            + ", ".join(where)
            + ". Found: "
            + " | ".join(problems)
            + ". Pass ckpt_path=<one of them> once repaired, or leave ckpt_path unset to start a new run."
        )
    return None


def recorded_checkpoint_directories(lightning_state: dict[str, Any]) -> set[Path]:
    """The ModelCheckpoint directories the run that saved ``lightning_state`` (a checkpoint's ``lightning.pt``)
    wrote into: the ``dirpath`` of its callbacks' saved states."""
    found = set()
    for state in (lightning_state.get("callbacks") or {}).values():
        dirpath = state.get("dirpath") if isinstance(state, dict) else None
        if isinstance(dirpath, str | os.PathLike) and "://" not in str(dirpath):
            found.add(Path(dirpath).absolute())
    return found


def resumes_into(checkpoint: Path, directory: Path, recorded: set[Path]) -> bool:
    """Whether resuming from ``checkpoint`` continues the run that saves into ``directory`` (a ModelCheckpoint
    dirpath): the checkpoint lies there (through a ``last.ckpt`` link too), or that run's ModelCheckpoint wrote
    there (``recorded``: :func:`recorded_checkpoint_directories`; e.g. an ``hpc_ckpt`` saved elsewhere)."""
    target = Path(os.path.realpath(directory))
    return (
        Path(os.path.realpath(checkpoint.absolute().parent)) == target
        or Path(os.path.realpath(checkpoint)).parent == target
        or any(Path(os.path.realpath(path)) == target for path in recorded)
    )


def renew_own_last_checkpoints(lightning_state: dict[str, Any], checkpoint_callbacks: Iterable[Any]) -> list[str]:
    """Let each ModelCheckpoint of a resumed run renew its own ``last.ckpt`` instead of starting ``last-v1.ckpt``.

    ModelCheckpoint renews the ``last`` checkpoint it remembers (``last_model_path``) and gives a new name
    (``last-v1.ckpt``) to a ``last.ckpt`` it does not remember, to keep another run's. The first checkpoint of a run
    remembers none (with ``save_last="link"`` the step checkpoint is written before the link; with ``save_last=True``
    the step checkpoint before the copy), so a run resumed from it left ``last.ckpt`` at the old step and went on
    in ``last-v1.ckpt``. Where the saved state names the callback's own directory (Lightning restores
    ``last_model_path`` only then: the same run), this sets the remembered name to the callback's ``last`` name in
    ``lightning_state`` (a checkpoint's ``lightning.pt`` contents, before Lightning restores them). ``last`` names with
    a template (``{step}-last``) are left alone: each save gets a new one. Returns the names set.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    saved = lightning_state.get("callbacks") or {}
    renewed = []
    for callback in checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.dirpath:
            continue
        state = saved.get(callback.state_key)
        if not isinstance(state, dict) or state.get("dirpath") != callback.dirpath:
            continue
        if "{" in callback.CHECKPOINT_NAME_LAST:
            continue
        state["last_model_path"] = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
        renewed.append(state["last_model_path"])
    return renewed


def _differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    names: Iterable[str],
    current_label: str,
    same: Callable[[Any, Any], bool] = operator.eq,
) -> list[str]:
    """``"name: checkpoint X, <current_label> Y"`` for each of ``names`` the checkpoint recorded and ``current``
    has otherwise (fields a checkpoint does not record, from older versions, are not compared)."""
    return [
        f"{name}: checkpoint {saved[name]!r}, {current_label} {current.get(name)!r}"
        for name in names
        if name in saved and not same(saved[name], current.get(name))
    ]


def check_can_resume(
    info: CheckpointInfo,
    arch: LlamaConfig | None,
    tensor_model_parallel_size: int,
    context_parallel_size: int,
    with_optimizer: bool,
    *,
    pipeline: tuple[int, int | None, int | None, int | None] = (1, None, None, None),
    global_batch_size: int | None = None,
    optimizer_settings: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Refuse, before the model is built, a checkpoint whose weights or optimizer state cannot load here.

    Weights reshard to any layout; ``dp_reshardable`` optimizer state only to another data-parallel size (the same
    TP, CP and pipeline split: ``pipeline`` is this run's (PP, virtual PP, first-stage layers, last-stage layers)).
    ``arch=None`` (a module without a :class:`LlamaConfig`) skips the architecture check; the architecture's shapes
    and how its weights are stored (``zero_centered_gamma``) must be the checkpoint's. The global batch size, the
    learning rates that Megatron pairs optimizer groups by and the Adam settings it restores from the saved groups
    (``optimizer_settings``, an ``OptimizerSettings`` as a dict) must be the checkpoint's; pass them when training
    resumes (``None``: not checked). Optimizer state
    (``with_optimizer``) must be there and fit the layout, and not go into Megatron-Core's local layer spec; its
    dtypes (``optimizer_state``, this run's ``OptimizerPrecisionSettings`` record; ``None``: not checked) must be
    this run's.
    """
    current = asdict(arch) if arch is not None else dict(info.arch)
    different = _differences(info.arch, current, SHAPE_FIELDS, "model")
    if different:
        raise CheckpointError(
            f"Checkpoint {info.path} holds another architecture than the model being trained ("
            + "; ".join(different)
            + "). Set model.arch to the checkpoint's (see its lightning_llama_fp8.json)."
        )
    reinterpreted = _differences(info.arch, current, [n for n in STORED_FORMAT_FIELDS if n in current], "model")
    if reinterpreted:
        raise CheckpointError(
            f"Checkpoint {info.path} stores its weights in another form than this model reads them ("
            + "; ".join(reinterpreted)
            + "): with zero_centered_gamma the norm weights are stored as gamma - 1, so every norm would be off by "
            "one and the model would compute another function. Set model.arch.zero_centered_gamma to the "
            "checkpoint's value; to change it, export the checkpoint (llama-fp8 convert) and start a new run from "
            "that (model.init_weights), which converts the norm weights."
        )
    saved_batch = info.data.get("global_batch_size")
    if global_batch_size is not None and saved_batch is not None and saved_batch != global_batch_size:
        raise CheckpointError(
            f"Checkpoint {info.path} was trained with global_batch_size {saved_batch}, this run has "
            f"{global_batch_size}: its data position ({info.global_step} global batches) would mean other samples "
            f"here. Resume with data.global_batch_size={saved_batch}."
        )
    saved_optimizer = info.optimizer_settings
    if optimizer_settings is not None and saved_optimizer:
        changed = _differences(saved_optimizer, optimizer_settings, PAIRED_OPTIMIZER_FIELDS, "this run", _same_number)
        if changed:
            raise CheckpointError(
                f"Checkpoint {info.path} was trained with other learning rates ("
                + "; ".join(changed)
                + "). Megatron pairs the saved optimizer state with this run's parameter groups by them, so they must "
                "stay the checkpoint's: set model.optimizer back to them (warmup, decay steps, weight decay and the "
                "schedule may change)."
            )
        restored = _differences(
            saved_optimizer, optimizer_settings, RESTORED_OPTIMIZER_FIELDS, "this run", _same_number
        )
        if restored:
            raise CheckpointError(
                f"Checkpoint {info.path} was trained with other Adam settings ("
                + "; ".join(restored)
                + "). Megatron restores the saved optimizer's parameter groups, Adam's betas and eps with them, so "
                "this run's values would be silently replaced by the checkpoint's: set model.optimizer back to the "
                "checkpoint's values, or start a new run from its weights (llama-fp8 convert, then "
                "model.init_weights) to train with other ones."
            )
    if not with_optimizer:
        return
    if info.optimizer_sharding is None:
        raise CheckpointError(
            f"Checkpoint {info.path} has no optimizer state, so training cannot resume from it. Load its weights "
            "with trainer.validate(ckpt_path=...), or start a new run."
        )
    if arch is not None and arch.transformer_impl == "local":
        # Found by an audit on GPUs: Megatron's distributed optimizer asserts on the empty state of the torch Adam it
        # falls back to without Transformer Engine (`assert len(steps) == 1`), and loading into the local spec's
        # fp32 norm weights fails with an in-place write to a leaf view.
        raise CheckpointError(
            f"Checkpoint {info.path}: training cannot resume with model.arch.transformer_impl 'local' (Megatron-Core's "
            "distributed optimizer cannot reload its state into the local layer spec). Resume with transformer_impl "
            "'transformer_engine' from a checkpoint saved with it; this checkpoint's weights still load for "
            "validation (llama-fp8 validate / trainer.validate(ckpt_path=...))."
        )
    saved = (info.tensor_model_parallel_size, info.context_parallel_size, *info.pipeline_split)
    here = (tensor_model_parallel_size, context_parallel_size, *pipeline)
    if info.optimizer_sharding == "dp_reshardable" and saved != here:
        raise CheckpointError(
            f"Checkpoint {info.path} was saved with {_describe_layout(saved)} and optimizer state sharded "
            "'dp_reshardable', which only reloads with the same TP, CP and pipeline split (any DP size); this run has "
            f"{_describe_layout(here)}. Resume with the checkpoint's layout, or save with "
            "MegatronCPStrategy(checkpoint_optimizer_sharding='fully_reshardable') to change the layout."
        )
    saved_state = info.optimizer_state or DEFAULT_OPTIMIZER_PRECISION_RECORD
    if optimizer_state is not None and state_key(saved_state) != state_key(optimizer_state):
        raise CheckpointError(
            f"Checkpoint {info.path} holds optimizer state as {state_description(saved_state)}; this run keeps it as "
            f"{state_description(optimizer_state)} (strategy.optimizer_precision). Megatron would load it into this "
            "run's dtypes, a conversion never shown to train here. Resume with the checkpoint's optimizer_precision"
            f" ({_setting_for(saved_state)}), or start a new run from its weights (llama-fp8 convert, then "
            "model.init_weights)."
        )


def _setting_for(record: dict[str, Any]) -> str:
    aware, exp_avg, exp_avg_sq, remainders = state_key(record)
    if not aware:
        return "null"
    remainders_flag = str(remainders).lower()
    return f"{{exp_avg_dtype: {exp_avg}, exp_avg_sq_dtype: {exp_avg_sq}, store_param_remainders: {remainders_flag}}}"


def _describe_layout(layout: tuple[Any, ...]) -> str:
    tp, cp, pp, vpp, first, last = layout
    text = f"TP={tp}, CP={cp}"
    if pp > 1:
        text += f", PP={pp}"
        text += f", virtual PP={vpp}" if vpp is not None else ""
        text += f", {first} layers in the first stage" if first is not None else ""
        text += f", {last} layers in the last stage" if last is not None else ""
    return text


def _same_number(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
