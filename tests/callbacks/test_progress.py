"""StepProgressBar (callbacks/progress.py): one bar over max_steps, across epochs and resumes."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import LightningModule, Trainer

from lightning_llama_fp8.callbacks import StepProgressBar
from lightning_llama_fp8.validate import SettingError
from tests.helpers.models import Regression
from tests.helpers.trainers import quiet_trainer


def test_progress_bar_counts_steps_of_max_steps_across_epochs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bar = StepProgressBar()
    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=[bar])  # 4 batches an epoch: 1.5 epochs
    capsys.readouterr()
    trainer.fit(Regression())
    out = capsys.readouterr().out
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    last = out.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"^Step \(epoch 1\): 100%.*\| 6/6 \[", last), last
    assert "train/loss=" in last
    assert "/-" not in out and "Epoch 0" not in out


def test_progress_bar_resumes_at_the_restored_step(tmp_path: Path) -> None:
    first = quiet_trainer(tmp_path, max_steps=3, callbacks=[StepProgressBar()])
    first.fit(Regression())
    path = tmp_path / "three.ckpt"
    first.save_checkpoint(path)
    starts: list[int] = []

    class RecordStart(StepProgressBar):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            super().on_train_start(trainer, pl_module)
            starts.append(self.train_progress_bar.n)

    bar = RecordStart()
    quiet_trainer(tmp_path, max_steps=5, callbacks=[bar]).fit(Regression(), ckpt_path=path)
    assert starts == [3]
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)


def test_without_max_steps_it_is_lightnings_epoch_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bar = StepProgressBar()
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[bar]).fit(Regression())
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)  # batches of the last epoch
    assert "Epoch 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "setting", "accepted"),
    [
        ({"refresh_rate": -1}, "refresh_rate", "a whole number >= 0"),
        ({"refresh_rate": 2.5}, "refresh_rate", "a whole number >= 0"),
        ({"refresh_rate": math.inf}, "refresh_rate", "a whole number >= 0"),
        ({"process_position": -1}, "process_position", "a whole number >= 0"),
        ({"process_position": 0.5}, "process_position", "a whole number >= 0"),
        ({"leave": "no"}, "leave", "true or false"),
    ],
)
def test_arguments_are_what_they_look_like(kwargs: dict[str, Any], setting: str, accepted: str) -> None:
    with pytest.raises(SettingError, match=rf"^StepProgressBar {setting} must be {accepted}; got ") as err:
        StepProgressBar(**kwargs)
    assert repr(kwargs[setting]) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    bar = StepProgressBar(refresh_rate=10.0, process_position="1")
    assert (bar.refresh_rate, bar.process_position) == (10, 1)
    assert type(bar.refresh_rate) is int and type(bar.process_position) is int
