"""Safetensors files (hf/files.py): missing, truncated or absent shards named; a failed background write raised."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from lightning_llama_fp8.hf import HFConfigError
from lightning_llama_fp8.hf.files import INDEX_FILE
from tests.helpers.hf_models import copy_hf_dir, hf_module


def test_missing_shard(hf_dir: Path, tmp_path: Path) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFConfigError, match=rf"shard\(s\) {shard.name} named by {INDEX_FILE} are missing"):
        hf_module(copy)


def test_truncated_shard(hf_dir: Path, tmp_path: Path) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(HFConfigError, match=rf"{shard.name} is truncated: its header needs \d+ bytes"):
        hf_module(copy)


def test_no_weights_at_all(hf_dir: Path, tmp_path: Path) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    (copy / INDEX_FILE).unlink()
    with pytest.raises(HFConfigError, match=rf"has neither model.safetensors nor {INDEX_FILE}"):
        hf_module(copy)


def test_a_failed_background_shard_write_is_raised(tmp_path: Path) -> None:
    from lightning_llama_fp8.hf.files import ShardedSafetensorsWriter

    directory = tmp_path / "out"
    directory.mkdir()
    writer = ShardedSafetensorsWriter(directory, max_shard_bytes=1024)
    directory.rmdir()  # the shard's write (in the writer thread) fails: it must surface, not vanish
    writer.add("a", torch.zeros(512))
    with pytest.raises(Exception, match=r"No such file|not found|exist"):
        writer.add("b", torch.zeros(512))  # fills the shard: the first one is written in the background
        writer.finish()


@pytest.mark.parametrize("entry", ["../x.safetensors", "/tmp/x.safetensors", "a/../../x.safetensors"])
def test_index_naming_a_file_outside_the_directory_is_refused(hf_dir: Path, tmp_path: Path, entry: str) -> None:
    """A safetensors index whose weight_map leaves the model directory is refused before any file is opened."""
    import json

    copy = copy_hf_dir(hf_dir, tmp_path)
    outside = tmp_path / "x.safetensors"
    shutil.copyfile(sorted(copy.glob("model-*.safetensors"))[0], outside)  # a readable file waits there
    index = json.loads((copy / INDEX_FILE).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = entry
    (copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(HFConfigError, match=rf"{INDEX_FILE} lists the file '{re.escape(entry)}'"):
        hf_module(copy)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"[1,2,3]", r"its header holds a JSON list, not an object of tensors"),
        (b'{"a": [1, 2, 3]}', r"its header's entry for 'a' is \[1, 2, 3\], not a tensor's dtype, shape and data_off"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}', r"its header's entry for 'a' is \{'dtype'"),
    ],
    ids=["list", "entry-not-an-object", "one-offset"],
)
def test_a_header_that_is_json_but_not_safetensors_is_named(tmp_path: Path, header: bytes, why: str) -> None:
    """Found by an audit: a header holding a JSON list ended in a TypeError traceback."""
    import struct

    from lightning_llama_fp8.hf.files import read_header

    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(HFConfigError, match=rf"model\.safetensors is not a readable safetensors file \({why}"):
        read_header(file)


def test_a_weights_file_instead_of_the_directory_names_the_directory(hf_dir: Path) -> None:
    from lightning_llama_fp8.hf.files import SafetensorsDir

    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    with pytest.raises(
        HFConfigError, match=rf"{shard} is a file; give the Hugging Face model directory .*\({hf_dir}\)"
    ):
        SafetensorsDir(shard)
