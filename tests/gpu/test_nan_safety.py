"""Issue 4 on one GPU: injected NaN/Inf are caught in the same step, located, and recovered from; recipes train.

Small Llama (4 layers, hidden 1024), seq 2048, GBS 4, the recipe's optimizer with learning rates x 0.1 (the loss
on mock data then stays well above zero, so "within 2%" means something). Each injection runs 12 steps with the
fault at step 5.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from benchmarks.throughput import small_arch
from lightning_llama_fp8 import (
    LlamaLightningModule,
    MegatronPrecision,
    MockDataModule,
    TEFP8Precision,
)
from lightning_llama_fp8.callbacks import FaultInjector, NaNGuard, NonFiniteTrainingError
from tests.gpu.probes import StepProbe, fingerprint, one_gpu_trainer, short_run_optimizer

STEPS, FAULT_STEP, GBS = 12, 5, 4
ARCH = small_arch(num_layers=4, seq_length=2048)  # the ~60M-parameter Llama of the layout-equivalence runs
# Names as the callbacks see them once the strategy has wrapped the GPTModel in Megatron DDP.
ACTIVATION = "model.module.decoder.layers.1.mlp.linear_fc1"
GRADIENT = "model.module.decoder.layers.2.self_attention.linear_proj.weight"
INJECTIONS = {"activation": ACTIVATION, "gradient": GRADIENT, "loss": "model"}


def train(plugin: Any, callbacks: list[Callback], steps: int = STEPS) -> tuple[LlamaLightningModule, StepProbe]:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    # TE keeps every earlier model's amax histories in process-wide buffers and updates them all at each step;
    # this module trains many fresh models in one process, so start each from a clean TE state.
    FP8GlobalStateManager.reset()
    seed_everything(1234)
    probe = StepProbe()
    trainer = one_gpu_trainer(plugin, steps, [*callbacks, probe])
    optim = short_run_optimizer(steps)
    module = LlamaLightningModule(ARCH, optim)
    data = MockDataModule(seq_length=ARCH.seq_length, vocab_size=ARCH.vocab_size, global_batch_size=GBS)
    with contextlib.suppress(NonFiniteTrainingError):  # the raise policy; callers check the guard's state
        trainer.fit(module, datamodule=data)
    return module, probe


@pytest.fixture(scope="module")
def clean_losses() -> list[float]:
    _, probe = train(TEFP8Precision(fp8_param_gather=True), [NaNGuard(policy="raise")])
    assert all(math.isfinite(x) for x in probe.losses)
    return probe.losses


@pytest.mark.parametrize("policy", ["raise", "skip", "rollback"])
@pytest.mark.parametrize("target", ["activation", "gradient", "loss"])
def test_injected_fault_is_caught_located_and_recovered(
    target: str, policy: str, clean_losses: list[float], record: Any, tmp_path: Any
) -> None:
    guard = NaNGuard(policy=policy, report_dir=tmp_path)  # type: ignore[arg-type]
    injector = FaultInjector(target, INJECTIONS[target], step=FAULT_STEP)  # type: ignore[arg-type]
    module, probe = train(TEFP8Precision(fp8_param_gather=True), [injector, guard])
    report = json.loads(guard.reports[0].read_text()) if guard.reports else {}
    after = range(FAULT_STEP + 1, min(STEPS, len(probe.losses)))
    worst = max((abs(probe.losses[i] / clean_losses[i] - 1) for i in after), default=None)
    record(
        f"nan_{target}_{policy}",
        {
            "bad_steps": guard.bad_steps,
            "losses": probe.losses,
            "clean_losses": clean_losses,
            "worst_relative_loss_gap_after_fault": worst,
            "report": report,
        },
    )

    assert guard.bad_steps == [FAULT_STEP]  # detected in the very step (on the only rank)
    assert len(injector.injections) >= 1
    assert torch.isfinite(fingerprint(module)).all()  # no NaN reached the weights
    if target == "activation":  # NaN: located by the watched layer outputs (TE's amax skips NaN)
        assert report["first_nonfinite_output"] == "model.module.decoder.layers.1", report
    elif target == "gradient":
        assert report["ranks"][0]["nonfinite_gradients"] == [GRADIENT], report
        assert report["loss_nonfinite"] is False
    else:
        assert report["loss_nonfinite"] is True
    if policy == "raise":
        assert len(probe.losses) == FAULT_STEP  # stopped in step FAULT_STEP, before its update
        return
    assert len(probe.losses) == STEPS
    # The bad update was dropped: the weights at the start of the next step are those before the bad step.
    assert torch.equal(probe.fingerprints[FAULT_STEP + 1], probe.fingerprints[FAULT_STEP])
    assert not torch.equal(probe.fingerprints[FAULT_STEP + 2], probe.fingerprints[FAULT_STEP + 1])
    assert worst is not None and worst < 0.02, (worst, probe.losses, clean_losses)


def test_inf_activation_shows_in_fp8_state_and_is_cleaned_up(record: Any, tmp_path: Any) -> None:
    """An Inf (unlike a NaN) reaches TE's amax, while TE's saturating FP8 cast hides it from loss and gradients.

    The Inf goes into linear_fc1's output; SwiGLU carries it into linear_fc2's input, whose FP8 cast turns it into
    the largest FP8 value. The guard sees it in the FP8 state, names the module, drops the update and zeroes it.
    """
    from lightning_llama_fp8.fp8.state import nonfinite_fp8_state

    guard = NaNGuard(policy="skip", report_dir=tmp_path)
    injector = FaultInjector("activation", ACTIVATION, step=FAULT_STEP, value="inf")
    module, probe = train(TEFP8Precision(fp8_param_gather=True), [injector, guard])
    report = json.loads(guard.reports[0].read_text()) if guard.reports else {}
    record("nan_activation_inf_skip", {"bad_steps": guard.bad_steps, "losses": probe.losses, "report": report})
    assert guard.bad_steps == [FAULT_STEP]
    assert report["fp8_state_nonfinite"] is True
    assert (report["first_nonfinite_fp8_forward_module"] or "").startswith("model.module.decoder.layers.1.mlp."), report
    assert torch.equal(probe.fingerprints[FAULT_STEP + 1], probe.fingerprints[FAULT_STEP])  # update dropped
    assert torch.isfinite(fingerprint(module)).all()
    assert nonfinite_fp8_state(module) == []  # no Inf left in any amax history after training went on
    assert all(math.isfinite(x) for i, x in enumerate(probe.losses) if i != FAULT_STEP)


def test_rollback_with_bf16_steps_then_fp8_again(record: Any, tmp_path: Any) -> None:
    guard = NaNGuard(policy="rollback", bf16_steps_after_rollback=3, report_dir=tmp_path)
    injector = FaultInjector("activation", ACTIVATION, step=FAULT_STEP)
    plugin = TEFP8Precision(fp8_param_gather=False)
    module, probe = train(plugin, [injector, guard])
    record("nan_rollback_bf16_window", {"bad_steps": guard.bad_steps, "losses": probe.losses})
    assert guard.bad_steps == [FAULT_STEP] and len(probe.losses) == STEPS
    assert all(math.isfinite(x) for i, x in enumerate(probe.losses) if i != FAULT_STEP)
    assert not plugin._fp8_suspended  # FP8 came back after the BF16 window
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    assert all(c.fp8 == "hybrid" for c in configs.values() if hasattr(c, "fp8_recipe"))


def median_tokens_per_sec(module: LlamaLightningModule, warmup: int = 10) -> float:
    times = sorted(module.step_times[warmup:])
    return GBS * ARCH.seq_length / times[len(times) // 2]


@pytest.fixture(scope="module")
def bf16_run() -> dict[str, Any]:
    module, probe = train(MegatronPrecision(), [NaNGuard(policy="raise")], steps=100)
    return {"losses": probe.losses, "tokens_per_sec": median_tokens_per_sec(module)}


@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise"])
def test_recipe_trains_100_steps_without_nan(recipe: str, bf16_run: dict[str, Any], record: Any) -> None:
    steps = 100
    guard = NaNGuard(policy="raise")
    module, probe = train(TEFP8Precision(recipe=recipe, fp8_param_gather=True), [guard], steps=steps)
    tokens_per_sec = median_tokens_per_sec(module)
    record(
        f"recipe_{recipe}",
        {
            "steps": steps,
            "losses": probe.losses,
            "bf16_losses": bf16_run["losses"],
            "tokens_per_sec": tokens_per_sec,
            "bf16_tokens_per_sec": bf16_run["tokens_per_sec"],
            "bad_steps": guard.bad_steps,
        },
    )
    assert guard.bad_steps == [] and len(probe.losses) == steps
    assert all(math.isfinite(x) for x in probe.losses)
    assert probe.losses[-1] < probe.losses[0]


class TimedGuard(NaNGuard):
    """NaNGuard that times its per-step check, after waiting for the step's own GPU work (so only its own counts)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_seconds: list[float] = []

    def _nonfinite_flags(self, trainer: Any, pl_module: Any) -> tuple[bool, bool, bool]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        flags = super()._nonfinite_flags(trainer, pl_module)
        self.check_seconds.append(time.perf_counter() - start)
        return flags


