"""The number rules every setting goes through (validate.py): whole numbers, finite reals, switches, and the machine."""

from __future__ import annotations

import argparse
import math

import pytest

from lightning_llama_fp8.validate import (
    SettingError,
    as_bool,
    as_float,
    as_int,
    as_optional_int,
    available_host_memory,
    float_argument,
    format_bytes,
    int_argument,
    usable_cpus,
)


@pytest.mark.parametrize(
    ("value", "expected"), [(256, 256), (256.0, 256), ("256", 256), (" 5e5 ", 500000), (10**30, 10**30)]
)
def test_whole_numbers_are_taken_as_ints(value: object, expected: int) -> None:
    result = as_int(value, "hidden_size", at_least=1)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (256.7, r"got 256\.7, which has a fractional part"),
        ("256.7", r"got '256\.7', which has a fractional part"),
        (True, r"got True \(bool\)"),
        (math.nan, r"got nan\."),
        (math.inf, r"got inf\."),
        ("1e400", r"got '1e400'\."),
        ("abc", r"got 'abc', which is not a number"),
        (None, r"got None \(NoneType\)"),
        ([4], r"got \[4\] \(list\)"),
        (0, r"got 0\."),
        (-3.0, r"got -3\.0\."),
    ],
)
def test_anything_else_is_refused_naming_the_setting_the_value_and_the_range(value: object, why: str) -> None:
    with pytest.raises(SettingError, match=r"^hidden_size must be a whole number >= 1; " + why) as err:
        as_int(value, "hidden_size", at_least=1)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError catch it


def test_whole_number_ranges() -> None:
    assert as_int(0, "seed", at_least=0, at_most=9) == 0
    with pytest.raises(SettingError, match=r"^seed must be a whole number >= 0 and <= 9; got 10\.$"):
        as_int(10, "seed", at_least=0, at_most=9)
    assert as_int(-5, "offset") == -5  # no range: any whole number
    assert as_optional_int(None, "train_samples", at_least=0) is None
    with pytest.raises(SettingError, match="train_samples must be a whole number >= 0; got -1"):
        as_optional_int(-1, "train_samples", at_least=0)


def test_finite_numbers() -> None:
    assert as_float("1e-5", "norm_epsilon", above=0) == 1e-5
    assert as_float(3, "x") == 3.0 and type(as_float(3, "x")) is float
    assert as_float(1, "fraction", at_least=0, at_most=1) == 1.0
    for value in (0, -1.0, math.nan, math.inf, -math.inf, "nan", 10**400):
        with pytest.raises(SettingError, match=r"^norm_epsilon must be a finite number > 0; got "):
            as_float(value, "norm_epsilon", above=0)
    with pytest.raises(SettingError, match=r"must be a finite number >= 0 and <= 1; got 1\.5"):
        as_float(1.5, "fraction", at_least=0, at_most=1)
    with pytest.raises(SettingError, match=r"got False \(bool\)"):
        as_float(False, "x")


def test_switches_are_true_or_false_only() -> None:
    assert as_bool(True, "tie_embeddings") is True
    for value in ("false", 0, 1, None):
        with pytest.raises(SettingError, match=r"^tie_embeddings must be true or false; got "):
            as_bool(value, "tie_embeddings")


def test_argparse_types(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--workers", type=int_argument(at_least=1))
    parser.add_argument("--size-gb", type=float_argument(above=0))
    args = parser.parse_args(["--workers", "4.0", "--size-gb", "0.5"])
    assert (args.workers, args.size_gb) == (4, 0.5)
    for argv, message in (
        (["--workers", "0"], "argument --workers: the value must be a whole number >= 1; got '0'."),
        (["--workers", "2.5"], "argument --workers: the value must be a whole number >= 1; got '2.5', which has a"),
        (["--size-gb", "nan"], "argument --size-gb: the value must be a finite number > 0; got 'nan'."),
        (["--size-gb", "-1"], "argument --size-gb: the value must be a finite number > 0; got '-1'."),
    ):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err


def test_the_machine() -> None:
    assert usable_cpus() >= 1
    available = available_host_memory()
    assert available is None or available > 0
    assert format_bytes(512) == "512 B"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"
    assert format_bytes(3 * 2**50) == "3.00 PiB"
    assert format_bytes(2**70) == f"{2**20:,.2f} PiB"
