"""NaNGuard's decisions and policies on small torch modules under Lightning (1 process, and 2 gloo processes)."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_llama_fp8.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError, nonfinite_tensors
from lightning_llama_fp8.validate import SettingError
from tests.helpers import cpu_trainer, megatron_cpu_trainer, run_distributed


class ScalingState:
    """The shape of Transformer Engine's delayed-scaling state (``fp8_meta["scaling_fwd"]``)."""

    def __init__(self, tensors: int) -> None:
        self.amax_history = torch.ones(4, tensors)
        self.scale = torch.ones(tensors)


FP8_E4M3_MAX = 448.0


class FakeFP8Linear(nn.Linear):
    """A linear layer carrying TE-style FP8 scaling state, which its forward updates like TE does.

    With ``saturate`` its input goes through a saturating cast first, as in TE's FP8 GEMMs: an Inf input
    becomes +-448 for both the output and the weight gradient, and only the recorded amax is Inf.
    """

    def __init__(self, saturate: bool = False) -> None:
        super().__init__(4, 4)
        self.fp8_meta = {"scaling_fwd": ScalingState(3), "scaling_bwd": ScalingState(2)}
        self.saturate = saturate

    def forward(self, x: Tensor) -> Tensor:
        if self.saturate:
            self.fp8_meta["scaling_fwd"].amax_history[0] = _te_amax(x)
            return super().forward(x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX))
        out = super().forward(x)
        self.fp8_meta["scaling_fwd"].amax_history[0] = _te_amax(out)
        return out


def _te_amax(tensor: Tensor) -> Tensor:
    # TE records each pass's amax in row 0 of the history. Its kernels take the max with fmaxf, which skips NaN:
    # an Inf activation poisons the amax, a NaN one does not.
    return torch.nan_to_num(tensor.detach().abs(), nan=0.0, posinf=torch.inf).max()


class TinyModule(LightningModule):
    """Two layers; optionally poisons the loss or one gradient at ``poison_step`` on ``poison_ranks``."""

    def __init__(
        self,
        poison_steps: tuple[int, ...] = (),
        poison: str = "loss",
        poison_ranks: tuple[int, ...] | None = None,
        optimizer: str = "adamw",
        poison_value: float = float("inf"),
        saturate_fp8: bool = False,
    ) -> None:
        super().__init__()
        self.fp8_layer = FakeFP8Linear(saturate=saturate_fp8)
        self.head = nn.Linear(4, 1)
        self.poison_steps, self.poison, self.poison_ranks = poison_steps, poison, poison_ranks
        self.optimizer_name, self.poison_value = optimizer, poison_value
        self.last_loss: Tensor | None = None
        self.weights_at_step_start: list[Tensor] = []
        self.head.weight.register_hook(self._maybe_poison_gradient)

    def _poisoned_now(self) -> bool:
        rank_ok = self.poison_ranks is None or self.global_rank in self.poison_ranks
        return self.global_step in self.poison_steps and rank_ok

    def _maybe_poison_gradient(self, grad: Tensor) -> Tensor:
        if self.poison == "gradient" and self._poisoned_now():
            grad = grad.clone()
            grad[0, 0] = float("inf")
        return grad

    def weights(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()]).clone()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.weights_at_step_start.append(self.weights())
        if self.poison == "activation" and self._poisoned_now():
            batch = batch.clone()
            batch[0, 0] = self.poison_value  # one bad element: an Inf stays Inf through the layer (no inf - inf)
        hidden = self.fp8_layer(batch)
        loss = self.head(torch.relu(hidden)).pow(2).mean()
        if self.poison == "loss" and self._poisoned_now():
            loss = loss * float("nan")
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


def loader() -> DataLoader:
    return DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


def fit(module: TinyModule, guard: NaNGuard, steps: int = 6, **trainer_kwargs: Any) -> Trainer:
    trainer_kwargs.setdefault("callbacks", [guard])
    trainer = cpu_trainer(max_steps=steps, **trainer_kwargs)
    trainer.fit(module, loader())
    return trainer


