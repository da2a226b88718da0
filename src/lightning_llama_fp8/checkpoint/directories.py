"""Checkpoint directories that appear whole or not at all: a save writes ``<path>.saving`` and renames it into place,
so an interrupted save never damages a checkpoint saved earlier under the same name, and every rank learns together
whether any rank failed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning_llama_fp8.checkpoint.info import (
    INFO_FILENAME,
    LIGHTNING_FILENAME,
    MEGATRON_METADATA_FILENAME,
    CheckpointError,
)
from lightning_llama_fp8.validate import format_bytes, format_names

#: The files a checkpoint directory holds (besides Megatron's ``*.distcp`` shards); ``OWN_FILENAMES``: those only
#: this package writes. Only a directory of such files, with one of this package's, is replaced by a save.
CHECKPOINT_FILENAMES = (INFO_FILENAME, LIGHTNING_FILENAME, MEGATRON_METADATA_FILENAME, ".metadata")
OWN_FILENAMES = (INFO_FILENAME, LIGHTNING_FILENAME)


def save_directory_atomically(path: Path, write: Any, is_rank_zero: bool, agree: Any) -> None:
    """Run ``write(tmp_dir)`` on every rank, then make ``tmp_dir`` appear at ``path`` in one rename.

    A checkpoint already at ``path`` (``last.ckpt`` saved again) is moved aside to ``<path>.replaced`` only once
    the new one is complete, and deleted only once the new one is in place; an interrupted save leaves
    ``<path>.saving`` behind and the old checkpoint untouched. If a save stopped between the two renames, the
    next save first moves the previous version back. Anything at ``path`` but a checkpoint of this package (a
    folder, a file) is refused before anything is written (:func:`refuse_to_replace_other_data`).
    ``agree(text_or_none)`` is a collective over all ranks that returns the first rank's failure text (or None):
    after each phase every rank learns whether any rank failed, and all raise together instead of some waiting for
    the others at the next collective. (A failure inside one of
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
    space = f"{format_bytes(free)} free there now" if free is not None else "free space unknown"
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
    refuse_to_replace_other_data(path)  # before anything is written or removed
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
    # Again: something may have been put there while the shards were written.
    refuse_to_replace_other_data(path, finished=tmp)
    if path.is_dir() and not path.is_symlink():
        path.rename(old)
    elif path.exists() or path.is_symlink():
        path.unlink()
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def refuse_to_replace_other_data(path: Path, finished: Path | None = None) -> None:
    """Raise :class:`CheckpointError` if a save at ``path`` would delete anything but a checkpoint of this package.

    A save replaces what is at ``path`` (``last.ckpt`` saved again): nothing there, a symbolic link (ModelCheckpoint's
    ``save_last="link"``; only the link goes), an empty directory, or a checkpoint of this package, complete or not
    (only checkpoint files, one of them this package's ``lightning_llama_fp8.json`` or ``lightning.pt``). A file, a
    directory holding anything else (a folder of checkpoints, someone's notes) or Megatron's files alone (a
    Megatron-LM checkpoint) is refused, so that ``trainer.save_checkpoint("checkpoints")`` cannot delete a folder.
    ``finished``: where the new checkpoint already lies complete (the check before publishing it).
    """
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        what = "a file"
    else:
        entries = sorted(path.iterdir())
        others = [
            entry.name
            for entry in entries
            if not entry.is_file() or not (entry.name in CHECKPOINT_FILENAMES or entry.name.endswith(".distcp"))
        ]
        if not entries or (not others and any(entry.name in OWN_FILENAMES for entry in entries)):
            return
        if others:
            what = f"a directory that is not a checkpoint of lightning_llama_fp8 (it holds {format_names(others)})"
        else:
            what = f"a directory of Megatron's checkpoint files without this package's {INFO_FILENAME}"
    done = (
        f"Nothing was deleted; the new checkpoint is complete in {finished}: move it to another name"
        if finished is not None
        else "Nothing was written or deleted"
    )
    raise CheckpointError(
        f"Cannot save the checkpoint at {path}: it is {what}, and a save replaces what is at its path, deleting it. "
        f"{done}. Save to a new path (a name inside that directory, e.g. {path / 'model.ckpt'}, or "
        f"ModelCheckpoint(dirpath=...)), or remove {path} yourself if it is not needed."
    )


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
