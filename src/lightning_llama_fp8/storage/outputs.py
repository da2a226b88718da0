"""Output directories checked before any work and replaced whole: a command never writes into, replaces or deletes
what it reads, never follows a link it would then delete through, and leaves the previous output in place until the
new one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning_llama_fp8.storage.paths import overlaps

#: The name a directory output is written under until it is complete, and where the previous one waits meanwhile.
PARTIAL_SUFFIX, REPLACED_SUFFIX = ".partial", ".replaced"


class OutputConflictError(FileExistsError):
    """The output cannot be written where asked; the message says why and what to pass instead."""


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def check_output_directory(
    output: str | os.PathLike[str],
    reads: Iterable[tuple[str, str | os.PathLike[str]]],
    overwrite: bool,
    not_replaceable: Callable[[Path], str | None] | None = None,
) -> Path:
    """Check, before any work, that ``output`` can become a new directory; return it as an absolute :class:`Path`.

    Args:
        output: the directory to write (``.`` too: made absolute first, without following links).
        reads: ``(what, path)`` for everything the command reads (e.g. ``("the checkpoint", ckpt)``).
        overwrite: an existing non-empty directory ``output`` may be replaced (once the new one is complete).
        not_replaceable: why an existing non-empty ``output`` may not be replaced even with ``overwrite``
            (e.g. it is not an earlier output of the command), or ``None`` where it may.

    Raises:
        OutputConflictError: ``output`` (or its temporary siblings) is, contains or lies inside something the
            command reads; or it is a symbolic link, or a file; or it is not empty and ``overwrite`` is off, or
            ``not_replaceable`` refuses it.
    """
    output = Path(os.path.abspath(Path(output).expanduser()))  # "." has no name to put ".partial" after
    for what, read in reads:
        for target in (output, sibling(output, PARTIAL_SUFFIX), sibling(output, REPLACED_SUFFIX)):
            if overlaps(target, read):
                raise OutputConflictError(
                    f"The output {output} would be written over {what} {read} (one contains the other), which this "
                    f"command reads{' and --overwrite would delete' if overwrite else ''}; choose an output "
                    f"directory outside {read}."
                )
    if output.is_symlink():
        raise OutputConflictError(
            f"The output {output} is a symbolic link (to {os.readlink(output)}); replacing it would not write "
            f"where it points. Pass the real directory path{' of its target' if output.exists() else ''} instead."
        )
    if output.exists() and not output.is_dir():
        raise OutputConflictError(
            f"The output {output} is a file, not a directory; choose another output (--overwrite replaces only "
            "a directory)."
        )
    if output.is_dir() and any(output.iterdir()):
        why = not_replaceable(output) if not_replaceable is not None else None
        if why is not None:
            raise OutputConflictError(
                f"{output} exists and {why}; it is not replaced, even with --overwrite: choose another output "
                "directory (or remove it yourself if it is not needed)."
            )
        if not overwrite:
            raise OutputConflictError(
                f"{output} exists and is not empty; choose another directory or pass --overwrite."
            )
    parent = _nearest_existing(output.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputConflictError(f"Cannot create {output}: {parent} is not a writable directory.")
    return output


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove_path(path: Path) -> None:
    """Delete a directory tree, a file or a link (never what a link points to); nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fresh_partial_directory(output: Path) -> Path:
    """An empty ``<output>.partial`` to write into (a leftover of an interrupted run is removed first)."""
    partial = sibling(output, PARTIAL_SUFFIX)
    remove_path(partial)
    partial.mkdir(parents=True)
    return partial


def publish_directory(partial: Path, output: Path) -> None:
    """Make the complete ``partial`` appear at ``output``: a previous ``output`` is moved to ``<output>.replaced``
    and deleted only once the new one is in place, so a kill between the renames loses neither."""
    replaced = sibling(output, REPLACED_SUFFIX)
    remove_path(replaced)
    if output.is_dir() and not output.is_symlink():
        output.rename(replaced)
    partial.rename(output)
    remove_path(replaced)
