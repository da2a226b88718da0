"""Reliability: no silent wrong training, no steps lost to a late failure, every checkpoint fault named up front.

Each case is run where a user meets it: ``Trainer.fit`` with ``ModelCheckpoint`` through ``MegatronCPStrategy`` in
gloo processes on the CPU, the ``llama-fp8`` command, or the function both of them call. "Before building" is
checked by what never happened: no training step, no ``configure_model``, no data set up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import resume, state_io
from lightning_llama_fp8.checkpoint.info import CheckpointError, read_checkpoint_info
from lightning_llama_fp8.checkpoint.resume import check_can_resume
from lightning_llama_fp8.config import get_preset
from tests.helpers import run_distributed
from tests.helpers.corpora import write_corpus

SEQ, VOCAB, GBS = 64, 1000, 4


# ---------------------------------------------------------------------------------------------- harness
def _fit(root: str, ckpt_path: str | None = None, **options: Any) -> dict[str, Any]:
    """One ``trainer.fit`` of a recording module on MegatronCPStrategy (without Megatron DDP: CPU) in this process.

    Returns the samples each step saw (one hash per sample), the module hooks that ran, the global step reached and
    the exception raised (None if the fit finished).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llama_fp8 import IndexedDataModule
    from tests.helpers import allow_dist_checkpointing_on_cpu, megatron_cpu_trainer
    from tests.helpers.models import Recorder, mock_data

    allow_dist_checkpointing_on_cpu()

    gbs = options.pop("gbs", GBS)
    if "corpus" in options:
        data = IndexedDataModule(
            [options.pop("corpus")], split="100,0,0", val_samples=0, seq_length=SEQ, vocab_size=VOCAB,
            global_batch_size=gbs, micro_batch_size=1, num_workers=0,
        )  # fmt: skip
    else:
        data = mock_data(SEQ, gbs, VOCAB)
    module = options.pop("module", None) or Recorder(SEQ)
    saver = ModelCheckpoint(
        dirpath=options.pop("dirpath", Path(root, "ckpts")),
        every_n_train_steps=options.pop("every", 2),
        save_top_k=options.pop("save_top_k", -1),
        save_last=options.pop("save_last", None),
    )
    callbacks = [saver, *options.pop("callbacks", [])]
    weights_only = options.pop("weights_only", None)
    options.setdefault("limit_val_batches", 0)
    trainer = megatron_cpu_trainer(1, enable_checkpointing=True, callbacks=callbacks, **options)
    error: BaseException | None = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=weights_only)
    except Exception as err:
        error = err
    return {
        "seen": getattr(module, "seen", []),
        "hooks": getattr(module, "hooks", []),
        "step": trainer.global_step,
        "error": error,
        "data_built": data.train_dataset is not None,
    }


def _in_process(rank: int, world_size: int, runs: list[tuple[str | None, dict[str, Any]]], root: str) -> list[Any]:
    out = []
    for ckpt_path, options in runs:
        result = _fit(root, ckpt_path, **dict(options))
        result["error"] = None if result["error"] is None else (type(result["error"]).__name__, str(result["error"]))
        out.append(result)
    return out


def _runs(tmp_path: Path, *runs: tuple[str | None, dict[str, Any]]) -> list[dict[str, Any]]:
    """The fits, one after another, in one spawned gloo process (the strategy starts torch.distributed)."""
    (results,) = run_distributed(_in_process, 1, tmp_path / "workers", list(runs), str(tmp_path))
    return results


def _refused_before_building(result: dict[str, Any], error_type: str, pattern: str) -> None:
    assert result["error"] is not None, "the fit was not refused"
    assert result["error"][0] == error_type, result["error"]
    assert re.search(pattern, result["error"][1]), result["error"][1]
    assert result["seen"] == [] and "configure_model" not in result["hooks"]


