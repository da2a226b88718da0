"""Deterministic mode: what ``Trainer(deterministic=True)`` has to switch on for a Megatron model with TE layers.

Lightning's ``Trainer(deterministic=True)`` turns on PyTorch's deterministic algorithms
(``torch.use_deterministic_algorithms(True)``) and sets ``CUBLAS_WORKSPACE_CONFIG``. Most of this package's kernels
are not PyTorch's, so ``MegatronCPStrategy`` completes the mode (``deterministic`` is read from PyTorch's flag, so a
script that calls ``torch.use_deterministic_algorithms(True)`` itself gets it too):

- ``TransformerConfig(deterministic_mode=True)``: Megatron's code paths that have a deterministic variant take it
  (the input embedding's backward is an indexed accumulation, which PyTorch's deterministic mode then sorts instead
  of adding atomically).
- ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``: Transformer Engine's attention backward runs its deterministic algorithm
  (cuDNN fused attention: no atomic accumulation of the query gradient; FlashAttention >= 2.4.1 likewise; TE turns
  off the backends that have none). TE reads it when an attention module is built, and megatron-core refuses to
  build one in deterministic mode without it, so it is set before the model is built.
- ``NCCL_ALGO``: Megatron-LM's ``--deterministic-mode`` requires one of Tree, Ring, CollnetDirect, CollnetChain or
  ``^NVLS`` (NVLink SHARP reduces in the switches, in no fixed order). Unset, it is set to ``^NVLS`` (NCCL keeps
  choosing among the others) before the process groups exist.
- ``CUBLAS_WORKSPACE_CONFIG``: set by Lightning; set to ``:4096:8`` here where PyTorch's flag was set another way.

A value already in the environment that contradicts the mode is refused before anything is built, with the fix.
Transformer Engine's cross entropy (one program per row; its only atomic adds count tokens, in integers), its GEMMs
with weight-gradient accumulation fusion (cuBLAS, which is deterministic for a fixed configuration), RMSNorm and
RoPE kernels need no switch. ``deterministic="warn"`` sets all of the above, but PyTorch then runs an operation
without a deterministic implementation with a warning instead of an error: runs are bitwise equal only where no such
warning appeared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

#: Transformer Engine's switch for its nondeterministic attention backward (read when a module is built).
NONDETERMINISTIC_ALGO_VAR = "NVTE_ALLOW_NONDETERMINISTIC_ALGO"
#: cuBLAS's fixed workspace configuration that PyTorch's deterministic mode requires.
CUBLAS_WORKSPACE_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")
#: NCCL's algorithm choice: Megatron-LM's deterministic mode accepts these (``^NVLS``: any algorithm but NVLS).
NCCL_ALGO_VAR = "NCCL_ALGO"
DETERMINISTIC_NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain")
NCCL_ALGO_WITHOUT_NVLS = "^NVLS"

#: What deterministic mode sets where the variable is not set yet.
DETERMINISTIC_DEFAULTS: dict[str, str] = {
    NONDETERMINISTIC_ALGO_VAR: "0",
    CUBLAS_WORKSPACE_VAR: CUBLAS_DETERMINISTIC_WORKSPACES[0],
    NCCL_ALGO_VAR: NCCL_ALGO_WITHOUT_NVLS,
}


class DeterminismError(ValueError):
    """A setting that cannot run deterministically was asked for together with deterministic mode."""


@dataclass
class DeterministicMode:
    """Deterministic mode of one run: whether it is on, PyTorch's warn-only variant, and the environment it set."""

    on: bool
    warn_only: bool = False
    #: The variables this mode set, with the value each had before (None: unset), to restore at the end.
    previous: dict[str, str | None] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log: which mode is on and what it switched."""
        if not self.on:
            return (
                "Deterministic mode: off: two runs of the same configuration agree closely but not to the bit (some "
                "kernels, such as Transformer Engine's default attention backward, add partial results in no fixed "
                "order). Trainer(deterministic=True) trades some speed for bitwise reproducible runs and resumes."
            )
        settings = ", ".join(f"{name}={os.environ.get(name, value)}" for name, value in DETERMINISTIC_DEFAULTS.items())
        text = (
            f"Deterministic mode: on (Trainer(deterministic={'warn' if self.warn_only else True})): PyTorch's "
            f"deterministic algorithms, Megatron's deterministic_mode, {settings}."
        )
        if self.warn_only:
            text += (
                " With deterministic='warn', PyTorch runs an operation that has no deterministic implementation with a "
                "warning instead of an error: runs are bitwise reproducible only if no such warning appears."
            )
        return text


def requested() -> DeterministicMode:
    """The mode PyTorch's flags ask for now (``Trainer(deterministic=...)`` sets them when it is created)."""
    on = torch.are_deterministic_algorithms_enabled()
    return DeterministicMode(on=on, warn_only=on and torch.is_deterministic_algorithms_warn_only_enabled())


