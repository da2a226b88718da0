"""Atomic checkpoint directories: a save replaces the previous checkpoint only once it is complete, on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.checkpoint import directories
from lightning_llama_fp8.checkpoint.info import LIGHTNING_FILENAME, CheckpointError, read_checkpoint_info

#: Stands for a checkpoint's files: a save replaces only a directory of checkpoint files (see the tests at the end).
MARKER = LIGHTNING_FILENAME


def _write_marker(text: str) -> Any:
    def write(directory: Path) -> None:
        (directory / MARKER).write_text(text)

    return write


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save = directories.save_directory_atomically
    save(path, _write_marker("old"), is_rank_zero=True, agree=lambda failure: failure)

    def crash(directory: Path) -> None:
        (directory / MARKER).write_text("half")
        raise OSError("disk full")

    # Named as a checkpoint failure with its cause, what is intact and the free space (seen on an H200: torch's
    # writer reports a full disk as "unexpected pos 704 vs 598" from inside a Megatron worker).
    expected = r"Writing checkpoint .*last\.ckpt failed: OSError: disk full\. Nothing was replaced.*iB free there now"
    with pytest.raises(CheckpointError, match=expected):
        save(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / MARKER).read_text() == "old"  # untouched
    assert (tmp_path / "last.ckpt.saving").exists()  # the unfinished one, apart

    save(path, _write_marker("new"), is_rank_zero=True, agree=lambda failure: failure)
    assert (path / MARKER).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # leftovers cleaned up


def test_a_save_stopped_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    """Killed after moving the old checkpoint aside and before moving the new one in: the next save restores the
    old one first, so even if that save fails too, the previous checkpoint is back under its name."""
    path = tmp_path / "last.ckpt"
    replaced, saving = tmp_path / "last.ckpt.replaced", tmp_path / "last.ckpt.saving"
    replaced.mkdir()
    (replaced / MARKER).write_text("old")
    saving.mkdir()
    (saving / MARKER).write_text("new but never published")
    with pytest.raises(CheckpointError, match=r"previous version is intact at .*last\.ckpt\.replaced"):
        read_checkpoint_info(path)

    def crash(directory: Path) -> None:
        raise OSError("killed again")

    with pytest.raises(CheckpointError, match="killed again"):
        directories.save_directory_atomically(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / MARKER).read_text() == "old"
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


def _never_written(directory: Path) -> None:
    raise AssertionError(f"the save wrote into {directory} although it had to be refused first")


def test_a_save_onto_a_folder_that_is_not_a_checkpoint_is_refused_before_writing(tmp_path: Path) -> None:
    """Found by an audit: trainer.save_checkpoint("checkpoints") onto a run's folder deleted its checkpoints and
    everything else in it."""
    folder = tmp_path / "checkpoints"
    (folder / "step=7.ckpt").mkdir(parents=True)
    (folder / "step=7.ckpt" / MARKER).write_text("precious")
    (folder / "notes.txt").write_text("precious")
    expected = (
        rf"Cannot save the checkpoint at {folder}: it is a directory that is not a checkpoint of lightning_llama_fp8 "
        r"\(it holds notes\.txt, step=7\.ckpt\).*Nothing was written or deleted\. Save to a new path.*or remove "
    )
    with pytest.raises(CheckpointError, match=expected):
        directories.save_directory_atomically(folder, _never_written, is_rank_zero=True, agree=lambda f: f)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "step=7.ckpt"]
    assert (folder / "step=7.ckpt" / MARKER).read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no .saving either


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda path: path.write_text("x"), "a file"),
        # Megatron-LM's torch_dist checkpoints hold these alone: not this package's to delete.
        (lambda path: (path.mkdir(), (path / "metadata.json").write_text("{}")), "Megatron's checkpoint files"),
        (lambda path: (path.mkdir(), (path / MARKER).write_text("x"), (path / "README").write_text("x")), "README"),
    ],
    ids=["file", "megatron-only", "checkpoint-with-other-files"],
)
def test_a_save_onto_anything_but_a_checkpoint_of_this_package_is_refused(tmp_path: Path, make: Any, what: str) -> None:
    path = tmp_path / "model.ckpt"
    make(path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=rf"Cannot save the checkpoint at .*model\.ckpt: it is .*{what}"):
        directories.save_directory_atomically(path, _never_written, is_rank_zero=True, agree=lambda f: f)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_save_replaces_an_empty_directory_a_checkpoint_or_a_link(tmp_path: Path) -> None:
    """What ModelCheckpoint's own flow meets at a path: last.ckpt saved again (a checkpoint, complete or not), a
    last.ckpt link of save_last="link" (the link goes, not its target), an empty directory made beforehand."""
    save = directories.save_directory_atomically
    empty = tmp_path / "empty.ckpt"
    empty.mkdir()
    save(empty, _write_marker("new"), is_rank_zero=True, agree=lambda f: f)
    assert (empty / MARKER).read_text() == "new"
    partial = tmp_path / "partial.ckpt"  # a checkpoint's files, some missing (a damaged copy)
    partial.mkdir()
    for name in ("__0_0.distcp", ".metadata", "metadata.json", MARKER):
        (partial / name).write_text("old")
    save(partial, _write_marker("new"), is_rank_zero=True, agree=lambda f: f)
    assert sorted(p.name for p in partial.iterdir()) == [MARKER]
    link = tmp_path / "last.ckpt"
    link.symlink_to("partial.ckpt")
    save(link, _write_marker("newer"), is_rank_zero=True, agree=lambda f: f)
    assert not link.is_symlink() and (link / MARKER).read_text() == "newer"
    assert (partial / MARKER).read_text() == "new"


def test_something_put_at_the_path_during_the_write_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"

    def write_while_someone_fills_the_path(directory: Path) -> None:
        (directory / MARKER).write_text("new")
        path.mkdir()
        (path / "notes.txt").write_text("precious")

    with pytest.raises(CheckpointError, match=r"Nothing was deleted; the new checkpoint is complete in .*\.saving"):
        directories.save_directory_atomically(
            path, write_while_someone_fills_the_path, is_rank_zero=True, agree=lambda f: f
        )
    assert (path / "notes.txt").read_text() == "precious"
    assert (tmp_path / "model.ckpt.saving" / MARKER).read_text() == "new"


def test_a_failed_write_names_small_free_space_in_a_unit_that_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: a nearly full disk was reported as "0.0 GiB free"."""
    from lightning_llama_fp8.checkpoint import outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda path: 300 * 2**10)
    assert "(300.00 KiB free there now;" in directories.write_failure_message(tmp_path / "x.ckpt", "OSError: full")


def test_a_background_save_onto_a_folder_is_refused_before_its_shards_are_planned(tmp_path: Path) -> None:
    from lightning_llama_fp8.checkpoint.background import AsyncCheckpointSaver

    (tmp_path / "notes.txt").write_text("precious")
    saver = AsyncCheckpointSaver(agree=lambda failure: failure)
    with pytest.raises(CheckpointError, match=r"it is a directory that is not a checkpoint .*\(it holds notes\.txt\)"):
        saver.save(tmp_path, True, plan_shards=_never_written, write_rank_zero_files=_never_written, step=3)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and saver.pending_path is None
