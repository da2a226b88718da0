"""Distributed checkpoints: Megatron-Core's ``dist_checkpointing`` (``torch_dist``) format under Lightning.

A checkpoint is a directory, written by every rank at once:

- the Megatron model and the distributed optimizer as Megatron's sharded state dicts (keys ``model`` and
  ``optimizer``, as Megatron-LM names them), in Megatron-Core's ``torch_dist`` format (``*.distcp`` shards,
  ``.metadata``, ``metadata.json``); the model part reshards to any TP/CP/DP layout on load, the optimizer part
  to any DP size (``dp_reshardable``, Megatron-LM's default) or to any layout (``fully_reshardable``);
- ``lightning.pt``: the rest of Lightning's checkpoint (loops, callbacks, LR scheduler, hyper-parameters, data
  position, and any parameters of the LightningModule outside the Megatron model), written by rank 0;
- ``lightning_llama_fp8.json``: what wrote it (architecture, layout, step), readable without torch, written last.

Saving writes into ``<path>.saving`` and only then replaces ``<path>``, so an interrupted save never damages a
checkpoint saved earlier under the same name (``last.ckpt``). :func:`read_checkpoint_info` checks a directory
cheaply (no tensor is read) before anything expensive happens: that it exists, is complete, that every shard file
its index names is there and long enough, that every file is the one the save wrote (sizes and sampled digests
recorded in ``lightning_llama_fp8.json``), that the weight shapes in the shard index are those of the architecture
the JSON names, and :func:`check_can_resume` that it fits the model, layout, batch size and learning rates.
:func:`resolve_last_checkpoint` finds the newest complete checkpoint of a directory (``ckpt_path="last"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from lightning_llama_fp8.config import LlamaConfig

__all__ = [
    "INFO_FILENAME",
    "LIGHTNING_FILENAME",
    "CheckpointError",
    "CheckpointInfo",
    "OptimizerSharding",
    "check_can_resume",
    "read_checkpoint_info",
    "resolve_last_checkpoint",
    "save_directory_atomically",
]

FORMAT = "lightning_llama_fp8/megatron-torch_dist/1"
INFO_FILENAME = "lightning_llama_fp8.json"
LIGHTNING_FILENAME = "lightning.pt"
MEGATRON_METADATA_FILENAME = "metadata.json"  # written last by dist_checkpointing.save
TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"

OptimizerSharding = Literal["dp_reshardable", "fully_reshardable"]

#: Architecture fields that decide the shape of some weight; a checkpoint only loads into a model that agrees.
SHAPE_FIELDS: tuple[str, ...] = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "tie_embeddings",
)

#: ``OptimizerSettings`` fields by which Megatron pairs saved optimizer groups with the current ones (their
#: ``max_lr``/``min_lr``); a change makes Megatron's load fail, so it is refused before anything is built.
PAIRED_OPTIMIZER_FIELDS: tuple[str, ...] = ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr")

#: Files up to this size are digested whole; larger ones (shards) by :data:`DIGEST_BLOCKS` blocks spread over them.
DIGEST_WHOLE_FILE_BYTES = 8 * 2**20
DIGEST_BLOCKS, DIGEST_BLOCK_BYTES = 16, 256 * 2**10


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``lightning_llama_fp8.json`` says about a checkpoint directory."""

    path: Path
    global_step: int
    tensor_model_parallel_size: int
    context_parallel_size: int
    world_size: int
    arch: dict[str, Any] = field(default_factory=dict)
    #: The pipeline split: (PP, virtual PP, layers of the first stage, of the last stage); None: not split there.
    #: Checkpoints written before pipeline parallelism existed have none: (1, None, None, None).
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    #: How the optimizer state is sharded; ``None``: the checkpoint has no optimizer state.
    optimizer_sharding: str | None = None
    #: What the data module needs to continue the same samples (``GPTDataModule.checkpoint_info()``: the global
    #: batch size and the training sample index the run was built with); empty for other data modules.
    data: dict[str, Any] = field(default_factory=dict)
    #: The module's optimizer settings (``LlamaLightningModule.optim``), to refuse changed learning rates early.
    optimizer_settings: dict[str, Any] = field(default_factory=dict)
    #: Every other file of the checkpoint: ``{name: {"size": bytes, "digest": hex}}`` (see :func:`file_digest`).
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pipeline_split(self) -> tuple[int, int | None, int | None, int | None]:
        """(PP, virtual PP, first-stage layers, last-stage layers) the checkpoint was saved with."""
        from lightning_llama_fp8.parallel.layout import PIPELINE_FIELDS

        return tuple(getattr(self, name) for name in PIPELINE_FIELDS)  # type: ignore[return-value]

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = None  # a checkpoint may be moved; the path is where it is read from
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True)


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Check that ``path`` is a complete checkpoint of this package and return what it holds; reads no tensor.

    Raises:
        CheckpointError: with the reason and a fix, if the path is missing, a file, incomplete (an interrupted
            save), written by something else, or if a shard file is missing or shorter than its index says.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"Checkpoint {path} is a link to {os.readlink(path)}, which does not exist (deleted or moved?)."
        )
    if not path.exists():
        replaced = path.with_name(path.name + ".replaced")
        saving = path.with_name(path.name + ".saving")
        hint = ""
        if replaced.is_dir():
            hint = (
                f" A save that was replacing it stopped half-way: the previous version is intact at {replaced}; "
                f"rename it back to {path.name}."
            )
        elif saving.exists():
            hint = f" An unfinished save of it is at {saving} (interrupted; not usable)."
        raise CheckpointError(f"Checkpoint {path} does not exist.{hint} Check the path (ckpt_path).")
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a file, but MegatronCPStrategy checkpoints are directories (Megatron distributed "
            "checkpoints, one shard per rank). A single-file Lightning checkpoint cannot restore Megatron's "
            "distributed optimizer; resume from a checkpoint that MegatronCPStrategy saved."
        )
    info_file = path / INFO_FILENAME
    if not info_file.is_file():
        if (path / MEGATRON_METADATA_FILENAME).is_file():
            why = "it has Megatron's metadata.json but no lightning_llama_fp8.json: not written by this package"
        else:
            why = "its save did not finish (no metadata) or it is not a checkpoint at all"
        raise CheckpointError(
            f"Checkpoint {path} is not a complete lightning_llama_fp8 checkpoint: {why}. Resume from another one."
        )
    try:
        data = json.loads(info_file.read_text())
        if data.pop("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        data.pop("path", None)
        info = CheckpointInfo(path=path, **data)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"Checkpoint {path}: {INFO_FILENAME} is unreadable ({err}); it is damaged.") from err
    for required in (MEGATRON_METADATA_FILENAME, LIGHTNING_FILENAME):
        if not (path / required).is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {required} is missing. Resume from another one.")
    _check_recorded_files(path, info.files)
    metadata = _check_shard_files(path)
    _check_shapes_match_arch(path, metadata, info)
    return info