def test_guard_costs_little(record: Any) -> None:
    """The per-step check (gradient buffers, FP8 state, one all-reduce and host sync) costs under 2% of a step.

    On this small model (a ~180 ms step) it measured 1.7 ms on an H200: a few small kernels, one read of the
    gradient buffer and one sync, so on the recipe's shapes (seconds per step) its share is far smaller. Timed
    directly, because the tokens/s of two separate runs differ by more than that from run to run at this size
    (both are recorded too, with and without the guard).
    """
    steps = 60
    plain, _ = train(TEFP8Precision(fp8_param_gather=True), [], steps=steps)
    guard = TimedGuard(policy="skip")
    guarded, _ = train(TEFP8Precision(fp8_param_gather=True), [guard], steps=steps)
    check = statistics.median(guard.check_seconds[10:])
    step = statistics.median(guarded.step_times[10:])
    record(
        "nan_guard_overhead",
        {
            "steps": steps,
            "median_check_s": check,
            "median_step_s": step,
            "check_share_of_step": check / step,
            "fp8_state_tensors_checked": len(guard._fp8_tensors or []),
            "tokens_per_sec_without_guard": median_tokens_per_sec(plain),
            "tokens_per_sec_with_guard": median_tokens_per_sec(guarded),
        },
    )
    assert guard._fp8_tensors and check < 0.02 * step, (check, step)
