"""May a run resume from a checkpoint: the newest complete checkpoint of a run (``ckpt_path="last"``), and whether
one fits the model, layout, batch size and learning rates of this run, checked before anything is built."""

from __future__ import annotations

import json
import math
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

if TYPE_CHECKING:
    from lightning_llama_fp8.config import LlamaConfig

#: ``OptimizerSettings`` fields by which Megatron pairs saved optimizer groups with the current ones (their
#: ``max_lr``/``min_lr``); a change makes Megatron's load fail, so it is refused before anything is built.
PAIRED_OPTIMIZER_FIELDS: tuple[str, ...] = ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr")


def resolve_last_checkpoint(directories: list[Path]) -> Path | None:
    """The newest complete checkpoint in ``directories`` (by global step, then modification time), for
    ``ckpt_path="last"``; ``None`` if the directories hold no checkpoint at all.

    Unlike Lightning's lookup (the newest ``last*.ckpt`` by modification time, a dangling link counting as none)
    this sees through what an interrupted save leaves: a ``last.ckpt`` link whose target was deleted before the
    link was renewed (``save_top_k`` with ``save_last="link"``), a ``.saving`` or ``.replaced`` directory.

    Raises:
        CheckpointError: there are checkpoints, but none is complete (the message lists each and what is wrong).
    """
    candidates: list[tuple[int, float, Path]] = []
    problems: list[str] = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            if not entry.name.endswith(".ckpt"):  # leaves out <name>.ckpt.saving / .replaced
                continue
            try:  # the step from the info file alone first: fully checking every checkpoint would read them all
                step = int(json.loads((entry / INFO_FILENAME).read_text())["global_step"])
                candidates.append((step, entry.resolve().stat().st_mtime, entry))
            except (OSError, ValueError, KeyError, TypeError):
                try:
                    read_checkpoint_info(entry)
                except CheckpointError as err:
                    problems.append(str(err))
        for entry in sorted(directory.glob("*.ckpt.replaced")):
            problems.append(f"{entry} is the previous version of {entry.name[: -len('.replaced')]} set aside by a save")
    for _, _, entry in sorted(candidates, key=lambda item: item[:2], reverse=True):  # newest first
        try:
            read_checkpoint_info(entry)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return entry
    if problems:
        raise CheckpointError(
            "ckpt_path='last': no complete checkpoint in "
            + ", ".join(str(d) for d in directories)
            + ". Found: "
            + " | ".join(problems)
            + ". Pass ckpt_path=<one of them> once repaired, or leave ckpt_path unset to start a new run."
        )
    return None


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
) -> None:
    """Refuse, before the model is built, a checkpoint whose weights or optimizer state cannot load here.

    Weights reshard to any layout; ``dp_reshardable`` optimizer state only to another data-parallel size (the same
    TP, CP and pipeline split: ``pipeline`` is this run's (PP, virtual PP, first-stage layers, last-stage layers)).
    ``arch=None`` (a module without a :class:`LlamaConfig`) skips the architecture check. The global batch size
    and the learning rates that Megatron pairs optimizer groups by (``optimizer_settings``, an ``OptimizerSettings``
    as a dict) must be the checkpoint's; pass them when training resumes (``None``: not checked). Optimizer state
    (``with_optimizer``) must be there and fit the layout, and not go into Megatron-Core's local layer spec.
    """
    current = asdict(arch) if arch is not None else dict(info.arch)
    different = [
        f"{name}: checkpoint {info.arch[name]!r}, model {current[name]!r}"
        for name in SHAPE_FIELDS
        if name in info.arch and info.arch[name] != current.get(name)
    ]
    if different:
        raise CheckpointError(
            f"Checkpoint {info.path} holds another architecture than the model being trained ("
            + "; ".join(different)
            + "). Set model.arch to the checkpoint's (see its lightning_llama_fp8.json)."
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
        changed = [
            f"{name}: checkpoint {saved_optimizer[name]!r}, this run {optimizer_settings.get(name)!r}"
            for name in PAIRED_OPTIMIZER_FIELDS
            if name in saved_optimizer and not _same_number(saved_optimizer[name], optimizer_settings.get(name))
        ]
        if changed:
            raise CheckpointError(
                f"Checkpoint {info.path} was trained with other learning rates ("
                + "; ".join(changed)
                + "). Megatron pairs the saved optimizer state with this run's parameter groups by them, so they must "
                "stay the checkpoint's: set model.optimizer back to them (warmup, decay steps, weight decay and the "
                "schedule may change)."
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