def file_digest(path: Path) -> str:
    """A cheap fingerprint of a file: BLAKE2b of its size and contents, whole up to 8 MiB, else of 16 blocks of
    256 KiB spread evenly over it (first and last included).

    Reading 4 MiB per shard keeps the check at load time to a fraction of a second per file, and it finds the
    damage that happens to whole files (overwritten with other or zero bytes of the same size, a copy of another
    checkpoint's file, a half-copied file); a flipped byte between the sampled blocks goes unnoticed.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        if size <= DIGEST_WHOLE_FILE_BYTES:
            digest.update(fh.read())
        else:
            last = size - DIGEST_BLOCK_BYTES
            for index in range(DIGEST_BLOCKS):
                fh.seek(last * index // (DIGEST_BLOCKS - 1))
                digest.update(fh.read(DIGEST_BLOCK_BYTES))
    return digest.hexdigest()


def record_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and :func:`file_digest` of every file in ``directory`` but the info file (what the info JSON records)."""
    return {
        entry.name: {"size": entry.stat().st_size, "digest": file_digest(entry)}
        for entry in sorted(directory.iterdir())
        if entry.is_file() and entry.name != INFO_FILENAME
    }


def _check_recorded_files(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Each file the save recorded is there, with its size and digest (checkpoints written before this: skipped)."""
    for name, recorded in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {name} is missing. Resume from another checkpoint.")
        size = file.stat().st_size
        if size != recorded["size"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {name} has {size} bytes, the save wrote {recorded['size']}. Resume "
                "from another checkpoint."
            )
        if file_digest(file) != recorded["digest"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {name} is not the file the save wrote (same size, other contents: "
                f"overwritten, or copied from another checkpoint?). Resume from another checkpoint."
            )


def _check_shard_files(path: Path) -> Any:
    """Every byte range that torch.distributed.checkpoint's index points at must exist (cheap: no data read).

    Returns the index (torch.distributed.checkpoint ``Metadata``).
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata raises whatever unpickling raises
        raise CheckpointError(
            f"Checkpoint {path} is damaged: its shard index (.metadata) cannot be read ({type(err).__name__}: "
            f"{err}). Resume from another checkpoint."
        ) from err
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: shard {name} is missing. Resume from another one.")
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: shard {name} has {shard.stat().st_size} bytes, its index needs "
                f"{size} (truncated copy?). Resume from another checkpoint."
            )
    return metadata


