"""FaultInjector through Lightning's fit loop on the CPU (automatic optimization, SGD).

``Probe`` records, per global step, the loss and which parameters' gradients are non-finite (in
``on_before_optimizer_step``, i.e. after backward, before the update), then zeroes non-finite gradients so that a
poisoned step cannot spoil the weights: later steps must be clean again, which is what "only that step" means.
"""

from __future__ import annotations

import logging
import math
import re
from collections import namedtuple
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_llama_fp8.callbacks.fault_injection import FaultInjector, _poison_first
from lightning_llama_fp8.validate import SettingError

Pair = namedtuple("Pair", ["out", "aux"])


class TupleLayer(nn.Module):
    """Returns (output, bias) like TE/Megatron linear layers with return_bias=True."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(x), self.linear.bias


class PerTokenLoss(nn.Module):
    """Stands in for Megatron's GPTModel: given labels, returns the per-token loss [batch, seq]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = TupleLayer()
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        hidden, bias = self.block(torch.relu(self.embed(x)))
        return (self.head(hidden + bias).squeeze(-1) - labels) ** 2


class TinyModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = PerTokenLoss()
        self.losses: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.model(x, y).mean()
        self.losses[self.trainer.global_step] = loss.item()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(32, 3, 4, generator=g), torch.randn(32, 3, generator=g)), batch_size=2
        )


