"""What ``Trainer.fit`` refuses before anything is built: checkpoints that do not fit this run, output locations
that cannot be written, a 'last' link whose target is gone.

Each case runs where a user meets it: ``Trainer.fit`` with ``ModelCheckpoint`` through ``MegatronCPStrategy`` in a
gloo process on the CPU (tests/helpers/fits.py). "Before building" is checked by what never happened: no training
step, no ``configure_model``, no data set up."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import resume
from lightning_llama_fp8.checkpoint.info import CheckpointError
from lightning_llama_fp8.config import get_preset
from tests.helpers import run_distributed
from tests.helpers.checkpoints import (
    fake_resumable_checkpoint,
)
from tests.helpers.fits import GBS, VOCAB, assert_refused_before_building, run_fits


@pytest.mark.multiprocess
def test_weights_only_true_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """Lightning drops weights_only on the restore-after-setup path; the strategy reads the caller's argument."""
    saved, refused = run_fits(
        tmp_path,
        (None, {"max_steps": 2}),
        (str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), {"max_steps": 4, "weights_only": True}),
    )
    assert saved["error"] is None
    assert_refused_before_building(
        refused, "CheckpointError", r"with weights_only=True: MegatronCPStrategy checkpoints"
    )
    assert not refused["data_built"]