def expected_weight_shapes(arch: dict[str, Any], tensor_model_parallel_size: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of the main weights of a Megatron GPTModel of ``arch`` (a ``LlamaConfig`` as a dict), as its
    sharded state dict names them (the transformer layers stacked on a leading layer axis)."""
    from lightning_llama_fp8.config import LlamaConfig

    config = LlamaConfig(**arch)
    layers, hidden, ffn = config.num_layers, config.hidden_size, config.ffn_hidden_size
    vocab = config.padded_vocab_size(tensor_model_parallel_size)
    query = config.num_attention_heads * config.kv_channels
    qkv = query + 2 * config.num_query_groups * config.kv_channels
    shapes = {
        "embedding.word_embeddings.weight": (vocab, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, query),
        "decoder.layers.mlp.linear_fc1.weight": (layers, 2 * ffn, hidden),  # SwiGLU: gate and up projections
        "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, ffn),
    }
    if not config.tie_embeddings:
        shapes["output_layer.weight"] = (vocab, hidden)
    return shapes


def _check_shapes_match_arch(path: Path, metadata: Any, info: CheckpointInfo) -> None:
    """The shard index's weight shapes must be those of the architecture the info JSON names, or the architecture
    check before building means nothing (a JSON copied from or edited to another model would pass it)."""
    if not info.arch:
        return
    try:
        expected = expected_weight_shapes(info.arch, info.tensor_model_parallel_size)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {path}: the architecture in {INFO_FILENAME} is invalid ({err}).") from err
    saved = metadata.state_dict_metadata
    different = [
        f"{key} {tuple(saved[key].size)} (the JSON's architecture gives {shape})"
        for key, shape in expected.items()
        if key in saved and getattr(saved[key], "size", None) is not None and tuple(saved[key].size) != shape
    ]
    if different:
        raise CheckpointError(
            f"Checkpoint {path}: its shards do not hold the architecture its {INFO_FILENAME} names: "
            + "; ".join(different)
            + f". The {INFO_FILENAME} was edited or copied from another checkpoint; resume from another checkpoint."
        )


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


def save_directory_atomically(path: Path, write: Any, is_rank_zero: bool, agree: Any) -> None:
    """Run ``write(tmp_dir)`` on every rank, then make ``tmp_dir`` appear at ``path`` in one rename.

    A checkpoint already at ``path`` (``last.ckpt`` saved again) is moved aside to ``<path>.replaced`` only once
    the new one is complete, and deleted only once the new one is in place; an interrupted save leaves
    ``<path>.saving`` behind and the old checkpoint untouched. If a save stopped between the two renames, the
    next save first moves the previous version back. ``agree(text_or_none)`` is a collective over all ranks that
    returns the first rank's failure text (or None): after each phase every rank learns whether any rank failed,
    and all raise together instead of some waiting for the others at the next collective. (A failure inside one of
    Megatron's own collectives during ``write`` that hits rank 0 alone still ends only at the process-group
    timeout; the write probe in the first phase catches the common cause, a file system rank 0 cannot write.)
    """
    tmp = saving_directory(path)
    run_and_agree((lambda: prepare_saving_directory(path)) if is_rank_zero else None, agree)

    def write_or_explain() -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            write(tmp)
        except (Exception, CheckpointException) as err:  # torch's writer says "unexpected pos" for a full disk
            raise CheckpointError(write_failure_message(path, f"{type(err).__name__}: {err}")) from err

    run_and_agree(write_or_explain, agree)
    run_and_agree((lambda: publish_saving_directory(path)) if is_rank_zero else None, agree)


def write_failure_message(path: Path, failure: str) -> str:
    """What a failed write of checkpoint ``path`` tells the user: the cause, what is intact, the free space."""
    from lightning_llama_fp8.checkpoint.outputs import free_bytes

    free = free_bytes(path.parent)
    space = f"{free / 2**30:.1f} GiB free there now" if free is not None else "free space unknown"
    return (
        f"Writing checkpoint {path} failed: {failure[:600]}. Nothing was replaced: the checkpoint that was at this "
        f"name (if any) and every other one are as they were; the unfinished files are in {saving_directory(path)}. "
        f"A full disk is the usual cause ({space}; a checkpoint with its optimizer state takes about 14 bytes per "
        "parameter): free space or save elsewhere (ModelCheckpoint(dirpath=...)), check permissions, then resume from "
        "the newest complete checkpoint (ckpt_path='last')."
    )


def saving_directory(path: Path) -> Path:
    """Where a save of ``path`` writes until it is complete (``<path>.saving``)."""
    return path.with_name(path.name + ".saving")


def prepare_saving_directory(path: Path) -> Path:
    """First phase of a save of ``path`` (rank 0): an empty, writable ``<path>.saving``; returns it.

    If an earlier save stopped between the two renames of :func:`publish_saving_directory`, the previous version
    goes back to ``path`` first; leftovers of an interrupted save are removed.
    """
    tmp, old = saving_directory(path), path.with_name(path.name + ".replaced")
    if old.is_dir() and not path.exists() and not path.is_symlink():
        old.rename(path)  # the previous version of an interrupted replacement comes back first
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    probe = tmp / ".write_probe"  # a read-only or full file system fails here, before Megatron's collectives
    probe.write_bytes(b"\0" * 4096)
    probe.unlink()
    return tmp


def publish_saving_directory(path: Path) -> None:
    """Last phase of a save of ``path`` (rank 0): the complete ``<path>.saving`` replaces ``path``.

    A checkpoint already at ``path`` is moved aside to ``<path>.replaced`` and deleted only once the new one is in
    place, so a kill between the renames loses neither.
    """
    tmp, old = saving_directory(path), path.with_name(path.name + ".replaced")
    if path.is_dir() and not path.is_symlink():
        path.rename(old)
    elif path.exists() or path.is_symlink():
        path.unlink()
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def run_and_agree(step: Any, agree: Any) -> None:
    """Run ``step`` (``None``: nothing on this rank), then raise on every rank if it failed on any."""
    error = None
    if step is not None:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            step()
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            error = err
    failure = agree(f"{type(error).__name__}: {error}" if error is not None else None)
    if error is not None:
        raise error
    if failure is not None:
        raise CheckpointError(f"Saving the checkpoint failed on another rank ({failure}); nothing was replaced.")


def remove_checkpoint_directory(path: Path) -> None:
    """Delete a checkpoint directory (or a file/link of that name) and any unfinished save or set-aside copy."""
    for target in (path, path.with_name(path.name + ".saving"), path.with_name(path.name + ".replaced")):
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def load_lightning_state(path: Path) -> dict[str, Any]:
    """Lightning's part of a checkpoint (unpickled in full: it holds hyper-parameter dataclasses and callback state)."""
    try:
        return torch.load(path / LIGHTNING_FILENAME, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint {path}: {LIGHTNING_FILENAME} cannot be read ({type(err).__name__}: {err}). If the file is "
            "damaged, resume from another checkpoint; if a class it names cannot be imported, install what wrote it."
        ) from err


# ---------------------------------------------------------------------- Megatron's sharded state
def _sharded_metadata(sharding: str, dp_cp_group: Any) -> dict[str, Any]:
    """The ``metadata`` Megatron's ``sharded_state_dict`` methods take (the keys Megatron-LM passes)."""
    return {
        "distrib_optim_sharding_type": sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": dp_cp_group,
    }


def _megatron_sharded_state_dict(
    modules: dict[str, torch.nn.Module], optimizer: Any, metadata: dict[str, Any], loading: bool
) -> dict[str, Any]:
    state = {name: module.sharded_state_dict(metadata=metadata) for name, module in modules.items()}
    if optimizer is not None:
        # The optimizer's entries are keyed by the model's, so it is built from (and saved with) the model dict.
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
    return state


def save_megatron_state(
    directory: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: Any,
    sharding: str,
    dp_cp_group: Any,
    *,
    in_background: bool = False,
) -> Any:
    """Write ``modules`` (unwrapped Megatron models, by key) and ``optimizer`` into ``directory``; all ranks call.

    ``sharding`` is the distributed optimizer's ``distrib_optim_sharding_type``; it is stored as the checkpoint's
    content metadata, from which :func:`load_megatron_state` takes it back. ``in_background=True`` only plans the
    write and returns Megatron's ``AsyncRequest`` for it (see ``async_checkpoint.py``); otherwise returns ``None``
    once the files are written.
    """
    from megatron.core import dist_checkpointing

    metadata = _sharded_metadata(sharding, dp_cp_group)
    state = _megatron_sharded_state_dict(modules, optimizer, metadata, loading=False)
    content = {key: value for key, value in metadata.items() if key != "dp_cp_group"}  # a group is not data
    if not in_background:
        return dist_checkpointing.save(state, str(directory), content_metadata=content)
    # megatron-core's own background writer ("mcore"): its default, "nvrx", needs nvidia-resiliency-ext.
    return dist_checkpointing.save(
        state, str(directory), content_metadata=content, async_sharded_save=True, async_strategy="mcore"
    )


def host_copy_sizes(
    modules: dict[str, torch.nn.Module], optimizer: Any, sharding: str, dp_cp_group: Any, device_type: str = "cuda"
) -> list[int]:
    """The bytes of each tensor this rank copies to host memory in a background save of ``modules`` / ``optimizer``.

    The same sharded state dict :func:`save_megatron_state` writes, after the preprocessing Megatron's save applies
    (factories that split fused weights, non-persistent entries dropped), without its collective checks (building a
    ``fully_reshardable`` optimizer state gathers it: pass ``optimizer=None`` there); only the
    tensors on ``device_type`` that this rank writes (the main replica: Megatron's torch_dist writer drops the
    others). FP8 weights count at their nominal dtype (BF16): the writer dequantizes them before the copy.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    state = _megatron_sharded_state_dict(modules, optimizer, _sharded_metadata(sharding, dp_cp_group), loading=False)
    sharded, _ = save_preprocess(state, validate_access_integrity=False)
    sizes = []
    for item in nested_values(sharded):
        if not isinstance(item, ShardedTensor) or not is_main_replica(item.replica_id):
            continue
        data = item.data
        if isinstance(data, torch.Tensor) and data.device.type == device_type:
            sizes.append(data.numel() * data.dtype.itemsize)
    return sizes


def load_megatron_state(directory: Path, modules: dict[str, torch.nn.Module], optimizer: Any, dp_cp_group: Any) -> None:
    """Load what :func:`save_megatron_state` wrote into ``modules`` (any layout) and ``optimizer``; all ranks call.

    Like every torch checkpoint this unpickles data (torch.distributed.checkpoint's index and objects, Transformer
    Engine's delayed-scaling FP8 state): load only checkpoints you trust.
    """
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(str(directory)) or {}
    metadata = {**_sharded_metadata("dp_reshardable", dp_cp_group), **content, "dp_cp_group": dp_cp_group}
    template = _megatron_sharded_state_dict(modules, optimizer, metadata, loading=optimizer is not None)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(template, str(directory))
    # torch.distributed.checkpoint / Megatron raise many kinds (CheckpointException is a BaseException): name the path
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"Checkpoint {directory}: reading its shards failed ({type(err).__name__}: {err}). Its files are damaged "
            "or do not belong together, or it holds another model than this one; resume from another checkpoint."
        ) from err
    with _te_extra_state_pickles_allowed():
        for name, module in modules.items():
            module.load_state_dict(loaded[name])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (KeyError, ValueError) as err:  # Megatron pairs saved and current parameter groups by their settings
            raise CheckpointError(
                f"Checkpoint {directory}: its optimizer state does not fit this run's parameter groups ({err!r}). "
                "Megatron pairs them by learning rate, min_lr, decoupled_lr and weight decay: resume with the "
                "optimizer settings the checkpoint was trained with (its lightning.pt holds them as hyper-parameters)."
            ) from err
        _requantize_fp8_weights_from_main_params(optimizer, modules)


def _requantize_fp8_weights_from_main_params(optimizer: Any, modules: dict[str, torch.nn.Module]) -> None:
    """Rebuild FP8 weights (``fp8_param_gather``) from the fp32 main weights, as every optimizer step does.

    An FP8 weight is checkpointed dequantized (FP8 value x a non-power-of-two scale, rounded to BF16), and loading
    quantizes that again: near a rounding boundary it lands on the neighbouring FP8 value. Training itself always
    quantizes from the fp32 main weights, which the optimizer state holds exactly, so do that (Megatron's own
    end-of-step copy) and all-gather the result. Found on one H200: without it the first resumed step's loss was
    6e-4 off the uninterrupted run's.
    """
    if not any(_is_quantized(param) for module in modules.values() for param in module.parameters()):
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part._copy_main_params_to_model_params()  # Megatron-private; the call its optimizer.step() makes
    for model_chunk in getattr(optimizer, "model_chunks", []):  # the DDP-wrapped models, once each
        model_chunk.start_param_sync(force_sync=True)


def _is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored in a Transformer Engine low-precision format (FP8 weights)."""
    return type(param).__module__.startswith("transformer_engine") or type(param.data).__module__.startswith(
        "transformer_engine"
    )


@contextmanager
def _te_extra_state_pickles_allowed() -> Iterator[None]:
    """Transformer Engine's opt-in for its pickled FP8 state (``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``), for
    this load only: TE 2.20 refuses that state by default, including in checkpoints it wrote itself."""
    previous = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TE_UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = previous