class Probe(Callback):
    def __init__(self) -> None:
        self.bad_grads: dict[int, list[str]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        bad = []
        for name, param in pl_module.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                bad.append(name)
                param.grad.zero_()  # keep the weights finite, as a NaN guard would
        self.bad_grads[trainer.global_step] = bad


def fit(injector: FaultInjector, max_steps: int = 5) -> tuple[TinyModule, Probe]:
    module, probe = TinyModule(), Probe()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        callbacks=[injector, probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return module, probe


def nonfinite_steps(losses: dict[int, float]) -> list[int]:
    return [step for step, loss in sorted(losses.items()) if not math.isfinite(loss)]


# ---------------------------------------------------------------------------------------------- activation
def test_activation_nan_spoils_that_steps_loss_only(caplog: pytest.LogCaptureFixture) -> None:
    injector = FaultInjector("activation", "model.embed", step=2)
    with caplog.at_level(logging.WARNING):
        module, probe = fit(injector)
    assert sorted(module.losses) == [0, 1, 2, 3, 4]
    assert nonfinite_steps(module.losses) == [2]
    assert math.isnan(module.losses[2])
    # The NaN flowed back through every parameter downstream of model.embed (and into embed's own weight).
    assert {s for s, bad in probe.bad_grads.items() if bad} == {2}
    assert "model.head.weight" in probe.bad_grads[2]
    assert injector.injections == [
        {"step": 2, "rank": 0, "target": "activation", "name": "model.embed", "value": "nan"}
    ]
    warnings = [r.getMessage() for r in caplog.records if "FaultInjector" in r.getMessage()]
    assert warnings == ["FaultInjector: injecting nan into the activation of 'model.embed' at step 2 on rank 0."]


def test_activation_inf_in_a_tuple_output() -> None:
    injector = FaultInjector("activation", "model.block", step=1, value="inf")
    module, _ = fit(injector, max_steps=3)
    assert nonfinite_steps(module.losses) == [1]
    assert injector.injections[0]["value"] == "inf"


def test_poison_first_handles_tensors_tuples_namedtuples_and_skips_integers() -> None:
    x = torch.ones(2, 3)
    out, done = _poison_first(x, float("inf"))
    assert done
    assert out[0, 0].item() == math.inf
    assert torch.isfinite(out.view(-1)[1:]).all()
    assert x.eq(1).all()  # a copy: the original (which autograd may have saved) is untouched

    out, done = _poison_first((torch.arange(3), [torch.zeros(0), torch.ones(2)], torch.ones(2)), float("nan"))
    assert done
    assert out[0].tolist() == [0, 1, 2]  # integer tensor cannot hold NaN: skipped
    assert isinstance(out[1], list)
    assert math.isnan(out[1][1][0].item())
    assert out[2].tolist() == [1.0, 1.0]  # only the first floating-point tensor

    out, done = _poison_first(Pair(torch.ones(()), None), float("nan"))
    assert done
    assert isinstance(out, Pair)
    assert math.isnan(out.out.item())

    assert _poison_first((torch.arange(2), "text"), float("nan"))[1] is False


# ---------------------------------------------------------------------------------------------- gradient
def test_gradient_nan_reaches_only_that_parameter_at_that_step_and_the_loss_stays_finite() -> None:
    injector = FaultInjector("gradient", "model.block.linear.weight", step=3)
    module, probe = fit(injector)
    assert nonfinite_steps(module.losses) == []
    assert probe.bad_grads == {0: [], 1: [], 2: [], 3: ["model.block.linear.weight"], 4: []}
    assert injector.injections == [
        {"step": 3, "rank": 0, "target": "gradient", "name": "model.block.linear.weight", "value": "nan"}
    ]


# ---------------------------------------------------------------------------------------------- loss
def test_loss_defaults_to_the_model_module_and_poisons_that_step() -> None:
    injector = FaultInjector("loss", step=1, value="inf")
    assert injector.name == "model"
    module, probe = fit(injector, max_steps=3)
    assert module.losses[1] == math.inf  # one inf among the per-token losses: the mean is inf
    assert nonfinite_steps(module.losses) == [1]
    # The poisoned element is a constant for autograd and nothing after the loss uses it: gradients stay finite.
    assert all(not bad for bad in probe.bad_grads.values())
    assert [e["name"] for e in injector.injections] == ["model"]


# ---------------------------------------------------------------------------------------------- ranks, names
def test_ranks_filter_other_rank_injects_nothing() -> None:
    injector = FaultInjector("activation", "model.embed", step=1, ranks=[1])
    module, probe = fit(injector, max_steps=3)
    assert nonfinite_steps(module.losses) == []
    assert injector.injections == []
    assert all(not bad for bad in probe.bad_grads.values())


def test_hooks_are_removed_after_fit() -> None:
    injector = FaultInjector("activation", "model.embed", step=0)
    module, _ = fit(injector, max_steps=1)
    assert nonfinite_steps(module.losses) == [0]
    assert not module.model.embed._forward_hooks
    # Even when armed, nothing is attached any more.
    injector._armed = True
    x = torch.randn(2, 3, 4)
    assert torch.isfinite(module.model(x, torch.zeros(2, 3))).all()


def test_unknown_module_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"no module named 'model\.blok'.*Close matches: 'model\.block'"):
        fit(FaultInjector("activation", "model.blok", step=0), max_steps=1)


def test_unknown_parameter_name_lists_close_matches() -> None:
    with pytest.raises(
        ValueError, match=r"no parameter named 'model\.embed\.weigth'.*named_parameters.*'model\.embed\.weight'"
    ):
        fit(FaultInjector("gradient", "model.embed.weigth", step=0), max_steps=1)


def test_far_off_name_lists_some_names() -> None:
    with pytest.raises(ValueError, match=r"no module named 'decoder'.*Some names: 'model', 'model\.embed'"):
        fit(FaultInjector("loss", "decoder", step=0), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "weights", "name": "x", "step": 0}, "target must be one of"),
        ({"target": "activation", "step": 0}, r"needs name= \(a module name\)"),
        ({"target": "gradient", "step": 0}, r"needs name= \(a parameter name\)"),
        ({"target": "loss", "step": 0, "value": "zero"}, "value must be one of"),
        ({"target": "loss", "step": 0, "ranks": []}, "ranks must be a non-empty list"),
        ({"target": "loss", "step": 0, "ranks": "0"}, "ranks must be a non-empty list"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultInjector(**kwargs)


STEP = re.escape("FaultInjector step (a trainer.global_step)")
FIRST_RANK = re.escape("FaultInjector ranks[0] (a global rank)")
SECOND_RANK = re.escape("FaultInjector ranks[1] (a global rank)")


@pytest.mark.parametrize(
    ("kwargs", "setting", "value"),
    [
        ({"step": -1}, STEP, -1),
        ({"step": 2.5}, STEP, 2.5),
        ({"step": math.nan}, STEP, math.nan),
        ({"step": True}, STEP, True),
        ({"step": 0, "ranks": [-1]}, FIRST_RANK, -1),
        ({"step": 0, "ranks": [0, 1.5]}, SECOND_RANK, 1.5),
        ({"step": 0, "ranks": [False]}, FIRST_RANK, False),
    ],
)
def test_step_and_ranks_are_whole_numbers(kwargs: dict[str, Any], setting: str, value: object) -> None:
    with pytest.raises(SettingError, match=rf"^{setting} must be a whole number >= 0; got ") as err:
        FaultInjector("loss", **kwargs)
    assert repr(value) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    injector = FaultInjector("loss", step=3.0, ranks=(0.0, "1"))
    assert (injector.step, injector.ranks) == (3, [0, 1])
    assert type(injector.step) is int and all(type(rank) is int for rank in injector.ranks)
