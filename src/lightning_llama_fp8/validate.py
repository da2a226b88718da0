"""Numbers a user gives (config fields, YAML and ``config.json`` values, command-line flags), checked to be what they
look like before anything uses them; and the machine's CPUs and free host memory, for sizes that would exhaust them.

One rule for every whole-number setting (:func:`as_int`): Python ints, and floats or numeric strings whose value is a
whole number (``256.0`` or ``"5e5"`` from YAML / JSON writers, which PyYAML and ``json`` hand over as float or str),
are taken as that int; ``True``/``False``, fractions (``256.7``), NaN, infinities and anything else are refused. For
every real-valued setting (:func:`as_float`): finite numbers only. Both then check the accepted range, and the error
names the setting, the value given and the range, so ``hidden_size: 256.7`` is refused instead of training a model of
width 256, and ``--max-shard-size-gb nan`` gets a sentence instead of a traceback.

:func:`int_argument` / :func:`float_argument` apply the same rules as argparse ``type=`` functions.

Imports nothing of this package (the bottom layer): config dataclasses, the Hugging Face reader, the data modules,
the strategy and the command line all use it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "MAX_SEED",
    "SettingError",
    "as_bool",
    "as_float",
    "as_int",
    "as_optional_int",
    "available_host_memory",
    "float_argument",
    "format_bytes",
    "int_argument",
    "usable_cpus",
]


#: The largest seed: numpy's ``RandomState`` (Megatron's dataset shuffling) and Lightning's ``seed_everything`` take
#: seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1


class SettingError(ValueError):
    """A setting whose value is not a number of the kind or range it needs; the message names both."""


def _range(at_least: float | None, at_most: float | None, above: float | None = None) -> str:
    def shown(bound: float) -> str:
        return f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"

    bounds = ((">", above), (">=", at_least), ("<=", at_most))
    return " and ".join(f"{sign} {shown(bound)}" for sign, bound in bounds if bound is not None)


def _as_number(value: Any, name: str, kind: str, accepted: str) -> float | int:
    """``value`` as an int or float, or SettingError: bool and non-numbers are refused, numeric strings parsed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingError(f"{name} must be {kind}{accepted}; got {value!r} ({type(value).__name__}).")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise SettingError(f"{name} must be {kind}{accepted}; got {value!r}, which is not a number.") from None
    return value


def as_int(value: Any, name: str, *, at_least: int | None = None, at_most: int | None = None) -> int:
    """``value`` as an int in ``[at_least, at_most]`` (either end open when None), or :class:`SettingError`.

    Accepted: ints, and floats or numeric strings whose value is a whole number (``256.0``, ``"5e5"``). Refused:
    bools, fractions, NaN, infinities, anything else.
    """
    accepted = _range(at_least, at_most)
    accepted = f" {accepted}" if accepted else ""
    number = _as_number(value, name, "a whole number", accepted)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise SettingError(f"{name} must be a whole number{accepted}; got {value!r}.")
        if not number.is_integer():
            raise SettingError(f"{name} must be a whole number{accepted}; got {value!r}, which has a fractional part.")
        number = int(number)
    if (at_least is not None and number < at_least) or (at_most is not None and number > at_most):
        raise SettingError(f"{name} must be a whole number{accepted}; got {value!r}.")
    return number


def as_optional_int(value: Any, name: str, *, at_least: int | None = None, at_most: int | None = None) -> int | None:
    """:func:`as_int`, with None passed through (a setting whose None means "not set")."""
    return None if value is None else as_int(value, name, at_least=at_least, at_most=at_most)


def as_float(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a finite float, ``> above``, ``>= at_least`` and ``<= at_most`` where given, or
    :class:`SettingError` (bools, NaN, infinities and non-numbers are refused; numeric strings are parsed)."""
    accepted = _range(at_least, at_most, above)
    accepted = f" {accepted}" if accepted else ""
    try:
        number = float(_as_number(value, name, "a finite number", accepted))
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if (
        not math.isfinite(number)
        or (above is not None and not number > above)
        or (at_least is not None and number < at_least)
        or (at_most is not None and number > at_most)
    ):
        raise SettingError(f"{name} must be a finite number{accepted}; got {value!r}.")
    return number


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else :class:`SettingError`: ``"false"`` or ``0`` would otherwise read as a truth
    value that is not what it looks like (``bool("false")`` is True)."""
    if not isinstance(value, bool):
        raise SettingError(f"{name} must be true or false; got {value!r} ({type(value).__name__}).")
    return value


def int_argument(*, at_least: int | None = None, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for a whole-number flag in ``[at_least, at_most]`` (the rules of :func:`as_int`)."""

    def parse(text: str) -> int:
        try:
            return as_int(text, "the value", at_least=at_least, at_most=at_most)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "whole number"  # what argparse names in its own messages
    return parse


def float_argument(
    *, above: float | None = None, at_least: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite real-valued flag in the given range (the rules of :func:`as_float`)."""

    def parse(text: str) -> float:
        try:
            return as_float(text, "the value", above=above, at_least=at_least, at_most=at_most)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "number"
    return parse


# ------------------------------------------------------------------------------------------ the machine
def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_host_memory() -> int | None:
    """Bytes of host memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``, else the free
    physical pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, and how many more (``a, b, c and 4 more``)."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def format_bytes(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit that keeps it >= 1 (``1.50 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(num_bytes) < 1024 or unit == "PiB":
            return f"{num_bytes:,.0f} {unit}" if unit == "B" else f"{num_bytes:,.2f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
