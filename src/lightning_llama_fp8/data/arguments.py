"""The numeric arguments of :class:`~lightning_llama_fp8.data.base.GPTDataModule`, checked in one place.

The data module's constructor and ``llama-fp8 plan`` (which reads a config's ``data:`` section without building the
module, and without torch) apply the same rules, so a value the data module would refuse is refused by the plan too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_llama_fp8.validate import MAX_SEED, SettingError, as_int, as_optional_int

#: Argument -> (smallest value, largest value or None, whether None is allowed: "not set").
DATA_ARGUMENT_RANGES: dict[str, tuple[int, int | None, bool]] = {
    "seq_length": (1, None, False),
    "vocab_size": (1, None, False),
    "global_batch_size": (1, None, False),
    "micro_batch_size": (1, None, False),
    "train_samples": (0, None, True),
    "val_samples": (0, None, True),
    "seed": (0, MAX_SEED, False),
    "num_workers": (0, None, False),
}


def check_data_arguments(values: Mapping[str, Any], prefix: str = "data.") -> dict[str, Any]:
    """The arguments of ``values`` that :data:`DATA_ARGUMENT_RANGES` names, as ints (``validate.as_int``: ``8.0``
    is 8; ``8.5``, ``True`` or a value out of range are refused); other keys are left out.

    Raises:
        SettingError: listing every argument that is refused, each as ``{prefix}{name}`` with its value and range.
    """
    checked: dict[str, Any] = {}
    problems = []
    for name, (low, high, optional) in DATA_ARGUMENT_RANGES.items():
        if name not in values:
            continue
        parse = as_optional_int if optional else as_int
        try:
            checked[name] = parse(values[name], f"{prefix}{name}", at_least=low, at_most=high)
        except SettingError as err:
            problems.append(str(err).rstrip("."))
    if problems:
        raise SettingError("; ".join(problems) + ".")
    return checked
