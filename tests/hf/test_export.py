"""Exporting a training checkpoint to Hugging Face (hf/export.py): bitwise, loadable in transformers, with a
tokenizer; bad checkpoints and tokenizers refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint.info import INFO_FILENAME, CheckpointError
from lightning_llama_fp8.hf import HFConfigError, export_to_hf
from lightning_llama_fp8.hf.files import INDEX_FILE, SafetensorsDir
from lightning_llama_fp8.storage.outputs import OutputConflictError
from tests.helpers import run_distributed
from tests.helpers.small_tokenizer import SMALL_BOS, small_tokenizer_json

# Every test reads a checkpoint that gloo processes saved (the imported and checkpoint fixtures).
pytestmark = pytest.mark.multiprocess

transformers = pytest.importorskip("transformers")


def test_export_round_trip_is_bitwise_and_loads_in_transformers(imported: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    report = export_to_hf(imported["ckpt"], out, max_shard_bytes=200_000)
    assert report.weights_source.startswith("model weights")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", INDEX_FILE} <= names and len(report.shards) > 1
    exported = SafetensorsDir(out)
    state = imported["state"]
    assert set(exported.names()) == set(state)
    umask = os.umask(0)
    os.umask(umask)
    for shard in report.shards:  # safetensors writes 0600 files; the export gives them the umask's mode
        assert (out / shard).stat().st_mode & 0o777 == 0o666 & ~umask, shard
    for name, value in state.items():
        assert torch.equal(exported.read(name), value), name  # HF -> ours (TP2) -> checkpoint -> HF: bitwise

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = transformers.AutoModelForCausalLM.from_pretrained(imported["hf_dir"])
    assert model.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert model.config.rope_parameters == original.config.rope_parameters
    for name, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    tokens = torch.randint(0, 1000, (1, 12))
    assert torch.equal(model(tokens).logits, original(tokens).logits)


def test_export_direct_reads_equal_the_librarys_reader(
    imported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export reads stored tensors' bytes straight into its buffers; torch's own reader (the fallback where
    torch's internal helpers are missing) must give the very same files."""
    from lightning_llama_fp8.hf import export

    direct = export_to_hf(imported["ckpt"], tmp_path / "direct", max_shard_bytes=200_000)
    monkeypatch.setattr(export, "narrow_tensor_by_index", None)
    library = export_to_hf(imported["ckpt"], tmp_path / "library", max_shard_bytes=200_000)
    assert direct.shards == library.shards
    for shard in direct.shards:
        assert (tmp_path / "direct" / shard).read_bytes() == (tmp_path / "library" / shard).read_bytes(), shard


