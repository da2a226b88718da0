"""Paths found inside files (a safetensors index, a checkpoint's record, a torch_dist ``.metadata``) name files of
the folder they came with, never anything outside it; and the overlap test for outputs against inputs.

The check is on the entry's text (absolute paths and ``..`` that climbs out are refused), not on where symbolic links
inside the folder point: the Hugging Face cache links every file of a model directory to a blob outside it, and the
person who made the folder chose those links, while the entries are data that anyone may have edited.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class PathOutsideFolderError(ValueError):
    """A file lists a path outside its folder; the message names the file, the entry and the folder."""


def path_inside(folder: str | os.PathLike[str], entry: object, listed_in: str | os.PathLike[str]) -> Path:
    """``folder / entry`` if ``entry`` (read from the file ``listed_in``) is a relative path that stays in ``folder``.

    Raises:
        PathOutsideFolderError: ``entry`` is not a string, is empty, is absolute (POSIX or Windows style), or climbs
            out of ``folder`` with ``..``.
    """
    problem = _why_outside(entry)
    if problem:
        raise PathOutsideFolderError(
            f"{listed_in} lists the file {entry!r}, which {problem}; files it lists must lie inside {folder}. "
            "The file was edited or made by another tool: restore it from the original source."
        )
    return Path(folder) / str(entry)


def _why_outside(entry: object) -> str | None:
    if not isinstance(entry, str) or not entry:
        return "is not a file name"
    if "\x00" in entry:
        return "contains a NUL character"
    if PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).is_absolute() or PureWindowsPath(entry).drive:
        return "is an absolute path"
    depth = 0
    for part in entry.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of the folder with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def overlaps(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Whether one path is the other or lies inside it, after following symbolic links (missing parts allowed)."""
    a, b = Path(first).expanduser().resolve(), Path(second).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents
