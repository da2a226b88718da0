"""read_checkpoint_info: damaged, unfinished, foreign or edited checkpoints are named before any tensor is read.

The checkpoints are saved by megatron-core's real ``dist_checkpointing`` through ``MegatronCPStrategy`` in gloo
processes on the CPU (the ``tp2_checkpoint`` and ``llama_checkpoint`` fixtures of tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint.info import CheckpointError, read_checkpoint_info


def _copy(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> Path:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(tp2_checkpoint[0], copy)
    return copy


def test_missing_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist\. Check the path"):
        read_checkpoint_info(tmp_path / "nope.ckpt")


@pytest.mark.multiprocess
def test_interrupted_replacement_points_at_the_intact_previous_version(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path
) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    copy.rename(copy.with_name("copy.ckpt.replaced"))
    with pytest.raises(CheckpointError, match=r"previous version is intact at .*copy\.ckpt\.replaced; rename it back"):
        read_checkpoint_info(copy)


def test_single_file_checkpoint_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}}, file)
    with pytest.raises(CheckpointError, match="is a file, but MegatronCPStrategy checkpoints are directories"):
        read_checkpoint_info(file)


@pytest.mark.multiprocess
def test_unfinished_save_is_refused(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    for marker in (ckpt.INFO_FILENAME, "metadata.json"):
        (copy / marker).unlink()
    with pytest.raises(CheckpointError, match="save did not finish"):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
def test_megatron_lm_checkpoint_is_recognised_as_foreign(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ckpt.INFO_FILENAME).unlink()
    with pytest.raises(CheckpointError, match="not written by this package"):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_is_found_without_reading_tensors(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path, damage: str
) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    shard = sorted(copy.glob("*.distcp"))[-1]
    if damage == "delete":
        shard.unlink()
        expected = rf"{shard.name} is missing"
    else:
        shard.write_bytes(shard.read_bytes()[:100])
        expected = rf"{shard.name} has 100 bytes, the save wrote \d+"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
def test_damaged_index_and_info_are_reported(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"damaged: \.metadata has 7 bytes, the save wrote \d+"):
        read_checkpoint_info(copy)
    info = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "files": {}}))  # as written before files were recorded
    with pytest.raises(CheckpointError, match=r"shard index \(\.metadata\) cannot be read"):
        read_checkpoint_info(copy)
    (copy / ckpt.INFO_FILENAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"lightning_llama_fp8\.json is unreadable"):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
def test_missing_lightning_state_is_reported(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ckpt.LIGHTNING_FILENAME).unlink()
    with pytest.raises(CheckpointError, match=r"lightning\.pt is missing"):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
@pytest.mark.parametrize("content", ["random", "zeros"])
def test_overwritten_shard_is_named_before_anything_is_read(
    llama_checkpoint: Path, tmp_path: Path, content: str
) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(llama_checkpoint, copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    size = shard.stat().st_size
    shard.write_bytes(os.urandom(size) if content == "random" else bytes(size))
    with pytest.raises(CheckpointError, match=rf"damaged: {shard.name} is not the file the save wrote \(same size"):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
def test_info_json_naming_another_architecture_is_caught(llama_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(llama_checkpoint, copy)
    info = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    info["arch"]["num_layers"] = 3
    info["arch"]["ffn_hidden_size"] = 1024
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps(info))
    with pytest.raises(
        CheckpointError,
        match=r"shards do not hold the architecture .*linear_qkv\.weight \(2, 512, 256\) \(the JSON's architecture "
        r"gives \(3, 512, 256\)\).*edited or copied from another checkpoint",
    ):
        read_checkpoint_info(copy)


@pytest.mark.multiprocess
def test_info_json_copied_from_another_checkpoint_is_caught(llama_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(llama_checkpoint, copy)
    info = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    info["files"][ckpt.LIGHTNING_FILENAME]["digest"] = "0" * 32  # another checkpoint's record
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"lightning\.pt is not the file the save wrote"):
        read_checkpoint_info(copy)


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x"])
def test_recorded_files_outside_the_checkpoint_are_refused_unread(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path, entry: str
) -> None:
    """Names in lightning_llama_fp8.json are data: one naming a file outside the checkpoint is refused, and nothing
    about that file (not even its size) appears in the error."""
    copy = _copy(tp2_checkpoint, tmp_path)
    record = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    record["files"][entry] = {"size": 1, "digest": "0"}
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"damaged or unsafe: .* lists the file") as caught:
        read_checkpoint_info(copy)
    assert "bytes" not in str(caught.value)


def test_shard_index_naming_a_file_outside_the_checkpoint_is_refused(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path
) -> None:
    """torch.distributed.checkpoint's .metadata names each shard file; one outside the checkpoint is refused."""
    import pickle

    copy = _copy(tp2_checkpoint, tmp_path)
    metadata = pickle.loads((copy / ".metadata").read_bytes())
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../outside.distcp"
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    record = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    record["files"] = {}  # a record from before file digests: the index check is what stands
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"\.metadata lists the file '\.\./outside\.distcp'"):
        read_checkpoint_info(copy)


