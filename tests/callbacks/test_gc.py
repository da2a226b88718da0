"""ManualGC (callbacks/gc.py): automatic collection off while training, collections every ``interval`` steps."""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_llama_fp8.callbacks import ManualGC
from lightning_llama_fp8.validate import SettingError
from tests.helpers import cpu_trainer
from tests.helpers.models import Regression


def test_collection_is_off_while_training_and_back_on_after(monkeypatch: pytest.MonkeyPatch) -> None:
    collections: list[int] = []
    seen_enabled: list[bool] = []

    class RecordGC(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            seen_enabled.append(gc.isenabled())

    trainer = cpu_trainer(max_steps=4, callbacks=[ManualGC(interval=2), RecordGC()], limit_val_batches=0)
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(trainer.global_step) or real_collect(*a))
    assert gc.isenabled()
    trainer.fit(Regression())
    assert seen_enabled == [False] * 4 and gc.isenabled()
    assert collections == [0, 2, 4, 4]  # train start, steps 2 and 4, train end


@pytest.mark.parametrize(
    ("kwargs", "setting", "accepted"),
    [
        ({"interval": 2.5}, "interval", "a whole number >= 0"),
        ({"interval": -1}, "interval", "a whole number >= 0"),
        ({"interval": math.nan}, "interval", "a whole number >= 0"),
        ({"interval": True}, "interval", "a whole number >= 0"),
        ({"collect_around_validation": "false"}, "collect_around_validation", "true or false"),
        ({"collect_around_validation": 0}, "collect_around_validation", "true or false"),
    ],
)
def test_arguments_are_what_they_look_like(kwargs: dict[str, Any], setting: str, accepted: str) -> None:
    with pytest.raises(SettingError, match=rf"^ManualGC {setting} must be {accepted}; got ") as err:
        ManualGC(**kwargs)
    assert repr(kwargs[setting]) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    gc_callback = ManualGC(interval=100.0)
    assert gc_callback.interval == 100 and type(gc_callback.interval) is int
