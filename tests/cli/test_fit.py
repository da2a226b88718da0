"""``llama-fp8 fit`` / ``validate`` (cli/fit.py): the pre-flight that refuses, before anything is built, what cannot
train here or cannot work at all."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.parallel.layout import ParallelLayout
from tests.helpers.checkpoints import (
    fake_resumable_checkpoint,
)
from tests.helpers.fits import GBS


def _config(ckpt_path: Path, arch: str = "llama_tiny", tp: int = 1) -> dict[str, Any]:
    return {
        "trainer": {
            "devices": 1,
            "max_steps": 1000,
            "strategy": {
                "class_path": "lightning_llama_fp8.MegatronCPStrategy",
                "init_args": {"tensor_model_parallel_size": tp},
            },
            "plugins": [{"class_path": "lightning_llama_fp8.MegatronPrecision"}],
        },
        "model": {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"arch": arch}},
        "data": {"init_args": {"global_batch_size": 4}},
        "ckpt_path": str(ckpt_path),
    }


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", r"Not training: Checkpoint .*nope\.ckpt does not exist"),
        ("other_arch", r"Not training: Checkpoint .* holds another architecture .*num_layers: checkpoint 2, model 32"),
        ("no_optimizer", r"Not training: Checkpoint .* has no optimizer state"),
    ],
)
def test_cli_refuses_a_bad_ckpt_path_before_building_anything(
    case: str, expected: str, tp2_checkpoint: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    path = tmp_path / "nope.ckpt" if case == "missing" else tp2_checkpoint[0]
    config = _config(path, arch="llama3_8b" if case == "other_arch" else "llama_tiny")
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert re.search(expected, capsys.readouterr().err)


def test_cli_lets_validate_load_weights_only_checkpoints(
    tp2_checkpoint: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    cli.check_checkpoint_from_config(_config(tp2_checkpoint[0]), ParallelLayout(), fitting=False)  # no exit
    cli.check_checkpoint_from_config({**_config(tp2_checkpoint[0]), "ckpt_path": "last"}, ParallelLayout(), True)
    assert capsys.readouterr().err == ""


def test_cli_refuses_a_file_ckpt_path_without_loading_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI would torch.load a file ckpt_path (weights_only=True) right after parsing; a file holding
    anything but plain tensors then fails with an unpickling error. The CLI says what is wrong instead."""
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    file = tmp_path / "lightning.pt"
    torch.save({"hyper_parameters": {"arch": get_preset("llama_tiny")}}, file)  # what weights_only refuses
    config = tmp_path / "config.yaml"
    settings = {k: v for k, v in _config(file).items() if k not in ("ckpt_path", "data")}
    settings["model"] = {"arch": "llama_tiny"}
    settings["data"] = {"class_path": "lightning_llama_fp8.MockDataModule", "init_args": {"global_batch_size": 4}}
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit) as excinfo:
        llama_fp8(["fit", "--config", str(config), "--ckpt_path", str(file)])
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "is a file, but MegatronCPStrategy checkpoints are directories" in capsys.readouterr().err


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


def test_cli_refuses_changed_batch_size_and_learning_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    path = fake_resumable_checkpoint(tmp_path)
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
