"""fp8_state on the CPU: fake TE modules whose ``fp8_meta`` has the shape of TE 2.x delayed-scaling state.

TE 2.x keeps ``fp8_meta["scaling_fwd"|"scaling_bwd"]`` as ``DelayedScalingRecipeState`` objects with float32
``amax_history`` ``[history_len, num_tensors]`` and ``scale`` ``[num_tensors]`` (3 forward tensors per GEMM:
input, weight, output; 2 backward: grad-output, grad-input). ``FakeState`` has just those two attributes.
All values are powers of two, so every assertion is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from lightning_llama_fp8.fp8.state import (
    any_nonfinite,
    fp8_modules,
    fp8_scaling_summary,
    fp8_state_tensors,
    latest_amax,
    load_fp8_state,
    nonfinite_fp8_state,
    save_fp8_state,
    scaling_summary,
)


@dataclass
class FakeState:
    amax_history: Tensor
    scale: Tensor


class FakeTELinear(nn.Linear):
    """An nn.Linear carrying TE-shaped delayed-scaling state (one GEMM: 3 forward and 2 backward tensors)."""

    def __init__(self, history_len: int = 4) -> None:
        super().__init__(2, 2)
        self.fp8_meta = {
            "fp8_checkpoint": False,
            "recipe": None,
            "scaling_fwd": FakeState(torch.zeros(history_len, 3), torch.ones(3)),
            "scaling_bwd": FakeState(torch.zeros(history_len, 2), torch.ones(2)),
        }

    def fwd(self) -> FakeState:
        return self.fp8_meta["scaling_fwd"]

    def bwd(self) -> FakeState:
        return self.fp8_meta["scaling_bwd"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2)  # no fp8_meta
        self.qkv = FakeTELinear()
        self.proj = FakeTELinear()


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(2, 4)


FP8_NAMES = ["layers.0.qkv", "layers.0.proj", "layers.1.qkv", "layers.1.proj"]


# ---------------------------------------------------------------------------------------------- fp8_modules
def test_fp8_modules_finds_only_modules_with_delayed_scaling_state_in_named_modules_order() -> None:
    model = Model()
    found = list(fp8_modules(model))
    assert [name for name, _ in found] == FP8_NAMES
    assert found[0][1] is model.layers[0].qkv


def test_fp8_modules_skips_state_te_has_not_created_yet_or_that_has_no_history() -> None:
    model = Model()
    # TE creates the scaling entries in the first forward under autocast: before that fp8_meta has no such keys.
    del model.layers[0].qkv.fp8_meta["scaling_fwd"], model.layers[0].qkv.fp8_meta["scaling_bwd"]

    # Current scaling / MXFP8 recipe states carry no amax_history (scales are computed on the fly).
    class CurrentScalingState:
        pass

    model.layers[0].proj.fp8_meta["scaling_fwd"] = CurrentScalingState()
    model.layers[1].qkv.fp8_meta = "not a dict"
    assert [name for name, _ in fp8_modules(model)] == ["layers.1.proj"]


# ---------------------------------------------------------------------------------------------- latest amax
def test_latest_amax_prefers_staged_row_zero_and_falls_back_to_the_rotated_last_row() -> None:
    history = torch.tensor(
        [
            [0.0, 8.0, float("nan")],  # row 0: staged this pass (tensor 0 not yet seen)
            [1.0, 1.0, 1.0],
            [2.0, 4.0, 0.5],  # last row: newest amax folded in by TE's update
        ]
    )
    got = latest_amax(history)
    assert got[:2].tolist() == [2.0, 8.0]
    assert math.isnan(got[2].item())


# ---------------------------------------------------------------------------------------------- summary
def test_summary_reads_the_last_row_after_tes_update_and_the_scale_range() -> None:
    model = Model()
    qkv = model.layers[0].qkv
    # As TE leaves it after a step: row 0 zeroed, newest amaxes in the last row, older ones above.
    qkv.fwd().amax_history.copy_(
        torch.tensor([[0.0, 0.0, 0.0], [64.0, 64.0, 64.0], [32.0, 64.0, 32.0], [2.0, 0.5, 4.0]])
    )
    qkv.fwd().scale.copy_(torch.tensor([0.25, 8.0, 2.0]))
    qkv.bwd().amax_history.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.125, 16.0]]))
    qkv.bwd().scale.copy_(torch.tensor([4.0, 0.5]))

    summary = fp8_scaling_summary(model)

    assert list(summary) == FP8_NAMES
    assert summary["layers.0.qkv"] == {
        "fwd_amax": 4.0,  # newest row only; the larger 64s are older history
        "fwd_scale_min": 0.25,
        "fwd_scale_max": 8.0,
        "bwd_amax": 16.0,
        "bwd_scale_min": 0.5,
        "bwd_scale_max": 4.0,
        "history_len": 4,
    }
    # Untouched modules: fresh TE state (zero history, unit scales).
    assert summary["layers.1.proj"] == {
        "fwd_amax": 0.0,
        "fwd_scale_min": 1.0,
        "fwd_scale_max": 1.0,
        "bwd_amax": 0.0,
        "bwd_scale_min": 1.0,
        "bwd_scale_max": 1.0,
        "history_len": 4,
    }


def test_summary_reads_staged_row_zero_mid_step_and_handles_history_len_one() -> None:
    model = nn.ModuleDict({"a": FakeTELinear(history_len=1), "b": FakeTELinear(history_len=3)})
    model["a"].fwd().amax_history.copy_(torch.tensor([[0.5, 2.0, 1.0]]))  # staged, before TE's update
    model["b"].fwd().amax_history.copy_(torch.tensor([[0.0, 16.0, 0.0], [32.0, 32.0, 32.0], [1.0, 1.0, 2.0]]))
    summary = fp8_scaling_summary(model)
    assert summary["a"]["fwd_amax"] == 2.0
    assert summary["a"]["history_len"] == 1
    # Tensor 1 has a staged amax (16), tensors 0 and 2 fall back to their last row (1, 2): max is 16.
    assert summary["b"]["fwd_amax"] == 16.0
    assert summary["b"]["history_len"] == 3


def test_summary_makes_one_device_to_host_copy_for_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model()
    copies: list[tuple[int, ...]] = []
    tolist, item, cpu = Tensor.tolist, Tensor.item, Tensor.cpu

    def counting(original):  # type: ignore[no-untyped-def]
        def wrapper(self: Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            copies.append(tuple(self.shape))
            return original(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(Tensor, "tolist", counting(tolist))
    monkeypatch.setattr(Tensor, "item", counting(item))
    monkeypatch.setattr(Tensor, "cpu", counting(cpu))
    summary = fp8_scaling_summary(model)
    monkeypatch.undo()

    assert len(summary) == 4
    assert copies == [(4, 6)]  # one [modules, values] table


def test_summary_propagates_nan_and_scaling_summary_takes_a_cached_module_list() -> None:
    model = Model()
    model.layers[1].proj.bwd().scale[1] = float("nan")
    cached = [(name, module) for name, module in model.named_modules() if name.endswith("proj")]
    summary = scaling_summary(cached)
    assert list(summary) == ["layers.0.proj", "layers.1.proj"]
    assert math.isnan(summary["layers.1.proj"]["bwd_scale_min"])
    assert summary["layers.0.proj"]["bwd_scale_min"] == 1.0
    assert scaling_summary([("norm", nn.LayerNorm(2))]) == {}
    assert fp8_scaling_summary(nn.Linear(2, 2)) == {}


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_fp8_state_lists_bad_modules_in_forward_order() -> None:
    model = Model()
    assert nonfinite_fp8_state(model) == []
    model.layers[1].qkv.bwd().amax_history[2, 1] = float("inf")
    model.layers[0].proj.fwd().scale[0] = float("nan")
    assert nonfinite_fp8_state(model) == ["layers.0.proj", "layers.1.qkv"]


def test_nonfinite_fp8_state_does_not_flag_flt_max_scales() -> None:
    # TE sets scale = FLT_MAX when an amax is tiny; a sum over such scales would overflow to inf.
    model = Model()
    model.layers[0].qkv.fwd().scale.fill_(torch.finfo(torch.float32).max)
    assert nonfinite_fp8_state(model) == []
    assert nonfinite_fp8_state(nn.Linear(2, 2)) == []


def test_fp8_state_tensors_are_the_live_tensors_and_any_nonfinite_sees_nan_and_inf_only() -> None:
    model = Model()
    tensors = fp8_state_tensors(model)
    # 4 FP8 modules x (fwd, bwd) x (amax_history, scale), TE's own objects (so in-place writes show up).
    assert len(tensors) == 16 and tensors[0] is model.layers[0].qkv.fwd().amax_history
    assert not bool(any_nonfinite(tensors))
    model.layers[0].qkv.fwd().scale.fill_(torch.finfo(torch.float32).max)  # TE's scale for a tiny amax
    assert not bool(any_nonfinite(tensors))
    model.layers[1].proj.bwd().amax_history[3, 1] = float("inf")
    assert bool(any_nonfinite(tensors))
    model.layers[1].proj.bwd().amax_history[3, 1] = float("nan")
    assert bool(any_nonfinite(tensors))
    assert fp8_state_tensors(nn.Linear(2, 2)) == [] and not bool(any_nonfinite([]))


# ---------------------------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip_in_place() -> None:
    model = Model()
    qkv = model.layers[0].qkv
    qkv.fwd().amax_history[-1] = torch.tensor([1.0, 2.0, 4.0])
    qkv.bwd().scale.copy_(torch.tensor([0.5, 0.25]))
    snapshot = save_fp8_state(model)

    assert list(snapshot) == FP8_NAMES
    assert set(snapshot["layers.0.qkv"]) == {
        "scaling_fwd.amax_history",
        "scaling_fwd.scale",
        "scaling_bwd.amax_history",
        "scaling_bwd.scale",
    }
    assert snapshot["layers.0.qkv"]["scaling_fwd.amax_history"][-1].tolist() == [1.0, 2.0, 4.0]
    # Copies, not references: later changes to the module do not reach the snapshot.
    assert snapshot["layers.0.qkv"]["scaling_fwd.amax_history"].data_ptr() != qkv.fwd().amax_history.data_ptr()

    history_obj, scale_obj = qkv.fwd().amax_history, qkv.bwd().scale
    qkv.fwd().amax_history.fill_(float("nan"))
    qkv.bwd().scale.fill_(float("inf"))
    assert nonfinite_fp8_state(model) == ["layers.0.qkv"]

    load_fp8_state(model, snapshot)

    assert nonfinite_fp8_state(model) == []
    assert qkv.fwd().amax_history[-1].tolist() == [1.0, 2.0, 4.0]
    assert qkv.fwd().amax_history[:-1].abs().sum().item() == 0.0
    assert qkv.bwd().scale.tolist() == [0.5, 0.25]
    # Same tensor objects as before: TE's global buffers and quantizers keep pointing at live state.
    assert qkv.fwd().amax_history is history_obj
    assert qkv.bwd().scale is scale_obj


def test_load_names_the_module_when_shapes_differ_and_copies_nothing() -> None:
    model = Model()
    snapshot = save_fp8_state(model)
    snapshot["layers.0.qkv"]["scaling_fwd.scale"].fill_(2.0)
    snapshot["layers.1.proj"]["scaling_bwd.amax_history"] = torch.zeros(8, 2)  # other amax_history_len
    with pytest.raises(ValueError, match=r"'layers\.1\.proj'.*scaling_bwd\.amax_history.*\(8, 2\).*\(4, 2\)"):
        load_fp8_state(model, snapshot)
    assert model.layers[0].qkv.fwd().scale.tolist() == [1.0, 1.0, 1.0]  # checked before copying anything


def test_load_names_missing_unexpected_modules_and_keys() -> None:
    model = Model()
    snapshot = save_fp8_state(model)
    snapshot["layers.7.qkv"] = snapshot.pop("layers.1.qkv")
    with pytest.raises(ValueError, match=r"no saved state for FP8 module\(s\) 'layers\.1\.qkv'.*'layers\.7\.qkv'"):
        load_fp8_state(model, snapshot)

    snapshot = save_fp8_state(model)
    del snapshot["layers.0.proj"]["scaling_fwd.scale"]
    with pytest.raises(ValueError, match=r"module 'layers\.0\.proj' has keys"):
        load_fp8_state(model, snapshot)


def test_nonfinite_fp8_state_by_direction() -> None:
    """Forward state locates where a NaN first appeared; backward state goes bad in every layer it crosses."""
    from lightning_llama_fp8.fp8.state import nonfinite_fp8_state as nonfinite

    class State:
        def __init__(self) -> None:
            self.amax_history, self.scale = torch.ones(3, 2), torch.ones(2)

    def layer() -> torch.nn.Module:
        module = torch.nn.Linear(1, 1)
        module.fp8_meta = {"scaling_fwd": State(), "scaling_bwd": State()}  # type: ignore[assignment]
        return module

    model = torch.nn.Sequential(layer(), layer(), layer())
    model[0].fp8_meta["scaling_bwd"].amax_history[0, 1] = float("nan")  # gradient crossed layers 0 and 1
    model[1].fp8_meta["scaling_bwd"].amax_history[0, 0] = float("nan")
    model[1].fp8_meta["scaling_fwd"].amax_history[0, 0] = float("inf")  # the input of layer 1 went bad
    assert nonfinite(model) == ["0", "1"]
    assert nonfinite(model, direction="fwd") == ["1"]
    assert nonfinite(model, direction="bwd") == ["0", "1"]