# ---------------------------------------------------------------------------------------------- silent wrong training
def test_resume_with_a_larger_max_steps_continues_the_same_samples(tmp_path: Path) -> None:
    """A corpus of ~80 samples per epoch: a 30-step run (GBS 4, 120 samples) spans two epochs, a 60-step one three,
    and Megatron shuffles all epochs' documents together, so a fresh 60-step run orders every sample differently.
    Resumed at step 20 with max_steps=60, the run must see the 30-step run's steps 20-29, then go on (its first
    index has whole epochs: ~160 samples; the rest comes from a further index)."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 50, 0, VOCAB, seed=3)
    common = {"corpus": str(corpus), "every": 10}
    first, fresh_longer, resumed = _runs(
        tmp_path,
        (None, {**common, "max_steps": 30}),
        (None, {**common, "max_steps": 60, "dirpath": tmp_path / "other"}),
        (str(tmp_path / "ckpts" / "epoch=0-step=20.ckpt"), {**common, "max_steps": 60}),
    )
    for run in (first, fresh_longer, resumed):
        assert run["error"] is None, run["error"]
    assert len(first["seen"]) == 30 and len(resumed["seen"]) == 40 and resumed["step"] == 60
    assert fresh_longer["seen"][20:30] != first["seen"][20:30]  # what the resume used to train on
    assert resumed["seen"][:10] == first["seen"][20:30]  # the samples the interrupted run would have seen next
    first_index = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=20.ckpt").data["train_index"]
    assert first_index == [{"samples": 120, "seed": 1234}]
    extended = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=60.ckpt").data["train_index"]
    assert extended[0] == first_index[0] and len(extended) == 2 and extended[1]["seed"] == 1235


def test_a_changed_data_seed_on_resume_is_refused(tmp_path: Path) -> None:
    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, seed=7)
    path = tmp_path / "step.ckpt"
    path.mkdir()
    (path / ckpt.INFO_FILENAME).write_text("{}")
    from unittest import mock

    from lightning_llama_fp8._compat import lightning as compat

    arguments = compat.CheckpointArguments(str(path), str(path), None)
    info = ckpt.CheckpointInfo(path, 2, 1, 1, 1, data={"train_index": [{"samples": 8, "seed": 1234}]})
    with (
        mock.patch.object(compat, "checkpoint_arguments", return_value=arguments),
        mock.patch.object(ckpt, "read_checkpoint_info", return_value=info),
    ):
        data.trainer = mock.Mock()  # type: ignore[assignment]
        with pytest.raises(ValueError, match=r"data.seed is 7, but checkpoint .* seed 1234.*data.seed=1234"):
            data._recorded_train_index()


def test_bf16_layers_that_cover_every_layer_are_refused() -> None:
    from lightning_llama_fp8 import TEFP8Precision
    from lightning_llama_fp8.fp8.recipes import check_bf16_layers

    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1, bf16_last_layers=1)
    plugin.check_num_layers(3)  # one FP8 layer left
    with pytest.raises(ValueError, match=r"keeps 2 layers in BF16, but the model has 2: no layer would train in FP8"):
        plugin.check_num_layers(2)
    with pytest.raises(ValueError, match="no layer would train in FP8"):
        check_bf16_layers(4, 0, 4)
    check_bf16_layers(0, 0, 1)


def test_cli_refuses_bf16_layers_that_cover_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config(arch="llama_tiny")  # 2 layers
    config["trainer"]["plugins"] = [
        {"class_path": "lightning_llama_fp8.TEFP8Precision", "init_args": {"recipe": "current", "bf16_last_layers": 2}}
    ]
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "no layer would train in FP8" in capsys.readouterr().err


def test_weights_only_true_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """Lightning drops weights_only on the restore-after-setup path; the strategy reads the caller's argument."""
    saved, refused = _runs(
        tmp_path,
        (None, {"max_steps": 2}),
        (str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), {"max_steps": 4, "weights_only": True}),
    )
    assert saved["error"] is None
    _refused_before_building(refused, "CheckpointError", r"with weights_only=True: MegatronCPStrategy checkpoints")
    assert not refused["data_built"]


def test_checkpoint_arguments_are_the_callers(tmp_path: Path) -> None:
    """``compat.checkpoint_arguments`` inside ``Trainer.fit`` (Lightning private API: the frames of fit and _run)."""
    from lightning.pytorch import Callback
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_llama_fp8._compat import lightning as compat
    from tests.helpers import cpu_trainer

    class Capture(Callback):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.arguments = compat.checkpoint_arguments(trainer)

    capture = Capture()
    trainer = cpu_trainer(max_steps=1, callbacks=[capture], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="there is no last checkpoint"):
        trainer.fit(BoringModel(), ckpt_path="last", weights_only=False)
    assert capture.arguments == compat.CheckpointArguments("last", None, False)
    assert compat.checkpoint_arguments(trainer) is None  # outside of a Trainer method


