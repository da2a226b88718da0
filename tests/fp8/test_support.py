"""Whether this machine runs an FP8 recipe (fp8/support.py), and why not: on the CPU, and on fake GPU machines
(``fake_machine``: torch.cuda answers plus Transformer Engine's support checks with TE's own reasons)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch

from lightning_llama_fp8.fp8.recipes import RECIPES
from lightning_llama_fp8.fp8.support import FP8UnavailableError, fp8_support, supported_recipes
from lightning_llama_fp8.precision import TEFP8Precision
from tests.helpers.gpus import A100, B200, H100, L40S_CUDA_12_8, Machine, no_gpu


@no_gpu
def test_fp8_support_without_gpu() -> None:
    ok, reason = fp8_support()
    assert ok is False
    assert "no CUDA GPU is visible" in reason
    for recipe in ("delayed", "current", "tensorwise", "blockwise", "mxfp8"):
        assert fp8_support(recipe)[0] is False
        assert fp8_support(recipe, fp8_attention=True)[0] is False
    assert supported_recipes() == ()


@no_gpu
@pytest.mark.parametrize("cuda,hint", [(None, "CPU-only build"), ("13.0", "driver >= 580")])
def test_fp8_support_without_gpu_says_why_torch_sees_none(
    cuda: str | None, hint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert hint in fp8_support()[1]


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        (H100, ("delayed", "current", "blockwise")),
        (B200, RECIPES),
        (L40S_CUDA_12_8, ("delayed", "current")),
        (A100, ()),
    ],
    ids=["h100", "b200", "l40s", "a100"],
)
def test_supported_recipes(
    fake_machine: Callable[[Machine], None], machine: Machine, expected: tuple[str, ...]
) -> None:
    fake_machine(machine)
    assert supported_recipes() == expected


def test_fp8_support_reason_on_a_gpu(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(H100)
    assert fp8_support("delayed") == (
        True,
        "NVIDIA H100 80GB HBM3 (compute capability 9.0) supports delayed FP8 (Transformer Engine 2.20.2).",
    )
    assert fp8_support("tensorwise", fp8_attention=True) == (
        True,
        "NVIDIA H100 80GB HBM3 (compute capability 9.0) supports current FP8 with FP8 attention "
        "(Transformer Engine 2.20.2).",
    )
    assert fp8_support("mxfp8") == (
        False,
        "NVIDIA H100 80GB HBM3 (compute capability 9.0) cannot run mxfp8 FP8: Device compute capability 10.0 or "
        "higher required for MXFP8 execution. (transformer_engine.pytorch.is_mxfp8_available).",
    )


@pytest.mark.parametrize(
    ("machine", "recipe", "needs"),
    [
        (
            Machine("NVIDIA H100", (9, 0), te_version="2.8.0"),
            "current",
            "FP8 attention with current needs Transformer Engine >= 2.9, this is 2.8.0",
        ),
        (
            Machine("NVIDIA B200", (10, 0), te_version="2.15.0"),
            "mxfp8",
            "FP8 attention with mxfp8 needs Transformer Engine >= 2.16, this is 2.15.0",
        ),
    ],
)
def test_fp8_attention_needs_a_newer_te(
    fake_machine: Callable[[Machine], None], machine: Machine, recipe: str, needs: str
) -> None:
    fake_machine(machine)
    assert fp8_support(recipe)[0] is True  # the recipe itself runs
    ok, reason = fp8_support(recipe, fp8_attention=True)
    assert ok is False
    assert reason.startswith(needs)
    with pytest.raises(FP8UnavailableError) as excinfo:
        TEFP8Precision(recipe=recipe, fp8_attention=True).check_supported()  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert message.startswith(f"FP8 training ({recipe} scaling, FP8 attention) is not possible here: {needs}")
    assert f"The {recipe} recipe itself works here with fp8_attention=False." in message


def test_fp8_attention_with_new_enough_te(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(Machine("NVIDIA B200", (10, 0), te_version="2.16.0"))
    for recipe in ("delayed", "current", "mxfp8"):
        assert fp8_support(recipe, fp8_attention=True)[0] is True, recipe
    assert fp8_support("blockwise", fp8_attention=True) == (
        False,
        "FP8 attention is not available with the blockwise recipe.",
    )


def test_recipe_needs_a_newer_te(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(Machine("NVIDIA H100", (9, 0), te_version="2.2.1"))
    assert fp8_support("current")[0] is True
    ok, reason = fp8_support("blockwise")
    assert (ok, reason) == (
        False,
        "the blockwise recipe needs Transformer Engine >= 2.3.0.dev0, this is 2.2.1 (on NVIDIA H100 (compute "
        "capability 9.0)).",
    )


def test_te_without_the_check(fake_machine: Callable[[Machine], None]) -> None:
    fake_machine(Machine("NVIDIA B200", (10, 0), te_version="1.13.0", missing_checks=("is_mxfp8_available",)))
    ok, reason = fp8_support("mxfp8")
    assert ok is False
    assert reason == (
        "Transformer Engine 1.13.0 has no transformer_engine.pytorch.is_mxfp8_available(): "
        "too old for the mxfp8 recipe."
    )


def test_te_not_importable_on_a_gpu(fake_machine: Callable[[Machine], None], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine(H100)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    ok, reason = fp8_support("delayed")
    assert ok is False
    assert reason.startswith("Transformer Engine is not importable on NVIDIA H100 80GB HBM3 (compute capability 9.0)")
