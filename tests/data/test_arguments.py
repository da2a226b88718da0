"""The data modules' numeric arguments (data/arguments.py): one set of rules for the data module and the plan."""

from __future__ import annotations

import pytest

from lightning_llama_fp8.data.arguments import DATA_ARGUMENT_RANGES, check_data_arguments
from lightning_llama_fp8.validate import MAX_SEED, SettingError


def test_whole_numbers_in_range_are_returned_as_ints_and_other_keys_are_left_out() -> None:
    checked = check_data_arguments({"seq_length": 2048.0, "seed": MAX_SEED, "train_samples": None, "split": "9,1,0"})
    assert checked == {"seq_length": 2048, "seed": MAX_SEED, "train_samples": None}
    assert type(checked["seq_length"]) is int


def test_every_refused_argument_is_named_at_once() -> None:
    values = {"seq_length": -1, "global_batch_size": 8.5, "micro_batch_size": True, "val_samples": -2, "seed": -1}
    with pytest.raises(SettingError) as err:
        check_data_arguments(values, prefix="data.")
    assert str(err.value) == (
        "data.seq_length must be a whole number >= 1; got -1; "
        "data.global_batch_size must be a whole number >= 1; got 8.5, which has a fractional part; "
        "data.micro_batch_size must be a whole number >= 1; got True (bool); "
        "data.val_samples must be a whole number >= 0; got -2; "
        "data.seed must be a whole number >= 0 and <= 4,294,967,295; got -1."
    )


def test_the_ranges_cover_the_data_modules_numeric_arguments() -> None:
    import inspect

    from lightning_llama_fp8.data.base import GPTDataModule

    numeric = {
        name
        for name, parameter in inspect.signature(GPTDataModule.__init__).parameters.items()
        if "int" in str(parameter.annotation)
    }
    assert numeric == set(DATA_ARGUMENT_RANGES)