def test_dangling_last_link_is_resolved_or_refused_with_the_paths(tmp_path: Path) -> None:
    """The shipped config's save_top_k=1 + save_last=link, killed between deleting the old checkpoint and relinking:
    last.ckpt points at a deleted checkpoint while a complete newer one exists. Lightning would start a new run."""
    (saved,) = _runs(tmp_path, (None, {"max_steps": 4, "save_top_k": 1, "save_last": "link"}))
    assert saved["error"] is None
    directory = tmp_path / "ckpts"
    newest = directory / "epoch=0-step=4.ckpt"
    link = directory / "last.ckpt"
    link.unlink()
    link.symlink_to("epoch=0-step=2.ckpt")  # deleted by save_top_k=1 before the kill
    assert resume.resolve_last_checkpoint([directory]) == newest
    (refused,) = _runs(tmp_path / "again", ("last", {"max_steps": 6, "dirpath": directory}))
    _refused_before_building(
        refused, "CheckpointError", r"Lightning found nothing \(.*last\.ckpt: a link whose target is gone.*step=4\.ckpt"
    )
    assert not refused["data_built"]
    # The command line resolves it itself and resumes from the newest complete checkpoint.
    from lightning_llama_fp8.cli import fit as cli

    config = {"trainer": {"callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(directory)}}]}}
    assert cli.resolve_last_from_config(config) == str(newest)


def test_last_with_only_damaged_checkpoints_stops_with_their_paths(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").symlink_to("gone.ckpt")
    (tmp_path / "epoch=0-step=2.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in ") as excinfo:
        resume.resolve_last_checkpoint([tmp_path])
    assert "last.ckpt is a link to gone.ckpt, which does not exist" in str(excinfo.value)
    assert re.search(r"step=2\.ckpt is not a complete .*save did not finish", str(excinfo.value))
    assert resume.resolve_last_checkpoint([tmp_path / "empty"]) is None  # nothing there yet: a new run


# ---------------------------------------------------------------------------------------------- steps lost late
def test_checkpoint_dir_under_a_file_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (refused,) = _runs(tmp_path, (None, {"max_steps": 4, "dirpath": tmp_path / "file" / "ckpts"}))
    _refused_before_building(
        refused, "UnwritableOutputError", r"ModelCheckpoint dirpath .*file/ckpts cannot be written"
    )
    assert not refused["data_built"]


def test_nan_guard_report_dir_under_a_file_fails_before_training(tmp_path: Path) -> None:
    from lightning_llama_fp8.callbacks import NaNGuard

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"report_dir .*file/reports lies under .*file, which is a file"):
        NaNGuard(report_dir=tmp_path / "file" / "reports")
    guard = NaNGuard()
    guard.report_dir = tmp_path / "file" / "reports"  # e.g. a default log dir that turns out unwritable
    (refused,) = _runs(tmp_path, (None, {"max_steps": 4, "callbacks": [guard]}))
    _refused_before_building(refused, "UnwritableOutputError", r"NaNGuard report_dir .*file/reports cannot be written")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_fails_before_training(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (refused,) = _runs(tmp_path, (None, {"max_steps": 4, "dirpath": locked / "ckpts"}))
    finally:
        locked.chmod(0o755)
    _refused_before_building(refused, "UnwritableOutputError", r"PermissionError")


def test_output_locations_cover_loggers_and_te_debug_output(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from lightning_llama_fp8.callbacks import FP8StatsMonitor, NaNGuard
    from lightning_llama_fp8.checkpoint.outputs import output_locations, unwritable_reason

    monitor = FP8StatsMonitor.__new__(FP8StatsMonitor)  # only its settings are read; nothing of TE is set up
    monitor.te_debug_stats = ["underflows%"]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[NaNGuard(), monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    found = {(location.what, location.every_rank) for location in output_locations(trainer)}
    assert found == {
        ("NaNGuard report_dir", False),
        ("FP8StatsMonitor TE debug output", True),
        ("CSVLogger directory", False),
    }
    assert unwritable_reason(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    assert not list((tmp_path / "new" / "dir").iterdir())  # the probe file is gone


def test_resume_with_another_global_batch_size_is_refused_before_building(tmp_path: Path) -> None:
    saved, refused = _runs(
        tmp_path,
        (None, {"max_steps": 2}),
        (str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), {"max_steps": 4, "gbs": 8}),
    )
    assert saved["error"] is None
    _refused_before_building(refused, "CheckpointError", r"global_batch_size 4, this run has 8.*global_batch_size=4")
    assert not refused["data_built"]


@pytest.mark.parametrize("recorded", [True, False], ids=["digest", "old-checkpoint-without-digests"])
def test_unreadable_lightning_state_is_refused_before_building(tmp_path: Path, recorded: bool) -> None:
    (saved,) = _runs(tmp_path, (None, {"max_steps": 2}))
    assert saved["error"] is None
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    state = path / ckpt.LIGHTNING_FILENAME
    state.write_bytes(os.urandom(state.stat().st_size))
    if not recorded:
        info = json.loads((path / ckpt.INFO_FILENAME).read_text())
        (path / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "files": {}}))
    expected = r"lightning\.pt is not the file the save wrote" if recorded else r"lightning\.pt cannot be read"
    (refused,) = _runs(tmp_path / "again", (str(path), {"max_steps": 4, "dirpath": tmp_path / "again"}))
    _refused_before_building(refused, "CheckpointError", expected)


def test_missing_ckpt_path_from_python_is_refused_before_building(tmp_path: Path) -> None:
    (refused,) = _runs(tmp_path, (str(tmp_path / "nope.ckpt"), {"max_steps": 2}))
    _refused_before_building(refused, "CheckpointError", r"nope\.ckpt does not exist")
    assert not refused["data_built"]


def test_val_check_interval_larger_than_the_run_is_refused_before_the_data(tmp_path: Path) -> None:
    (refused,) = _runs(tmp_path, (None, {"max_steps": 4, "val_check_interval": 10, "limit_val_batches": 1}))
    _refused_before_building(refused, "ValueError", r"val_check_interval \(10\) is larger than an epoch \(4 training")
    assert not refused["data_built"] and "setup" not in refused["hooks"]
    from lightning_llama_fp8.data.base import check_val_check_interval

    check_val_check_interval(10, 4, 1.0, None, 1)  # counted over the run: allowed (it just never validates)
    check_val_check_interval(10, 4, 1.0, 1, 0)  # validation off


def _changed_lr_worker(rank: int, world_size: int, path: str) -> tuple[str, str, list[str]]:
    """``LlamaLightningModule`` resumed with another lr: refused in setup_environment, before configure_model
    (which needs CUDA for Megatron's DDP and optimizer, so reaching it would fail differently here)."""
    from lightning_llama_fp8 import (
        LlamaLightningModule,
        MegatronCPStrategy,
        MegatronPrecision,
        MockDataModule,
        OptimizerSettings,
    )
    from tests.helpers import cpu_trainer

    hooks: list[str] = []

    class Module(LlamaLightningModule):
        def configure_model(self) -> None:
            hooks.append("configure_model")
            super().configure_model()

    module = Module(get_preset("llama_tiny", apply_rope_fusion=False), OptimizerSettings(lr=1e-4, min_lr=1e-5))
    data = MockDataModule(seq_length=256, vocab_size=VOCAB, global_batch_size=GBS, num_workers=0)
    trainer = cpu_trainer(max_steps=8, strategy=MegatronCPStrategy(), plugins=[MegatronPrecision()])
    try:
        trainer.fit(module, datamodule=data, ckpt_path=path)
    except CheckpointError as err:
        return type(err).__name__, str(err), hooks
    return "no error", "", hooks


def test_resume_with_changed_learning_rates_is_refused_before_building(tmp_path: Path) -> None:
    path = _fake_resumable_checkpoint(tmp_path)
    (result,) = run_distributed(_changed_lr_worker, 1, tmp_path / "workers", str(path))
    name, message, hooks = result
    assert name == "CheckpointError" and hooks == []
    assert re.search(
        r"other learning rates \(lr: checkpoint 0\.0003, this run 0\.0001; min_lr: checkpoint 3e-05", message
    )


def _fake_resumable_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint's info as a Megatron-optimizer run of the tiny Llama writes it (the files' content not needed:
    the refusal comes first). Saved files need CUDA for Megatron's optimizer, so the record is written directly."""
    from lightning_llama_fp8 import OptimizerSettings

    path = tmp_path / "step=8.ckpt"
    path.mkdir()
    torch.save({"global_step": 8}, path / ckpt.LIGHTNING_FILENAME)
    (path / ckpt.MEGATRON_METADATA_FILENAME).write_text("{}")
    _write_empty_index(path)
    info = ckpt.CheckpointInfo(
        path,
        8,
        1,
        1,
        1,
        arch=asdict(get_preset("llama_tiny")),
        optimizer_sharding="dp_reshardable",
        data={"global_batch_size": GBS, "train_index": [{"samples": 32, "seed": 1234}]},
        optimizer_settings=asdict(OptimizerSettings()),
        files=ckpt.record_files(path),
    )
    (path / ckpt.INFO_FILENAME).write_text(info.to_json())
    return path


def _write_empty_index(path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata

    writer = FileSystemWriter(str(path))
    writer.set_up_storage_writer(True)
    writer.finish(Metadata(state_dict_metadata={}), [])


def test_cli_refuses_changed_batch_size_and_learning_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    path = _fake_resumable_checkpoint(tmp_path)
    config = _cli_config(ckpt_path=path)
    config["data"]["init_args"]["global_batch_size"] = 8
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "trained with global_batch_size 4, this run has 8" in capsys.readouterr().err
    config = _cli_config(ckpt_path=path)
    config["model"]["init_args"]["optimizer"] = {"lr": 1e-3, "min_lr": 3e-5}
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "lr: checkpoint 0.0003, this run 0.001" in capsys.readouterr().err
    from lightning_llama_fp8.parallel.layout import ParallelLayout

    cli.check_checkpoint_from_config(_cli_config(ckpt_path=path), ParallelLayout(), fitting=True)  # same: passes
    assert capsys.readouterr().err == ""


def test_cli_refuses_a_val_check_interval_larger_than_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config()
    config["trainer"].update(max_steps=500, val_check_interval=1000)
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "val_check_interval (1000) is larger than an epoch (500 training batches)" in capsys.readouterr().err
    config["trainer"]["check_val_every_n_epoch"] = None  # the example configs: counted over the run
    cli.check_model_against_config(config, fitting=True)


def _cli_config(arch: str = "llama_tiny", ckpt_path: Path | None = None) -> dict[str, Any]:
    return {
        "trainer": {
            "devices": 1,
            "max_steps": 1000,
            "strategy": {"class_path": "lightning_llama_fp8.MegatronCPStrategy", "init_args": {}},
            "plugins": [{"class_path": "lightning_llama_fp8.MegatronPrecision"}],
        },
        "model": {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"arch": arch}},
        "data": {"class_path": "lightning_llama_fp8.MockDataModule", "init_args": {"global_batch_size": GBS}},
        "ckpt_path": None if ckpt_path is None else str(ckpt_path),
    }


# ---------------------------------------------------------------------------------------------- unclear errors
@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's weights saved by MegatronCPStrategy (megatron-core's real torch_dist writer)."""
    from tests.test_checkpoint import _save_worker

    root = tmp_path_factory.mktemp("llama")
    run_distributed(_save_worker, 1, root / "workers", str(root / "step=7.ckpt"), 1)
    return root / "step=7.ckpt"


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


def test_info_json_copied_from_another_checkpoint_is_caught(llama_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(llama_checkpoint, copy)
    info = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    info["files"][ckpt.LIGHTNING_FILENAME]["digest"] = "0" * 32  # another checkpoint's record
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"lightning\.pt is not the file the save wrote"):
        read_checkpoint_info(copy)


def test_shard_read_errors_name_the_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    def fail(template: Any, directory: str) -> None:
        raise RuntimeError("Global shape mismatch for loaded (torch.Size([2])) and expected (torch.Size([3]))")

    monkeypatch.setattr(dist_checkpointing, "load_content_metadata", lambda directory: {})
    monkeypatch.setattr(dist_checkpointing, "load", fail)
    with pytest.raises(CheckpointError, match=rf"Checkpoint {re.escape(str(tmp_path))}: reading its shards failed .*"):
        state_io.load_megatron_state(tmp_path, {}, None, None)


def test_resuming_with_the_local_layer_spec_is_refused() -> None:
    info = ckpt.CheckpointInfo(
        Path("ck"), 8, 1, 1, 1, arch=asdict(get_preset("llama_tiny")), optimizer_sharding="dp_reshardable"
    )
    local = get_preset("llama_tiny", transformer_impl="local", apply_rope_fusion=False)
    with pytest.raises(CheckpointError, match=r"cannot resume with model.arch.transformer_impl 'local'.*validation"):
        check_can_resume(info, local, 1, 1, with_optimizer=True)
    check_can_resume(info, local, 1, 1, with_optimizer=False)  # its weights load for validation


@pytest.mark.parametrize("subcommand", ["fit", "validate", "plan"])
@pytest.mark.parametrize(
    "content,expected",
    [
        ("- a\n- b\n", r"is a list, not a mapping of sections"),
        ("trainer: [unclosed\n", r"is not valid YAML at line 2, column 1"),
        ("", r"is empty"),
        (None, r"does not exist"),
    ],
    ids=["list", "unparsable", "empty", "missing"],
)
def test_malformed_config_files_get_one_sentence(
    subcommand: str, content: str | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert llama_fp8([subcommand, "--config", str(path)]) == cli.EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err.strip()
    assert re.search(rf"^llama-fp8 {subcommand}: config file .*config\.yaml {expected}", err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "data_path,expected",
    [
        ([0.5, "a", "b"], "mixes weights and prefixes"),
        (["a", 0.5], "mixes weights and prefixes"),
        ([float("nan"), "a"], "must be positive and finite"),
        (["inf", "a"], "must be positive and finite"),
        ([-1, "a", 2, "b"], "must be positive and finite"),
        (["a", ""], "empty entry"),
        (5, "must be a list or a string"),
    ],
)
def test_odd_data_paths_get_one_sentence(data_path: Any, expected: str) -> None:
    from lightning_llama_fp8.data import parse_data_path

    with pytest.raises(ValueError, match=expected):
        parse_data_path(data_path)


def test_cli_refuses_odd_data_paths_before_building(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config()
    config["data"] = {
        "class_path": "lightning_llama_fp8.IndexedDataModule",
        "init_args": {"data_path": [0.5, "a", "b"]},
    }
    with pytest.raises(SystemExit) as excinfo:
        cli.check_data_from_config(config)  # the pre-flight's data check (on a machine that can train)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "mixes weights and prefixes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- more of each class
def test_align_param_gather_without_overlap_is_refused() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(ValueError, match="align_param_gather=True has no effect without overlap_param_gather=True"):
        MegatronCPStrategy(overlap_param_gather=False, align_param_gather=True)
    MegatronCPStrategy(overlap_param_gather=True, align_param_gather=True)


def test_train_samples_fewer_than_the_run_needs_are_reported() -> None:
    from unittest import mock

    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, train_samples=8)
    data.trainer = mock.Mock(max_steps=10)  # type: ignore[assignment]
    with pytest.warns(UserWarning, match=r"reads the same 8 samples 5\.00 times over, in the same order"):
        assert data._resolve_train_samples(need_train=True) == 8


def test_default_checkpoint_dir_is_probed_and_free_space_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_llama_fp8.checkpoint import outputs
    from lightning_llama_fp8.checkpoint import preflight as startup_checks
    from lightning_llama_fp8.checkpoint.outputs import output_locations

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    (location,) = output_locations(trainer)
    assert (location.what, location.path) == ("ModelCheckpoint dirpath", tmp_path / "checkpoints")

    trainer.state.fn = TrainerFn.FITTING
    module = type("Module", (), {"arch": get_preset("llama3_8b")})()
    monkeypatch.setattr(type(trainer), "lightning_module", property(lambda self: module))
    monkeypatch.setattr(startup_checks, "free_bytes", lambda path: 2**30)
    with pytest.warns(UserWarning, match=r"one takes about 1.* GiB \(weights and optimizer state\).* 1\.0 GiB free"):
        startup_checks.check_output_locations(trainer, is_global_zero=True, agree=lambda failure: failure)
    assert outputs.checkpoint_bytes_estimate(get_preset("llama3_8b")) > 100 * 2**30  # 8B x 14 bytes


def test_cli_resolves_last_past_a_dangling_link(
    llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``llama-fp8 fit --ckpt_path last`` through LightningCLI: the newest complete checkpoint is handed to the
    pre-flight (which then refuses this one for having no optimizer state: it was saved without)."""
    import yaml

    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    directory = tmp_path / "ckpts"
    directory.mkdir()
    shutil.copytree(llama_checkpoint, directory / "epoch=0-step=7.ckpt")
    (directory / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")  # deleted by save_top_k before the relink
    config = {k: v for k, v in _cli_config().items() if k != "ckpt_path"}
    config["model"] = {"arch": "llama_tiny"}  # LightningCLI takes the model's arguments directly
    config["data"]["init_args"].update(seq_length=256, vocab_size=1000)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(directory)}}
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as excinfo:
        llama_fp8(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    out, err = capsys.readouterr()
    assert f"ckpt_path 'last': resuming from {directory / 'epoch=0-step=7.ckpt'} (step 7)" in out
    assert re.search(r"Not training: Checkpoint .*epoch=0-step=7\.ckpt", err), err