def _edited(tmp_path: Path, edit: Any) -> Path:
    """A checkpoint record (tests/helpers/checkpoints.py) whose info file ``edit(record)`` changed in place, or
    replaced by the text it returns."""
    from tests.helpers.checkpoints import fake_resumable_checkpoint

    path = fake_resumable_checkpoint(tmp_path)
    record = json.loads((path / ckpt.INFO_FILENAME).read_text())
    text = edit(record)
    (path / ckpt.INFO_FILENAME).write_text(json.dumps(record) if text is None else text)
    return path


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda record: "null", "it holds NoneType, not a JSON object"),
        (lambda record: "[]", "it holds list, not a JSON object"),
        (lambda record: record.update(files=[]), r"files is \[\], not a JSON object"),
        (lambda record: record["files"][ckpt.LIGHTNING_FILENAME].clear(), r"files\['lightning.pt'\] is \{\}, not"),
        (lambda record: record.update(tensor_model_parallel_size=0), "tensor_model_parallel_size is 0, not a whole"),
        (lambda record: record.update(global_step="7"), "global_step is '7', not a whole number >= 0"),
        (lambda record: record.update(arch=None), "arch is None, not a JSON object"),
        (lambda record: record.__delitem__("world_size"), "missing 1 required positional argument: 'world_size'"),
    ],
    ids=["null", "list", "files-list", "file-without-size", "tp-0", "step-text", "arch-null", "no-world-size"],
)
def test_a_hand_damaged_info_file_is_named_damaged(tmp_path: Path, edit: Any, why: str) -> None:
    """Found by an audit: these ended in AttributeError, KeyError or ZeroDivisionError tracebacks."""
    with pytest.raises(CheckpointError, match=rf"{ckpt.INFO_FILENAME} is damaged: {why}.*Resume from another"):
        read_checkpoint_info(_edited(tmp_path, edit))


def test_an_info_file_of_a_newer_version_says_so(tmp_path: Path) -> None:
    """Found by an audit: fields this version does not know were reported as a damaged file."""
    path = _edited(tmp_path, lambda record: record.update(new_field=1) or record["arch"].update(new_arch_field=2))
    with pytest.raises(CheckpointError, match=r"\(new_field, arch.new_arch_field\): it was written by a newer lig"):
        read_checkpoint_info(path)


def test_a_folder_of_checkpoints_names_them(tmp_path: Path) -> None:
    """Found by an audit: ``convert RUN_DIR OUT`` said the folder's save "did not finish"."""
    for name in ("step=4.ckpt", "step=8.ckpt"):
        (tmp_path / name).mkdir()
    (tmp_path / "last.ckpt").symlink_to("step=8.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"is a folder of checkpoints, not a checkpoint: give one of: last.ckpt, step=4.ckpt, step=8",
    ):
        read_checkpoint_info(tmp_path)
