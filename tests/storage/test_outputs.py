"""Output directories: checked before any work, never over what the command reads, replaced whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_llama_fp8.storage.outputs import (
    OutputConflictError,
    check_output_directory,
    fresh_partial_directory,
    publish_directory,
    remove_path,
)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpts" / "step=4.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "shard").write_bytes(b"weights")
    (tmp_path / "ckpts" / "last.ckpt").symlink_to(ckpt)
    return tmp_path


@pytest.mark.parametrize("output", ["ckpts", "ckpts/last.ckpt", "ckpts/step=4.ckpt", "ckpts/step=4.ckpt/hf", "."])
def test_output_over_what_is_read_is_refused_even_with_overwrite(run: Path, output: str) -> None:
    with pytest.raises(OutputConflictError, match="which this command reads and --overwrite would delete"):
        check_output_directory(run / output, [("the checkpoint", run / "ckpts" / "last.ckpt")], overwrite=True)
    assert (run / "ckpts" / "step=4.ckpt" / "shard").read_bytes() == b"weights"


def test_partial_sibling_over_the_input_is_refused(run: Path) -> None:
    """The export writes ``<output>.partial`` first: that name must not be the checkpoint either."""
    with pytest.raises(OutputConflictError):
        check_output_directory(run / "ckpts" / "step=4", [("the checkpoint", run / "ckpts" / "step=4.partial")], True)


def test_links_and_files_are_refused_before_work(run: Path) -> None:
    (run / "elsewhere").mkdir()
    (run / "link").symlink_to(run / "elsewhere")
    (run / "dangling").symlink_to(run / "nowhere")
    (run / "file").write_text("x")
    with pytest.raises(OutputConflictError, match=r"is a symbolic link .* real directory path of its target"):
        check_output_directory(run / "link", [], overwrite=True)
    with pytest.raises(OutputConflictError, match="is a symbolic link"):
        check_output_directory(run / "dangling", [], overwrite=True)
    with pytest.raises(OutputConflictError, match="is a file, not a directory"):
        check_output_directory(run / "file", [], overwrite=True)
    assert (run / "file").read_text() == "x" and (run / "link").is_symlink()


def test_non_empty_needs_overwrite_and_empty_or_missing_is_fine(run: Path) -> None:
    (run / "full").mkdir()
    (run / "full" / "a").write_text("a")
    with pytest.raises(OutputConflictError, match=r"exists and is not empty; .* --overwrite"):
        check_output_directory(run / "full", [], overwrite=False)
    assert check_output_directory(run / "full", [], overwrite=True) == run / "full"
    (run / "empty").mkdir()
    check_output_directory(run / "empty", [], overwrite=False)
    check_output_directory(run / "new" / "deeper", [], overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(run: Path) -> None:
    (run / "ro").mkdir()
    (run / "ro").chmod(0o500)
    try:
        with pytest.raises(OutputConflictError, match="not a writable directory"):
            check_output_directory(run / "ro" / "out", [], overwrite=False)
    finally:
        (run / "ro").chmod(0o700)


def test_publish_replaces_the_old_output_only_when_the_new_one_is_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    partial = fresh_partial_directory(out)
    (partial / "new").write_text("new")
    assert (out / "old").exists()  # untouched while the new one is written
    publish_directory(partial, out)
    assert sorted(p.name for p in out.iterdir()) == ["new"] and not partial.exists()
    assert not (tmp_path / "out.replaced").exists()


def test_remove_path_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "keep")
    remove_path(tmp_path / "link")
    assert (tmp_path / "keep" / "x").exists() and not (tmp_path / "link").exists()
    remove_path(tmp_path / "absent")


def test_the_current_directory_is_made_absolute_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: ``convert CKPT .`` failed with "PosixPath('.') has an empty name" naming ``..partial``."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    output = check_output_directory(".", [], overwrite=False)
    assert output == tmp_path / "here"
    assert fresh_partial_directory(output) == tmp_path / "here.partial"


def test_a_directory_the_command_may_not_replace_is_refused_even_with_overwrite(run: Path) -> None:
    (run / "full").mkdir()
    (run / "full" / "a").write_text("a")

    def not_replaceable(output: Path) -> str | None:
        return "holds something else" if (output / "a").exists() else None

    for overwrite in (True, False):
        with pytest.raises(
            OutputConflictError, match=r"full exists and holds something else; it is not replaced, even"
        ):
            check_output_directory(run / "full", [], overwrite=overwrite, not_replaceable=not_replaceable)
    (run / "full" / "a").rename(run / "full" / "b")
    assert check_output_directory(run / "full", [], True, not_replaceable=not_replaceable) == run / "full"
    check_output_directory(run / "empty", [], overwrite=False, not_replaceable=not_replaceable)  # never asked