@pytest.mark.multiprocess
def test_dangling_last_link_is_resolved_or_refused_with_the_paths(tmp_path: Path) -> None:
    """The shipped config's save_top_k=1 + save_last=link, killed between deleting the old checkpoint and relinking:
    last.ckpt points at a deleted checkpoint while a complete newer one exists. Lightning would start a new run."""
    (saved,) = run_fits(tmp_path, (None, {"max_steps": 4, "save_top_k": 1, "save_last": "link"}))
    assert saved["error"] is None
    directory = tmp_path / "ckpts"
    newest = directory / "epoch=0-step=4.ckpt"
    link = directory / "last.ckpt"
    link.unlink()
    link.symlink_to("epoch=0-step=2.ckpt")  # deleted by save_top_k=1 before the kill
    assert resume.resolve_last_checkpoint([directory]) == newest
    (refused,) = run_fits(tmp_path / "again", ("last", {"max_steps": 6, "dirpath": directory}))
    assert_refused_before_building(
        refused, "CheckpointError", r"Lightning found nothing \(.*last\.ckpt: a link whose target is gone.*step=4\.ckpt"
    )
    assert not refused["data_built"]
    # The command line resolves it itself and resumes from the newest complete checkpoint.
    from lightning_llama_fp8.cli import fit as cli

    config = {"trainer": {"callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(directory)}}]}}
    assert cli.resolve_last_from_config(config) == str(newest)


@pytest.mark.multiprocess
def test_checkpoint_dir_under_a_file_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (refused,) = run_fits(tmp_path, (None, {"max_steps": 4, "dirpath": tmp_path / "file" / "ckpts"}))
    assert_refused_before_building(
        refused, "UnwritableOutputError", r"ModelCheckpoint dirpath .*file/ckpts cannot be written"
    )
    assert not refused["data_built"]


@pytest.mark.multiprocess
def test_nan_guard_report_dir_under_a_file_fails_before_training(tmp_path: Path) -> None:
    from lightning_llama_fp8.callbacks import NaNGuard

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"report_dir .*file/reports lies under .*file, which is a file"):
        NaNGuard(report_dir=tmp_path / "file" / "reports")
    guard = NaNGuard()
    guard.report_dir = tmp_path / "file" / "reports"  # e.g. a default log dir that turns out unwritable
    (refused,) = run_fits(tmp_path, (None, {"max_steps": 4, "callbacks": [guard]}))
    assert_refused_before_building(
        refused, "UnwritableOutputError", r"NaNGuard report_dir .*file/reports cannot be written"
    )


@pytest.mark.multiprocess
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_fails_before_training(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (refused,) = run_fits(tmp_path, (None, {"max_steps": 4, "dirpath": locked / "ckpts"}))
    finally:
        locked.chmod(0o755)
    assert_refused_before_building(refused, "UnwritableOutputError", r"PermissionError")


@pytest.mark.multiprocess
def test_resume_with_another_global_batch_size_is_refused_before_building(tmp_path: Path) -> None:
    saved, refused = run_fits(
        tmp_path,
        (None, {"max_steps": 2}),
        (str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"), {"max_steps": 4, "gbs": 8}),
    )
    assert saved["error"] is None
    assert_refused_before_building(
        refused, "CheckpointError", r"global_batch_size 4, this run has 8.*global_batch_size=4"
    )
    assert not refused["data_built"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("recorded", [True, False], ids=["digest", "old-checkpoint-without-digests"])
def test_unreadable_lightning_state_is_refused_before_building(tmp_path: Path, recorded: bool) -> None:
    (saved,) = run_fits(tmp_path, (None, {"max_steps": 2}))
    assert saved["error"] is None
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    state = path / ckpt.LIGHTNING_FILENAME
    state.write_bytes(os.urandom(state.stat().st_size))
    if not recorded:
        info = json.loads((path / ckpt.INFO_FILENAME).read_text())
        (path / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "files": {}}))
    expected = r"lightning\.pt is not the file the save wrote" if recorded else r"lightning\.pt cannot be read"
    (refused,) = run_fits(tmp_path / "again", (str(path), {"max_steps": 4, "dirpath": tmp_path / "again"}))
    assert_refused_before_building(refused, "CheckpointError", expected)


@pytest.mark.multiprocess
def test_missing_ckpt_path_from_python_is_refused_before_building(tmp_path: Path) -> None:
    (refused,) = run_fits(tmp_path, (str(tmp_path / "nope.ckpt"), {"max_steps": 2}))
    assert_refused_before_building(refused, "CheckpointError", r"nope\.ckpt does not exist")
    assert not refused["data_built"]


def _resume_worker(
    rank: int, world_size: int, path: str, optimizer: dict, strategy_kwargs: dict
) -> tuple[str, str, list[str]]:
    """``LlamaLightningModule`` resumed from ``path`` with ``OptimizerSettings(**optimizer)`` and
    ``MegatronCPStrategy(**strategy_kwargs)``:
    refused in setup_environment, before configure_model (which needs CUDA for Megatron's DDP and optimizer, so
    reaching it would fail differently here)."""
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

    import lightning_llama_fp8.parallel.optimizer_precision
    import lightning_llama_fp8.strategy

    # As on a GPU machine: Transformer Engine is installed for the model's layers, so the checkpoint checks come next.
    for module_with_the_check in (lightning_llama_fp8.strategy, lightning_llama_fp8.parallel.optimizer_precision):
        module_with_the_check.transformer_engine_installed = lambda: True  # type: ignore[attr-defined]
    module = Module(get_preset("llama_tiny", apply_rope_fusion=False), OptimizerSettings(**optimizer))
    data = MockDataModule(seq_length=256, vocab_size=VOCAB, global_batch_size=GBS, num_workers=0)
    strategy = MegatronCPStrategy(**strategy_kwargs)
    trainer = cpu_trainer(max_steps=8, strategy=strategy, plugins=[MegatronPrecision()])
    try:
        trainer.fit(module, datamodule=data, ckpt_path=path)
    except CheckpointError as err:
        return type(err).__name__, str(err), hooks
    return "no error", "", hooks


@pytest.mark.multiprocess
def test_resume_with_changed_learning_rates_is_refused_before_building(tmp_path: Path) -> None:
    path = fake_resumable_checkpoint(tmp_path)
    (result,) = run_distributed(_resume_worker, 1, tmp_path / "workers", str(path), {"lr": 1e-4, "min_lr": 1e-5}, {})
    name, message, hooks = result
    assert name == "CheckpointError" and hooks == []
    assert re.search(
        r"other learning rates \(lr: checkpoint 0\.0003, this run 0\.0001; min_lr: checkpoint 3e-05", message
    )


@pytest.mark.multiprocess
def test_auto_optimizer_precision_adopts_the_checkpoints_state_before_building(tmp_path: Path) -> None:
    """The default ``optimizer_precision="auto"`` keeps a resumed checkpoint's optimizer state; here main-weight
    remainders, which this run's fully_reshardable saves cannot hold: refused by the adoption, before building."""
    from lightning_llama_fp8 import OptimizerPrecisionSettings

    path = fake_resumable_checkpoint(tmp_path)
    record = OptimizerPrecisionSettings("fp32", "fp32").checkpoint_record()
    info = dataclasses.replace(ckpt.read_checkpoint_info(path), optimizer_state=record)
    (path / ckpt.INFO_FILENAME).write_text(info.to_json())
    sharding = {"checkpoint_optimizer_sharding": "fully_reshardable"}
    (result,) = run_distributed(_resume_worker, 1, tmp_path / "workers", str(path), {}, sharding)
    name, message, hooks = result
    assert name == "CheckpointError" and hooks == []
    assert re.search(r"keeps its optimizer state as precision-aware Adam \(exp_avg fp32, exp_avg_sq fp32, "
                     r"main-weight remainders\).* Resume with 'dp_reshardable'; to change the layout, start a new run "
                     r"from its weights", message)  # fmt: skip


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
    with pytest.warns(UserWarning, match=r"one takes about 1.* GiB \(weights and optimizer state\).* 1\.00 GiB free"):
        startup_checks.check_output_locations(trainer, is_global_zero=True, agree=lambda failure: failure)
    assert outputs.checkpoint_bytes_estimate(get_preset("llama3_8b")) > 100 * 2**30  # 8B x 14 bytes
