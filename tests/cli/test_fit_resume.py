"""``llama-fp8 fit`` (cli/fit.py) around resuming: which checkpoint ``--ckpt_path last`` means, the preemption
callback every run gets, and Lightning's "Checkpoint directory ... exists and is not empty" for a run's own resume."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_llama_fp8.cli.fit as cli
from lightning_llama_fp8.callbacks import PreemptionCheckpoint
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint.preflight import own_checkpoint_directories
from lightning_llama_fp8.cli.config_file import EXIT_CANNOT_TRAIN
from tests.helpers.checkpoints import fake_resumable_checkpoint

CLI_ARGS = ["--trainer.accelerator=cpu", "--trainer.max_steps=5", "--data=lightning_llama_fp8.MockDataModule"]


def _checkpoint(path: Path, step: int, lightning_state: dict[str, Any] | None = None) -> Path:
    """A complete checkpoint record of ``step`` at ``path`` (its tensors are not needed here)."""
    scratch = path.parent / f".scratch{step}"
    scratch.mkdir(parents=True)
    shutil.move(fake_resumable_checkpoint(scratch), path)
    scratch.rmdir()
    info = json.loads((path / ckpt.INFO_FILENAME).read_text())
    if lightning_state is not None:  # lightning.pt is not among the files the record digests
        torch.save(lightning_state, path / ckpt.LIGHTNING_FILENAME)
    (path / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "global_step": step}))
    return path


def _config(checkpoints: Path, run: Path) -> dict[str, Any]:
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(checkpoints)}}
    return {"trainer": {"default_root_dir": str(run), "callbacks": [saver]}}


def test_last_takes_a_newer_slurm_requeue_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lightning's SLURM requeue signal saves hpc_ckpt_<n>.ckpt into default_root_dir; --ckpt_path last ignored it."""
    checkpoints, run = tmp_path / "ckpts", tmp_path / "run"
    _checkpoint(checkpoints / "epoch=0-step=100.ckpt", 100)
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=100.ckpt")
    assert cli.resolve_last_from_config(_config(checkpoints, run)) == str(checkpoints / "last.ckpt")
    _checkpoint(run / "hpc_ckpt_1.ckpt", 130)
    assert cli.resolve_last_from_config(_config(checkpoints, run)) == str(run / "hpc_ckpt_1.ckpt")
    assert f"ckpt_path 'last': resuming from {run / 'hpc_ckpt_1.ckpt'} (step 130)" in capsys.readouterr().out
    # No ModelCheckpoint dirpath in the config: the requeue save is still found.
    assert cli.resolve_last_from_config({"trainer": {"default_root_dir": str(run)}}) == str(run / "hpc_ckpt_1.ckpt")


def test_last_starts_a_new_run_but_refuses_to_validate_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "ckpts", tmp_path / "run")
    assert cli.resolve_last_from_config(config, fitting=True) is None
    assert "yet; starting a new run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as excinfo:
        cli.resolve_last_from_config(config, fitting=False)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    assert "Not validating: ckpt_path 'last': no checkpoint in " in capsys.readouterr().err


def test_every_run_gets_the_preemption_callback_unless_it_configures_one() -> None:
    from lightning_llama_fp8.data import GPTDataModule
    from lightning_llama_fp8.model import LlamaLightningModule

    def preemption_callbacks(extra: list[str]) -> list[PreemptionCheckpoint]:
        run = cli.LlamaCLI(
            LlamaLightningModule, GPTDataModule, subclass_mode_data=True, run=False, args=CLI_ARGS + extra
        )
        return [c for c in run.trainer.callbacks if isinstance(c, PreemptionCheckpoint)]

    (default,) = preemption_callbacks([])
    assert default.signals == (signal.SIGTERM, signal.SIGUSR1)
    configured = [
        "--trainer.callbacks=lightning_llama_fp8.callbacks.PreemptionCheckpoint",
        "--trainer.callbacks.signals=[]",
    ]
    (off,) = preemption_callbacks(configured)
    assert off.signals == ()


def test_a_resume_continues_its_own_checkpoint_directories(tmp_path: Path) -> None:
    """Lightning's "Checkpoint directory ... exists and is not empty" is hidden for these (and only these)."""
    checkpoints, other = tmp_path / "ckpts", tmp_path / "other"
    other.mkdir()
    own = ModelCheckpoint(dirpath=checkpoints)
    elsewhere = ModelCheckpoint(dirpath=other, every_n_train_steps=3)
    step = _checkpoint(checkpoints / "epoch=0-step=3.ckpt", 3)
    (checkpoints / "last.ckpt").symlink_to(step.name)
    assert own_checkpoint_directories(checkpoints / "last.ckpt", [own, elsewhere]) == [own.dirpath]
    # A SLURM requeue save lies in default_root_dir: its saved ModelCheckpoint state names the directory.
    state = {"global_step": 5, "callbacks": {own.state_key: {"dirpath": own.dirpath}}}
    hpc = _checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 5, lightning_state=state)
    assert own_checkpoint_directories(hpc, [own, elsewhere]) == [own.dirpath]
    # A checkpoint of some other run (or no checkpoint of this package at all): none.
    foreign = _checkpoint(tmp_path / "foreign" / "step=9.ckpt", 9)
    assert own_checkpoint_directories(foreign, [own, elsewhere]) == []
    assert own_checkpoint_directories(tmp_path / "missing.ckpt", [own]) == []
