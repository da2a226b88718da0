"""The examples (examples/): the configs are there, the plain-Python script parses its flags, and the configs'
validation schedule allows a short run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_llama_fp8.precision import TEFP8Precision
from tests.helpers import REPO_ROOT
from tests.helpers.paths import CONFIG_8B, CONFIGS


def test_example_configs_found() -> None:
    assert CONFIG_8B in CONFIGS
    assert len(CONFIGS) >= 2


@pytest.mark.multiprocess
def test_example_script_parses_its_arguments() -> None:
    """The plain-Python example imports the public API and parses its flags on any machine."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(repo / "examples" / "train_llama3_8b_h100_fp8.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--context-parallel-size" in result.stdout and "--global-batch-size" in result.stdout
    assert "--resume" in result.stdout and "--save-interval" in result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_validation_schedule_allows_a_short_run(path: Path) -> None:
    """``--trainer.max_steps 5`` on an example config must not trip Lightning's check that ``val_check_interval`` fits
    in one epoch (raised after the model is built): the configs count the interval over the run, as Megatron-LM's
    ``--eval-interval`` does. Runs Lightning's loop with the configs' validation settings on a toy module."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer_config = yaml.safe_load(path.read_text())["trainer"]
    schedule = {key: trainer_config[key] for key in ("val_check_interval", "check_val_every_n_epoch")}
    assert isinstance(schedule["val_check_interval"], int) and schedule["val_check_interval"] > 5
    trainer = Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=5, **schedule,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.global_step == 5


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_spell_out_the_fp8_args(path: Path) -> None:
    """Every example lists each FP8 arg, so switching recipe in YAML is an edit, not a lookup."""
    (plugin,) = yaml.safe_load(path.read_text())["trainer"]["plugins"]
    assert plugin["class_path"] == "lightning_llama_fp8.TEFP8Precision"
    for key in ("recipe", "bf16_first_layers", "bf16_last_layers", "fp8_attention", "fp8_param_gather"):
        assert key in plugin["init_args"], key
    TEFP8Precision(**plugin["init_args"])  # and they are a valid combination
