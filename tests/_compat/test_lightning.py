"""Every wrapper around Lightning's private API still exists and behaves with the installed Lightning."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_llama_fp8._compat import lightning as compat
from tests.helpers import cpu_trainer, free_port


def test_lightning_version() -> None:
    major, minor = (int(x) for x in lightning.__version__.split(".")[:2])
    assert (major, minor) >= (2, 6)


def test_subprocess_script_launcher() -> None:
    launcher = compat.subprocess_script_launcher(LightningEnvironment(), 2, 1)
    assert callable(launcher.launch)
    assert launcher.is_interactive_compatible is False  # re-runs the script, so not from a notebook
    assert launcher.num_processes == 2
    assert launcher.num_nodes == 1


@pytest.fixture
def restore_rank_zero() -> Iterator[None]:
    before = (rank_zero_only.rank, utils_rank_zero_only.rank)  # type: ignore[attr-defined]
    yield
    rank_zero_only.rank, utils_rank_zero_only.rank = before  # type: ignore[attr-defined]


def test_set_rank_zero(restore_rank_zero: None) -> None:
    compat.set_rank_zero(3)
    assert rank_zero_only.rank == 3  # type: ignore[attr-defined]
    assert utils_rank_zero_only.rank == 3  # type: ignore[attr-defined]

    calls: list[int] = []
    rank_zero_only(lambda: calls.append(1))()
    assert calls == []  # rank 3 is not rank zero

    compat.set_rank_zero(0)
    assert rank_zero_only.rank == utils_rank_zero_only.rank == 0  # type: ignore[attr-defined]
    rank_zero_only(lambda: calls.append(1))()
    assert calls == [1]


def test_evaluate_without_inference_mode() -> None:
    trainer = cpu_trainer()
    loops = [
        trainer.validate_loop,
        trainer.test_loop,
        trainer.predict_loop,
        trainer.fit_loop.epoch_loop.val_loop,
    ]
    # Lightning's defaults: inference mode for validate/test/predict (its in-fit validation already runs
    # without it). The attribute is what Lightning's evaluation context reads.
    assert [loop.inference_mode for loop in loops] == [True, True, True, False]
    compat.evaluate_without_inference_mode(trainer)
    assert [loop.inference_mode for loop in loops] == [False, False, False, False]


class ModeRecorder(LightningModule):
    """Records the autograd mode each evaluation step runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.modes: dict[str, tuple[bool, bool]] = {}

    def _record(self, stage: str, batch: Tensor) -> Tensor:
        self.modes[stage] = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        return self.layer(batch).sum()

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._record("validate", batch)

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._record("test", batch)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._record("predict", batch)


def test_evaluation_runs_under_no_grad_not_inference_mode() -> None:
    loader = DataLoader(torch.randn(2, 2), batch_size=2)
    model = ModeRecorder()
    trainer = cpu_trainer()
    trainer.validate(model, loader, verbose=False)
    assert model.modes["validate"] == (True, False)  # Lightning's default, without the wrapper

    compat.evaluate_without_inference_mode(trainer)
    trainer.validate(model, loader, verbose=False)
    trainer.test(model, loader, verbose=False)
    trainer.predict(model, loader)
    assert model.modes == {stage: (False, False) for stage in ("validate", "test", "predict")}


def test_reset_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.utilities.seed import seed_everything

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seed_everything(7, verbose=False)
    first = torch.rand(3)
    torch.rand(5)
    compat.reset_seed()
    assert torch.equal(torch.rand(3), first)


def test_collectives_without_process_group() -> None:
    assert not torch.distributed.is_initialized()
    tensor = torch.tensor([1.0, 2.0])
    assert compat.sync_ddp_if_available(tensor, None, "sum") is tensor
    assert compat.sync_ddp_if_available(tensor, None, "mean") is tensor
    assert compat.all_gather_ddp_if_available(tensor, None, sync_grads=False) is tensor


def test_init_dist_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not torch.distributed.is_initialized()
    port = free_port()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    environment = LightningEnvironment()
    try:
        compat.init_dist_connection(environment, "gloo", timedelta(minutes=1))
        assert torch.distributed.is_initialized()
        assert torch.distributed.get_backend() == "gloo"
        assert torch.distributed.get_world_size() == 1
        assert torch.distributed.get_rank() == 0
        assert os.environ["MASTER_PORT"] == str(port)

        compat.init_dist_connection(environment, "gloo", None)  # already running: a no-op
        assert torch.distributed.get_world_size() == 1

        # The collectives now go through the group (of one).
        summed = compat.sync_ddp_if_available(torch.tensor([2.0, 4.0]), None, "sum")
        assert torch.equal(summed, torch.tensor([2.0, 4.0]))
        gathered = compat.all_gather_ddp_if_available(torch.tensor([5.0]), None, sync_grads=False)
        assert gathered.shape == (1, 1)
        assert gathered.item() == 5.0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert not torch.distributed.is_initialized()


def test_run_closure_and_before_optimizer_step_hooks() -> None:
    """Closure (forward + backward) first, then callbacks' and the module's on_before_optimizer_step, then our step."""
    from lightning.pytorch import Callback
    from lightning.pytorch.strategies import SingleDeviceStrategy

    events: list[str] = []

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            events.append("training_step")
            return self.layer(batch).sum()

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            events.append(f"module hook, grad set: {self.layer.weight.grad is not None}")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(Callback):
        def on_before_optimizer_step(self, trainer: object, pl_module: object, optimizer: object) -> None:
            events.append("callback hook")

    class StepsWithoutClosure(SingleDeviceStrategy):  # as MegatronCPStrategy steps Megatron's optimizer
        def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
            module = model or self.lightning_module
            compat.run_closure_and_before_optimizer_step_hooks(self.precision_plugin, module, optimizer, closure)
            events.append("step")
            return optimizer.step()

    trainer = cpu_trainer(strategy=StepsWithoutClosure(device=torch.device("cpu")), max_steps=1, callbacks=[Recorder()])
    trainer.fit(Module(), DataLoader(torch.randn(4, 2), batch_size=2))
    assert events == ["training_step", "callback hook", "module hook, grad set: True", "step"]


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


def test_has_trainer_needs_a_module_attached_to_a_trainer() -> None:
    from types import SimpleNamespace

    assert not compat.has_trainer(SimpleNamespace(_lightning_module=None))
    detached = SimpleNamespace(_lightning_module=object(), lightning_module=SimpleNamespace(_trainer=None))
    assert not compat.has_trainer(detached)
    attached = SimpleNamespace(_lightning_module=object(), lightning_module=SimpleNamespace(_trainer=object()))
    assert compat.has_trainer(attached)
