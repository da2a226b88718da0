"""Atomic checkpoint directories: a save replaces the previous checkpoint only once it is complete, on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.checkpoint import directories
from lightning_llama_fp8.checkpoint.info import CheckpointError, read_checkpoint_info


def _write_marker(text: str) -> Any:
    def write(directory: Path) -> None:
        (directory / "marker").write_text(text)

    return write


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save = directories.save_directory_atomically
    save(path, _write_marker("old"), is_rank_zero=True, agree=lambda failure: failure)

    def crash(directory: Path) -> None:
        (directory / "marker").write_text("half")
        raise OSError("disk full")

    # Named as a checkpoint failure with its cause, what is intact and the free space (seen on an H200: torch's
    # writer reports a full disk as "unexpected pos 704 vs 598" from inside a Megatron worker).
    expected = r"Writing checkpoint .*last\.ckpt failed: OSError: disk full\. Nothing was replaced.*GiB free there now"
    with pytest.raises(CheckpointError, match=expected):
        save(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "old"  # untouched
    assert (tmp_path / "last.ckpt.saving").exists()  # the unfinished one, apart

    save(path, _write_marker("new"), is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # leftovers cleaned up


def test_a_save_stopped_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    """Killed after moving the old checkpoint aside and before moving the new one in: the next save restores the
    old one first, so even if that save fails too, the previous checkpoint is back under its name."""
    path = tmp_path / "last.ckpt"
    replaced, saving = tmp_path / "last.ckpt.replaced", tmp_path / "last.ckpt.saving"
    replaced.mkdir()
    (replaced / "marker").write_text("old")
    saving.mkdir()
    (saving / "marker").write_text("new but never published")
    with pytest.raises(CheckpointError, match=r"previous version is intact at .*last\.ckpt\.replaced"):
        read_checkpoint_info(path)

    def crash(directory: Path) -> None:
        raise OSError("killed again")

    with pytest.raises(CheckpointError, match="killed again"):
        directories.save_directory_atomically(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "old"
    assert not replaced.exists()


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    """What a non-zero rank sees when rank 0's file operations fail: an error, not a wait at the next barrier."""
    calls: list[str | None] = []

    def agree(failure: str | None) -> str | None:  # as if rank 0 reported a failure in the first phase
        calls.append(failure)
        return "PermissionError: read-only file system" if len(calls) == 1 else None

    with pytest.raises(CheckpointError, match=r"failed on another rank .*read-only file system.*nothing was replaced"):
        directories.save_directory_atomically(tmp_path / "x.ckpt", _write_marker("x"), is_rank_zero=False, agree=agree)
    assert calls == [None]  # this rank had nothing to do in that phase and stopped right after it


def test_remove_checkpoint_directory(tmp_path: Path) -> None:
    path = tmp_path / "step=2.ckpt"
    path.mkdir()
    (path / "x").write_text("x")
    path.with_name("step=2.ckpt.saving").mkdir()
    path.with_name("step=2.ckpt.replaced").mkdir()
    directories.remove_checkpoint_directory(path)
    assert list(tmp_path.iterdir()) == []
