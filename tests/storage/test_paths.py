"""Paths read from files stay inside their folder; the overlap test for outputs against inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_llama_fp8.storage.paths import PathOutsideFolderError, overlaps, path_inside


@pytest.mark.parametrize("entry", ["model.safetensors", "sub/x.bin", "./a", "sub/../a", "a/b/../../c"])
def test_entries_inside_the_folder_are_joined(tmp_path: Path, entry: str) -> None:
    assert path_inside(tmp_path, entry, tmp_path / "index.json") == tmp_path / entry


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("../x.safetensors", "climbs out"),
        ("a/../../x", "climbs out"),
        ("..\\x", "climbs out"),
        ("/etc/passwd", "absolute"),
        ("C:\\x", "absolute"),
        ("", "not a file name"),
        (None, "not a file name"),
        (7, "not a file name"),
        ("a\x00b", "NUL"),
    ],
)
def test_entries_leaving_the_folder_are_refused_naming_file_and_entry(tmp_path: Path, entry: object, why: str) -> None:
    with pytest.raises(PathOutsideFolderError, match=why) as caught:
        path_inside(tmp_path, entry, tmp_path / "index.json")
    assert "index.json" in str(caught.value) and repr(entry) in str(caught.value)


def test_links_inside_the_folder_are_allowed(tmp_path: Path) -> None:
    """The Hugging Face cache links each file of a model directory to a blob elsewhere: that stays readable."""
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(blob)
    assert path_inside(folder, "model.safetensors", folder / "index.json").read_bytes() == b"x"


def test_overlaps_follows_links_and_nesting(tmp_path: Path) -> None:
    (tmp_path / "runs" / "a.ckpt").mkdir(parents=True)
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "runs" / "a.ckpt")
    assert overlaps(tmp_path / "runs", tmp_path / "last.ckpt")  # contains the link's target
    assert overlaps(tmp_path / "runs" / "a.ckpt" / "x", tmp_path / "runs")  # inside
    assert overlaps(tmp_path / "runs", tmp_path / "runs/./")
    assert not overlaps(tmp_path / "runs2", tmp_path / "runs")
    assert not overlaps(tmp_path / "out", tmp_path / "last.ckpt")