# ---------------------------------------------------------------------------------------------- arguments
def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="policy must be one of raise, skip, rollback"):
        NaNGuard(policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_consecutive_bad_steps must be a whole number >= 1; got 0"):
        NaNGuard(max_consecutive_bad_steps=0)
    with pytest.raises(ValueError, match="only applies to policy='rollback'"):
        NaNGuard(policy="skip", bf16_steps_after_rollback=2)


@pytest.mark.parametrize(
    ("kwargs", "setting", "accepted"),
    [
        ({"max_consecutive_bad_steps": 2.5}, "max_consecutive_bad_steps", "a whole number >= 1"),
        ({"max_consecutive_bad_steps": math.nan}, "max_consecutive_bad_steps", "a whole number >= 1"),
        ({"max_consecutive_bad_steps": True}, "max_consecutive_bad_steps", "a whole number >= 1"),
        ({"policy": "rollback", "bf16_steps_after_rollback": -1}, "bf16_steps_after_rollback", "a whole number >= 0"),
        ({"policy": "rollback", "bf16_steps_after_rollback": 1.5}, "bf16_steps_after_rollback", "a whole number >= 0"),
        ({"max_reported_parameters": -1}, "max_reported_parameters", "a whole number >= 0"),
        ({"max_reported_parameters": 2.5}, "max_reported_parameters", "a whole number >= 0"),
        ({"max_reported_parameters": math.inf}, "max_reported_parameters", "a whole number >= 0"),
        ({"check_fp8_state": "false"}, "check_fp8_state", "true or false"),
    ],
)
def test_numbers_and_switches_are_what_they_look_like(kwargs: dict[str, Any], setting: str, accepted: str) -> None:
    """max_consecutive_bad_steps=2.5 used to be compared as a fraction, max_reported_parameters=-1 silently dropped
    the last parameter name from every report."""
    with pytest.raises(SettingError, match=rf"^NaNGuard {setting} must be {accepted}; got ") as err:
        NaNGuard(**kwargs)
    assert repr(kwargs[setting]) in str(err.value)


def test_whole_numbers_from_yaml_are_taken_as_ints() -> None:
    guard = NaNGuard(policy="rollback", max_consecutive_bad_steps=5.0, bf16_steps_after_rollback="2")
    assert (guard.max_consecutive_bad_steps, guard.bf16_steps_after_rollback) == (5, 2)
    assert type(guard.max_consecutive_bad_steps) is int and type(guard.bf16_steps_after_rollback) is int


def test_bad_report_dir_and_pattern_are_rejected_when_built(tmp_path: Path) -> None:
    # Not at the first bad step, where the run the guard should rescue would die of it.
    file = tmp_path / "reports"
    file.write_text("")
    with pytest.raises(ValueError, match=r"report_dir .*reports is a file; give a directory"):
        NaNGuard(report_dir=file)
    with pytest.raises(ValueError, match=r"watch_outputs 'layers\(' is not a regular expression: missing \)"):
        NaNGuard(watch_outputs="layers(")


def test_bf16_window_needs_a_plugin_that_can_switch_fp8_off(tmp_path: Path) -> None:
    guard = NaNGuard(policy="rollback", bf16_steps_after_rollback=2, report_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a precision plugin that can switch FP8 off"):
        fit(TinyModule(), guard)


# ---------------------------------------------------------------------------------------------- policies
def test_clean_run_takes_no_action(tmp_path: Path) -> None:
    module, guard = TinyModule(), NaNGuard(policy="skip", report_dir=tmp_path)
    fit(module, guard)
    assert guard.bad_steps == [] and guard.reports == []
    starts = module.weights_at_step_start
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_skip_drops_exactly_the_bad_update_and_continues(tmp_path: Path, optimizer: str) -> None:
    module, guard = TinyModule(poison_steps=(2,), optimizer=optimizer), NaNGuard(policy="skip", report_dir=tmp_path)
    trainer = fit(module, guard)
    assert trainer.global_step == 6  # training went on
    assert guard.bad_steps == [2]
    starts = module.weights_at_step_start
    assert torch.equal(starts[3], starts[2])  # step 2's update was dropped (AdamW: no weight decay, no moments)
    assert not torch.equal(starts[4], starts[3])  # the next step updated again
    assert all(torch.isfinite(w).all() for w in starts) and torch.isfinite(module.weights()).all()

    report = json.loads((tmp_path / "nan_report_step0000002.json").read_text())
    assert report["step"] == 2 and report["action"] == "skip" and report["loss_nonfinite"] is True
    assert report["ranks_with_nonfinite_loss"] == [0]
    assert set(report["ranks"][0]["nonfinite_gradients"]) == {name for name, _ in module.named_parameters()}


def test_raise_stops_before_the_update_with_a_report(tmp_path: Path) -> None:
    module, guard = TinyModule(poison_steps=(1,), poison="gradient"), NaNGuard(policy="raise", report_dir=tmp_path)
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite gradients at step 1 .*head\.weight"):
        fit(module, guard)
    assert torch.equal(module.weights(), module.weights_at_step_start[1])  # the bad update never happened
    report = json.loads((tmp_path / "nan_report_step0000001.json").read_text())
    assert report["loss_nonfinite"] is False and report["gradients_nonfinite"] is True
    assert report["ranks"][0]["nonfinite_gradients"] == ["head.weight"]  # only the poisoned parameter
    assert report["action"] == "raise"


def test_too_many_consecutive_bad_steps_end_training(tmp_path: Path) -> None:
    module = TinyModule(poison_steps=(1, 2, 3))
    guard = NaNGuard(policy="skip", max_consecutive_bad_steps=2, report_dir=tmp_path)
    with pytest.raises(NonFiniteTrainingError, match="3 bad steps in a row \\(limit 2\\)"):
        fit(module, guard)
    assert guard.bad_steps == [1, 2, 3]
    assert torch.equal(module.weights(), module.weights_at_step_start[1])  # no bad update got through


def test_isolated_bad_steps_reset_the_consecutive_count(tmp_path: Path) -> None:
    module = TinyModule(poison_steps=(1, 3, 5))
    guard = NaNGuard(policy="skip", max_consecutive_bad_steps=1, report_dir=tmp_path)
    fit(module, guard, steps=7)
    assert guard.bad_steps == [1, 3, 5] and guard.consecutive_bad_steps == 0


def test_rollback_restores_the_fp8_scaling_state_and_names_the_layer(tmp_path: Path) -> None:
    module = TinyModule(poison_steps=(3,), poison="activation")
    guard = NaNGuard(policy="rollback", report_dir=tmp_path)
    histories: list[Tensor] = []

    class RecordHistory(Callback):  # runs after the guard: the state the next step will start from
        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            histories.append(module.fp8_layer.fp8_meta["scaling_fwd"].amax_history.clone())

    fit(module, guard, steps=5, callbacks=[guard, RecordHistory()])
    assert guard.bad_steps == [3]
    report = json.loads((tmp_path / "nan_report_step0000003.json").read_text())
    assert report["first_nonfinite_fp8_module"] == report["first_nonfinite_fp8_forward_module"] == "fp8_layer"
    assert report["ranks"][0]["fp8_state"]["fp8_layer"] is not None
    # After the bad step the amax history is step 2's again (finite), not the NaN the bad forward wrote.
    assert torch.equal(histories[3], histories[2]) and torch.isfinite(histories[3]).all()
    assert torch.equal(module.weights_at_step_start[4], module.weights_at_step_start[3])
    assert torch.isfinite(module.weights()).all()


class SwitchablePrecision(Precision):
    """Stands in for TEFP8Precision's FP8 switch (no TE on CPU): records when FP8 goes off and on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []
        self.trainer: Trainer | None = None

    def set_fp8_enabled(self, module: nn.Module, enabled: bool) -> None:
        assert self.trainer is not None
        self.calls.append((self.trainer.global_step, enabled))


def test_rollback_runs_the_next_steps_without_fp8_then_switches_back(tmp_path: Path) -> None:
    module, plugin = TinyModule(poison_steps=(2,)), SwitchablePrecision()
    guard = NaNGuard(policy="rollback", bf16_steps_after_rollback=2, report_dir=tmp_path)
    trainer = cpu_trainer(max_steps=7, callbacks=[guard], plugins=[plugin])
    plugin.trainer = trainer
    trainer.fit(module, loader())
    # Off during bad step 2 (its update vetoed), steps 3 and 4 in BF16, FP8 back on once step 4 has ended.
    assert plugin.calls == [(2, False), (5, True)]


def test_refuses_a_checkpoint_with_non_finite_weights(tmp_path: Path) -> None:
    assert nonfinite_tensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.arange(3)}) == [
        "b"
    ]
    guard = NaNGuard()
    trainer = cpu_trainer()
    with pytest.raises(NonFiniteTrainingError, match=r"Refusing to write a checkpoint .*layer\.weight"):
        guard.on_save_checkpoint(trainer, TinyModule(), {"state_dict": {"layer.weight": torch.tensor([float("nan")])}})
    guard.on_save_checkpoint(trainer, TinyModule(), {"state_dict": {"layer.weight": torch.ones(3)}})  # fine


# ---------------------------------------------------------------------------------------------- 2 processes
def _two_rank_worker(rank: int, world_size: int, policy: str, report_dir: str) -> dict[str, Any]:
    module = TinyModule(poison_steps=(2,), poison="gradient", poison_ranks=(1,))
    guard = NaNGuard(policy=policy, report_dir=report_dir)  # type: ignore[arg-type]
    trainer = megatron_cpu_trainer(world_size, max_steps=4, callbacks=[guard])
    error = ""
    try:
        trainer.fit(module, loader())
    except NonFiniteTrainingError as exc:
        error = str(exc)
    starts = module.weights_at_step_start
    return {
        "bad_steps": guard.bad_steps,
        "error": error,
        "step2_update_dropped": len(starts) > 3 and torch.equal(starts[3], starts[2]),
        "finite": bool(torch.isfinite(module.weights()).all()),
        "global_step": trainer.global_step,
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", ["skip", "rollback", "raise"])
def test_all_ranks_take_the_same_decision(tmp_path: Path, policy: str) -> None:
    """Only rank 1's gradient goes bad; both ranks detect it at the same step and act alike."""
    results = run_distributed(_two_rank_worker, 2, tmp_path / "run", policy, str(tmp_path / "reports"))
    assert [r["bad_steps"] for r in results] == [[2], [2]]
    assert all(r["finite"] for r in results)
    report = json.loads((tmp_path / "reports" / "nan_report_step0000002.json").read_text())
    assert report["ranks_with_nonfinite_gradients"] == [1]
    assert report["ranks"][1]["nonfinite_gradients"] == ["head.weight"]
    if policy in ("skip", "rollback"):
        assert all(r["step2_update_dropped"] and r["global_step"] == 4 and not r["error"] for r in results)
    else:
        assert all("non-finite gradients at step 2" in r["error"] for r in results)


@pytest.mark.parametrize(("history_len", "check", "warns"), [(1, True, True), (1024, True, False), (1, False, False)])
def test_warns_that_the_fp8_state_check_is_blind_with_a_one_row_history(
    tmp_path: Path, history_len: int, check: bool, warns: bool
) -> None:
    from lightning_llama_fp8 import TEFP8Precision

    trainer = SimpleNamespace(precision_plugin=TEFP8Precision(amax_history_len=history_len), log_dir=str(tmp_path))
    guard = NaNGuard(report_dir=tmp_path, check_fp8_state=check)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.setup(trainer, TinyModule(), "fit")  # type: ignore[arg-type]
    blind = [w for w in caught if "cannot see an Inf in FP8 state with amax_history_len=1" in str(w.message)]
    assert bool(blind) == warns


def test_bf16_window_refused_with_fp8_weights(tmp_path: Path) -> None:
    from lightning_llama_fp8 import TEFP8Precision

    guard = NaNGuard(policy="rollback", bf16_steps_after_rollback=1, report_dir=tmp_path)
    with pytest.raises(ValueError, match="fp8_param_gather=True"):
        fit(TinyModule(), guard, plugins=[TEFP8Precision(fp8_param_gather=True)])


def test_guard_catches_what_the_fault_injector_puts_in(tmp_path: Path) -> None:
    """The two callbacks together, as a user would test a setup: NaN into one layer's output at step 3."""
    from lightning_llama_fp8.callbacks import FaultInjector

    module = TinyModule()
    injector = FaultInjector("activation", "fp8_layer", step=3)
    guard = NaNGuard(policy="skip", report_dir=tmp_path)
    fit(module, guard, callbacks=[injector, guard])
    assert [i["step"] for i in injector.injections] == [3]
    assert guard.bad_steps == [3]
    report = json.loads(guard.reports[0].read_text())
    assert report["loss_nonfinite"] and report["first_nonfinite_fp8_forward_module"] is None  # output, not input
    starts = module.weights_at_step_start
    assert torch.equal(starts[4], starts[3]) and torch.isfinite(module.weights()).all()


def test_nan_activation_is_located_by_the_output_watch_not_fp8_state(tmp_path: Path) -> None:
    """TE's amax skips NaN, so FP8 state cannot say where a NaN started; the watched outputs can."""
    module = TinyModule(poison_steps=(2,), poison="activation", poison_value=float("nan"))
    guard = NaNGuard(policy="skip", report_dir=tmp_path, watch_outputs=r"^(fp8_layer|head)$")
    fit(module, guard, steps=4)
    report = json.loads(guard.reports[0].read_text())
    assert report["first_nonfinite_output"] == "fp8_layer"
    assert report["ranks"][0]["nonfinite_outputs"] == ["fp8_layer", "head"]
    assert report["first_nonfinite_fp8_module"] is None  # as with TE: the NaN never reached the amax history
    assert "First watched module with a non-finite output: fp8_layer" in _summary_of(guard)


def test_skip_drops_inf_amaxes_from_the_fp8_history(tmp_path: Path) -> None:
    """Left in a max-over-history, an Inf amax would freeze that scale for up to amax_history_len steps."""
    module = TinyModule(poison_steps=(2,), poison="activation")  # Inf input: the amax goes Inf, as in TE
    guard = NaNGuard(policy="skip", report_dir=tmp_path)
    histories: list[Tensor] = []

    class RecordHistory(Callback):
        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            histories.append(module.fp8_layer.fp8_meta["scaling_fwd"].amax_history.clone())

    fit(module, guard, steps=4, callbacks=[guard, RecordHistory()])
    report = json.loads(guard.reports[0].read_text())
    assert report["first_nonfinite_fp8_forward_module"] == "fp8_layer"
    assert all(torch.isfinite(h).all() for h in histories)  # the Inf was zeroed before anything else saw it
    assert histories[2][0].eq(0).all()


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_inf_that_fp8_saturates_is_caught_through_the_fp8_state(tmp_path: Path, policy: str) -> None:
    """TE's casts turn an Inf into 448, so loss and gradients stay finite; only the amax history shows it."""
    module = TinyModule(poison_steps=(2,), poison="activation", saturate_fp8=True)
    guard = NaNGuard(policy=policy, report_dir=tmp_path)  # type: ignore[arg-type]
    histories: list[Tensor] = []

    class RecordHistory(Callback):
        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            histories.append(module.fp8_layer.fp8_meta["scaling_fwd"].amax_history.clone())

    fit(module, guard, steps=4, callbacks=[guard, RecordHistory()])
    assert guard.bad_steps == [2]
    report = json.loads(guard.reports[0].read_text())
    assert not report["loss_nonfinite"] and not report["gradients_nonfinite"] and report["fp8_state_nonfinite"]
    assert report["first_nonfinite_output"] is None  # the layer's output was finite (saturated)
    assert report["first_nonfinite_fp8_forward_module"] == "fp8_layer"
    assert "non-finite FP8 scaling state at step 2" in _summary_of(guard)
    starts = module.weights_at_step_start
    assert torch.equal(starts[3], starts[2])  # the update computed from saturated values was dropped
    assert all(torch.isfinite(h).all() for h in histories)


def test_without_the_fp8_state_check_a_saturated_inf_goes_unnoticed(tmp_path: Path) -> None:
    """Why the check exists: loss and gradients alone do not see it (the fake's clamp stands in for TE's cast)."""
    module = TinyModule(poison_steps=(2,), poison="activation", saturate_fp8=True)
    losses: list[float] = []

    class RecordLoss(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            losses.append(float(outputs["loss"]))

    guard = NaNGuard(policy="raise", report_dir=tmp_path, check_fp8_state=False)
    fit(module, guard, steps=4, callbacks=[guard, RecordLoss()])
    assert guard.bad_steps == [] and len(losses) == 4 and all(math.isfinite(x) for x in losses)


def _summary_of(guard: NaNGuard) -> str:
    from lightning_llama_fp8.callbacks.nan_guard import _summarize

    return _summarize({**json.loads(guard.reports[0].read_text()), "path": str(guard.reports[0])})