def nccl_algo_is_deterministic(value: str) -> bool:
    """Whether an ``NCCL_ALGO`` value keeps NCCL to algorithms that reduce in a fixed order (Megatron-LM's list):
    a comma-separated choice among Tree, Ring, CollnetDirect and CollnetChain, or ``^NVLS``. Case is ignored, as
    NCCL ignores it."""
    value = value.strip()
    if value.lower() == NCCL_ALGO_WITHOUT_NVLS.lower():
        return True
    allowed = {name.lower() for name in DETERMINISTIC_NCCL_ALGOS}
    tokens = [token.strip().lower() for token in value.split(",")]
    return bool(tokens) and all(token in allowed for token in tokens)


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """What in ``environ`` contradicts deterministic mode, each with its fix (empty: nothing)."""
    problems = []
    allowed = environ.get(NONDETERMINISTIC_ALGO_VAR, "").strip()
    if allowed and allowed != "0":
        try:
            zero = int(allowed) == 0
        except ValueError:
            zero = False
        if not zero:
            problems.append(
                f"{NONDETERMINISTIC_ALGO_VAR}={allowed} lets Transformer Engine run its nondeterministic attention "
                "backward; unset it (deterministic mode sets 0) or set it to 0"
            )
    workspace = environ.get(CUBLAS_WORKSPACE_VAR, "").strip()
    if workspace and workspace not in CUBLAS_DETERMINISTIC_WORKSPACES:
        problems.append(
            f"{CUBLAS_WORKSPACE_VAR}={workspace} is not one of the cuBLAS workspace settings PyTorch's deterministic "
            f"mode accepts ({', '.join(CUBLAS_DETERMINISTIC_WORKSPACES)}); unset it or set one of them"
        )
    algo = environ.get(NCCL_ALGO_VAR, "").strip()
    if algo and not nccl_algo_is_deterministic(algo):
        problems.append(
            f"{NCCL_ALGO_VAR}={algo} may let NCCL reduce in no fixed order (NVLS reduces in the NVLink switches); "
            f"unset it (deterministic mode sets {NCCL_ALGO_WITHOUT_NVLS}) or choose among "
            f"{', '.join(DETERMINISTIC_NCCL_ALGOS)} or {NCCL_ALGO_WITHOUT_NVLS}"
        )
    return problems


def enter(mode: DeterministicMode, environ: MutableMapping[str, str] | None = None) -> None:
    """Check ``environ`` (default: the process environment) against an ``on`` mode and set what the mode needs.

    Raises:
        DeterminismError: naming every conflicting setting and its fix; nothing is changed then.
    """
    if not mode.on:
        return
    environ = os.environ if environ is None else environ
    problems = environment_problems(environ)
    if problems:
        raise DeterminismError(
            "Trainer(deterministic=True) (PyTorch's deterministic algorithms are on) cannot be honoured: "
            + "; ".join(problems)
            + ". Or drop deterministic=True to train with the faster nondeterministic kernels."
        )
    for name, value in DETERMINISTIC_DEFAULTS.items():
        if not environ.get(name, "").strip():
            mode.previous[name] = environ.get(name)
            environ[name] = value


def leave(mode: DeterministicMode, environ: MutableMapping[str, str] | None = None) -> None:
    """Give the variables :func:`enter` set their previous values back (so a later run in the process starts clean)."""
    environ = os.environ if environ is None else environ
    for name, value in mode.previous.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    mode.previous.clear()
