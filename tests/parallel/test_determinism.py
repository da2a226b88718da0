"""Deterministic mode's environment (parallel/determinism.py): what it sets, what it refuses, what it gives back."""

from __future__ import annotations

import pytest

from lightning_llama_fp8.parallel.determinism import (
    DeterminismError,
    DeterministicMode,
    enter,
    environment_problems,
    leave,
    nccl_algo_is_deterministic,
)


@pytest.mark.parametrize("value", ["Ring", "tree", "Ring,Tree", " CollnetDirect , CollnetChain ", "^NVLS", "^nvls"])
def test_nccl_algorithms_megatron_lm_accepts(value: str) -> None:
    assert nccl_algo_is_deterministic(value)


@pytest.mark.parametrize("value", ["NVLS", "NVLSTree", "Ring,NVLS", "^Tree", "PAT", ""])
def test_nccl_algorithms_that_may_reduce_in_no_fixed_order(value: str) -> None:
    assert not nccl_algo_is_deterministic(value)


def test_enter_sets_only_what_is_unset_and_leave_gives_it_back() -> None:
    environ = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":16:8", "OTHER": "x"}
    mode = DeterministicMode(on=True)
    enter(mode, environ)
    assert environ == {
        "NCCL_ALGO": "Ring",  # the user's deterministic choice is kept
        "CUBLAS_WORKSPACE_CONFIG": ":16:8",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "OTHER": "x",
    }
    leave(mode, environ)
    assert environ == {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":16:8", "OTHER": "x"}
    leave(mode, environ)  # twice is harmless
    assert environ["NCCL_ALGO"] == "Ring"


def test_an_empty_variable_counts_as_unset_and_comes_back_empty() -> None:
    environ = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": ""}
    mode = DeterministicMode(on=True)
    enter(mode, environ)
    assert environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0" and environ["NCCL_ALGO"] == "^NVLS"
    leave(mode, environ)
    assert environ == {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": ""}


def test_mode_off_changes_nothing() -> None:
    environ = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "1"}
    enter(DeterministicMode(on=False), environ)
    assert environ == {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "1"}


def test_every_conflict_is_named_at_once_and_nothing_is_changed() -> None:
    environ = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "yes", "NCCL_ALGO": "NVLS", "CUBLAS_WORKSPACE_CONFIG": ":4096:2"}
    with pytest.raises(DeterminismError) as raised:
        enter(DeterministicMode(on=True), dict(environ))
    message = str(raised.value)
    assert "NVTE_ALLOW_NONDETERMINISTIC_ALGO=yes" in message and "unset it (deterministic mode sets 0)" in message
    assert "NCCL_ALGO=NVLS" in message and "CUBLAS_WORKSPACE_CONFIG=:4096:2" in message
    assert "drop deterministic=True" in message
    original = dict(environ)
    with pytest.raises(DeterminismError):
        enter(DeterministicMode(on=True), environ)
    assert environ == original


def test_zero_written_another_way_is_zero() -> None:
    assert environment_problems({"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "00"}) == []
    assert environment_problems({"NVTE_ALLOW_NONDETERMINISTIC_ALGO": " 0 "}) == []


def test_description_names_the_mode() -> None:
    assert DeterministicMode(on=False).describe().startswith("Deterministic mode: off")
    on = DeterministicMode(on=True).describe()
    assert on.startswith("Deterministic mode: on (Trainer(deterministic=True))") and "deterministic_mode" in on
    assert "no such warning appears" in DeterministicMode(on=True, warn_only=True).describe()