def test_export_with_tokenizer_file(imported: dict[str, Any], tmp_path: Path) -> None:
    tokenizer_json = small_tokenizer_json(tmp_path / "tokenizer.json")
    out = tmp_path / "with_tokenizer"
    report = export_to_hf(imported["ckpt"], out, tokenizer=tokenizer_json)
    assert report.tokenizer_files == ["tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(SMALL_BOS) == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([tokenizer("w1 w2")["input_ids"] + [config["eos_token_id"]]])).logits.isfinite().all()


def test_export_refuses_a_tokenizer_whose_special_tokens_lie_past_the_vocabulary(
    imported: dict[str, Any], tmp_path: Path
) -> None:
    """Llama 3's tokenizer (BOS 128000) on a 1000-entry model: transformers would fail with an IndexError later."""
    with pytest.raises(
        HFConfigError, match=r"BOS <\|begin_of_text\|> = 128000, EOS <\|end_of_text\|> = 128001, .* 1000 "
    ):
        export_to_hf(imported["ckpt"], tmp_path / "out", tokenizer="llama3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _save_worker(rank: int, world_size: int, hf_dir: str, ckpt: str) -> None:
    from tests.helpers import allow_dist_checkpointing_on_cpu
    from tests.helpers.hf_models import module_from_hf
    from tests.helpers.models import CPU_ARCH

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_from_hf(hf_dir, world_size, CPU_ARCH)
    strategy.save_checkpoint({"global_step": 1, "state_dict": module.state_dict()}, ckpt)
    strategy.teardown()


@pytest.fixture(scope="module")
def checkpoint(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    path = root / "step=1.ckpt"
    run_distributed(_save_worker, 1, root / "workers", str(hf_dir), str(path))
    return path


def test_export_refuses_a_checkpoint_whose_record_disagrees(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(checkpoint, copy)
    info = json.loads((copy / INFO_FILENAME).read_text())
    info["arch"]["ffn_hidden_size"] = 512
    (copy / INFO_FILENAME).write_text(json.dumps(info))
    # Found by read_checkpoint_info (checkpoint.py) or, failing that, by the export's own shape check.
    with pytest.raises(CheckpointError, match=r"decoder.layers.mlp.linear_fc1.weight .*2, 512, 128"):
        export_to_hf(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_damaged_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(checkpoint, copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=rf"{shard.name} has 10 bytes"):
        export_to_hf(copy, tmp_path / "out")


def test_export_refuses_a_bad_tokenizer_before_writing(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(HFConfigError, match="is not a tokenizer the tokenizers library can load"):
        export_to_hf(checkpoint, tmp_path / "out", tokenizer=bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["run", "run/last.ckpt", "run/step=1.ckpt", "run/step=1.ckpt/hf"])
def test_export_never_writes_over_the_checkpoint_it_reads(checkpoint: Path, tmp_path: Path, output: str) -> None:
    """``llama-fp8 convert ckpts/last.ckpt ckpts --overwrite`` once deleted every checkpoint of the run."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "step=1.ckpt")
    (run / "last.ckpt").symlink_to(run / "step=1.ckpt")
    before = _files(run)
    with pytest.raises(OutputConflictError, match="which this command reads and --overwrite would delete"):
        export_to_hf(run / "last.ckpt", tmp_path / output, overwrite=True)
    assert _files(run) == before


def test_export_refuses_link_and_file_outputs_before_any_work(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_llama_fp8.hf import export

    monkeypatch.setattr(export, "_stream_weights", lambda *a: pytest.fail("the export started"))
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "file").write_text("keep")
    for name, why in [("link", "symbolic link"), ("dangling", "symbolic link"), ("file", "is a file")]:
        with pytest.raises(OutputConflictError, match=why):
            export_to_hf(checkpoint, tmp_path / name, overwrite=True)
        assert not (tmp_path / f"{name}.partial").exists()
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "link").is_symlink()


def test_a_failed_export_keeps_the_previous_output_and_leaves_no_partial(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_llama_fp8.hf import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("previous export")
    (out / "model.safetensors").write_text("previous weights")

    def fail(*args: Any) -> None:
        raise RuntimeError("disk went away")

    monkeypatch.setattr(export, "_stream_weights", fail)
    with pytest.raises(RuntimeError, match="disk went away"):
        export_to_hf(checkpoint, out, overwrite=True)
    assert (out / "config.json").read_text() == "previous export"
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


def test_overwrite_replaces_only_an_earlier_export(checkpoint: Path, tmp_path: Path) -> None:
    """Found by an audit: ``convert CKPT OUT --overwrite`` deleted any OUT, a run's folder of checkpoints or a
    checkpoint itself too (one the command does not read)."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "step=1.ckpt")
    (run / "notes.txt").write_text("keep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.csv").write_text("keep")
    cases = [
        (run, r"holds training checkpoints \(step=1\.ckpt\)"),
        (run / "step=1.ckpt", rf"is a training checkpoint \(it has {INFO_FILENAME}\)"),
        (other, r"is not an earlier Hugging Face export \(no config.json beside \*\.safetensors files\)"),
    ]
    before = _files(tmp_path)
    for output, why in cases:
        for overwrite in (True, False):  # without --overwrite too: the message must not suggest it
            with pytest.raises(OutputConflictError, match=rf"{output} exists and {why}.*not replaced, even with --"):
                export_to_hf(checkpoint, output, overwrite=overwrite)
    assert _files(tmp_path) == before
    export_to_hf(checkpoint, tmp_path / "hf")
    (tmp_path / "hf" / "README.md").write_text("model card")  # an earlier export (with its card) is replaced whole
    export_to_hf(checkpoint, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "README.md").exists() and (tmp_path / "hf" / "config.json").is_file()


def test_export_into_the_current_directory(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: ``llama-fp8 convert CKPT .`` failed with "PosixPath('.') has an empty name"."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    report = export_to_hf(checkpoint, ".")
    assert report.output == tmp_path / "out" and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no out.partial / out.lock left


def test_export_refuses_when_the_disk_cannot_hold_it(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_llama_fp8.hf import export

    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(OSError, match=r"needs [\d,.]+ (KiB|MiB) but .* has 1,000 B free"):
        export_to_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_a_second_export_to_the_same_output_is_refused_while_the_first_runs(checkpoint: Path, tmp_path: Path) -> None:
    from lightning_llama_fp8.storage.output_lock import OutputBusyError, output_lock

    busy = pytest.raises(OutputBusyError, match="being written by another process")
    with output_lock(tmp_path / "out", "llama-fp8 convert"), busy:
        export_to_hf(checkpoint, tmp_path / "out")


def test_remainders_in_the_main_weights_place_are_not_exported(
    imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose optimizer state holds the precision-aware optimizer's 16-bit remainders where fp32 main
    weights would be exports its bf16 model tensors, not the remainders (which would read as numbers like -12345)."""
    import dataclasses

    from torch.distributed.checkpoint import FileSystemReader

    from lightning_llama_fp8.checkpoint.info import read_checkpoint_info
    from lightning_llama_fp8.hf import export

    read_metadata = FileSystemReader.read_metadata

    def with_main_weights(reader: FileSystemReader) -> Any:
        metadata = read_metadata(reader)
        model_keys = [key for key in metadata.state_dict_metadata if not key.startswith("optimizer")]
        for key in model_keys:
            metadata.state_dict_metadata[f"optimizer.state.param.{key}"] = metadata.state_dict_metadata[key]
        return metadata

    monkeypatch.setattr(FileSystemReader, "read_metadata", with_main_weights)
    info = read_checkpoint_info(imported["ckpt"])
    arch = export.checkpoint_arch(info)
    assert export._CheckpointTensors(info, arch, allow_fp8_weights=False).source == export.SOURCE_MAIN
    remainders = dataclasses.replace(info, optimizer_state={"precision_aware": True, "store_param_remainders": True})
    assert export._CheckpointTensors(remainders, arch, allow_fp8_weights=False).source == export.SOURCE_MODEL
