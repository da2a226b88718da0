"""Read, check, save and restore Transformer Engine's delayed-scaling FP8 state, without importing TE.

With the ``delayed`` recipe every TE module keeps, per direction, ``module.fp8_meta["scaling_fwd"]`` and
``module.fp8_meta["scaling_bwd"]`` (``DelayedScalingRecipeState`` in TE 2.x) holding

* ``amax_history``: float32 ``[history_len, num_tensors]`` (forward: input, weight, output per GEMM; backward:
  grad-output, grad-input per GEMM), and
* ``scale``: float32 ``[num_tensors]``, the factor each tensor is multiplied by before the cast to FP8.

Where the newest amax sits depends on *when* one looks (TE's ``delayed_scaling.cu``, ``kernel_bulk``):

* during a pass, each quantization writes the tensor's amax into row 0, a staging row;
* when the outermost ``autocast`` exits (forward) or the first module's backward ends (backward), TE reduces
  those amaxes over the amax group, computes the new scale from the history (``max`` or ``most_recent``) and
  rotates the history: the reduced amax goes to the *last* row, the oldest row is dropped, and row 0 is zeroed
  for the next pass. A tensor whose staged amax is 0 (its module did not run) is not rotated.

So after a training step (e.g. in ``on_train_batch_end``) row 0 is all zeros and the step's amaxes are in row
``-1``. With ``amax_history_len=1`` (Megatron's default) the only row is the staging row, so the rotation zeroes
it: the step's amax then survives only in the scale (``2**-margin * fp8_max / amax``). The functions below read
the newest amax per tensor the way TE's update kernel does: the staged row-0 value where it is non-zero
(mid-step), else the last row.

Other recipes (current scaling, block scaling, MXFP8) compute their scales on the fly and store no history; their
``fp8_meta`` entries have no ``amax_history``, so :func:`fp8_modules` skips them. Everything here is duck-typed on
``fp8_meta``, so it runs (and is tested) without TE or a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_llama_fp8.validate import format_names

SCALING_KEYS = ("scaling_fwd", "scaling_bwd")
STATE_TENSORS = ("amax_history", "scale")
STATE_KEYS = tuple(f"{key}.{attr}" for key in SCALING_KEYS for attr in STATE_TENSORS)
# Order of the per-module values gathered on the device by ``scaling_summary`` (history_len comes from shapes).
SUMMARY_KEYS = ("fwd_amax", "fwd_scale_min", "fwd_scale_max", "bwd_amax", "bwd_scale_min", "bwd_scale_max")


def delayed_scaling_states(module: nn.Module) -> tuple[Any, Any] | None:
    """``(fp8_meta["scaling_fwd"], fp8_meta["scaling_bwd"])`` if ``module`` holds delayed-scaling state, else None.

    A module qualifies when ``fp8_meta`` is a dict whose two scaling entries both carry a 2-D ``amax_history``
    tensor and a non-empty ``scale`` tensor. TE creates these lazily, in the first forward under FP8 autocast,
    so a TE module qualifies only from then on.
    """
    meta = getattr(module, "fp8_meta", None)
    if not isinstance(meta, dict):
        return None
    states = []
    for key in SCALING_KEYS:
        state = meta.get(key)
        history = getattr(state, "amax_history", None)
        scale = getattr(state, "scale", None)
        if not (isinstance(history, Tensor) and isinstance(scale, Tensor)):
            return None
        if history.dim() != 2 or history.numel() == 0 or scale.numel() == 0:
            return None
        states.append(state)
    return states[0], states[1]


def fp8_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Submodules (names as in ``module.named_modules()``) that hold delayed-scaling FP8 state, in forward order.

    Forward order is the order TE registered them in its global amax buffer at their first FP8 forward
    (``fp8_meta["buffer_index_and_autocast_key"]``); construction order can differ (Megatron builds an attention
    block's ``linear_proj`` before its ``linear_qkv``). Without that key: ``named_modules()`` order.
    """
    found = [(name, sub) for name, sub in module.named_modules() if delayed_scaling_states(sub) is not None]
    keys = [sub.fp8_meta.get("buffer_index_and_autocast_key") for _, sub in found]
    if found and all(isinstance(k, tuple) and len(k) == 2 for k in keys) and len({k[1] for k in keys}) == 1:
        order = sorted(range(len(found)), key=lambda i: keys[i][0])
        found = [found[i] for i in order]
    yield from found


def latest_amax(amax_history: Tensor) -> Tensor:
    """Per tensor, the newest amax in ``amax_history`` ``[history_len, num_tensors]`` (see the module docstring).

    Row 0 holds an amax staged by the current pass and not yet folded into the history; where it is 0 the newest
    one is in the last row, where TE's update rotated it. NaN/Inf staged in row 0 count as present (``!= 0``), so
    they are reported rather than hidden.
    """
    staged = amax_history[0]
    return torch.where(staged != 0, staged, amax_history[-1])


def scaling_summary(named_modules: Iterable[tuple[str, nn.Module]]) -> dict[str, dict[str, float]]:
    """:func:`fp8_scaling_summary` over given ``(name, module)`` pairs; those without delayed-scaling state are skipped.

    Lets a caller that cached its module list (e.g. :class:`~lightning_llama_fp8.callbacks.FP8StatsMonitor`) skip
    the walk over the whole model.
    """
    names: list[str] = []
    history_lens: list[int] = []
    rows: list[Tensor] = []
    for name, module in named_modules:
        states = delayed_scaling_states(module)
        if states is None:
            continue
        values = []
        for state in states:
            history = state.amax_history.detach()
            scale = state.scale.detach()
            # max/min propagate NaN, so a poisoned tensor shows up in the summary instead of being skipped.
            values += [latest_amax(history).max(), scale.min(), scale.max()]
        rows.append(torch.stack(values).float())
        names.append(name)
        history_lens.append(states[0].amax_history.shape[0])
    if not rows:
        return {}
    # Everything stays on the device until here: one stack and one device->host copy for the whole model.
    device = rows[0].device
    table = torch.stack([row.to(device, non_blocking=True) for row in rows]).tolist()
    summary: dict[str, dict[str, float]] = {}
    for name, history_len, values in zip(names, history_lens, table, strict=True):
        summary[name] = {**dict(zip(SUMMARY_KEYS, values, strict=True)), "history_len": history_len}
    return summary


def fp8_scaling_summary(module: nn.Module) -> dict[str, dict[str, float]]:
    """Per FP8 module: newest amax and scale range per direction, and the amax history length.

    Keys per module: ``fwd_amax`` / ``bwd_amax`` (max over the module's tensors of the newest amax, see
    :func:`latest_amax`), ``fwd_scale_min`` / ``fwd_scale_max`` / ``bwd_scale_min`` / ``bwd_scale_max``, and
    ``history_len``. After TE's amax reduction these are identical on every rank of the amax group, so reading
    them on one rank is enough. Costs a few small kernels per module and a single device->host copy.
    """
    return scaling_summary(module.named_modules())


def nonfinite_fp8_state(module: nn.Module, direction: Literal["fwd", "bwd"] | None = None) -> list[str]:
    """Names of FP8 modules whose amax history or scale holds NaN/Inf (``direction``: forward, backward or both).

    In forward order (see :func:`fp8_modules`). With ``direction="fwd"`` the first name
    is the first module whose *input* went non-finite in the forward pass, i.e. where a NaN/Inf first appeared
    (backward state goes bad in every layer the gradient flows through, so it locates less). TE's amax kernels
    skip NaN (``fmaxf``), so only an Inf shows up here; NaNGuard locates NaN by watching layer outputs instead.
    One device->host copy for the whole model.
    """
    names: list[str] = []
    flags: list[Tensor] = []
    for name, sub in fp8_modules(module):
        states = delayed_scaling_states(sub)
        assert states is not None  # fp8_modules yields only modules that have it
        # isfinite().all() rather than a sum: TE sets a scale to FLT_MAX for tiny amaxes, and a sum of two
        # FLT_MAX values overflows to inf, which would report a healthy module as non-finite.
        chosen = [s for key, s in zip(SCALING_KEYS, states, strict=True) if direction is None or direction in key]
        finite = torch.stack([torch.isfinite(getattr(s, a).detach()).all() for s in chosen for a in STATE_TENSORS])
        flags.append(~finite.all())
        names.append(name)
    if not flags:
        return []
    device = flags[0].device
    bad = torch.stack([flag.to(device) for flag in flags]).tolist()
    return [name for name, is_bad in zip(names, bad, strict=True) if is_bad]


def fp8_state_tensors(module: nn.Module) -> list[Tensor]:
    """The live amax-history and scale tensors of every FP8 module (TE's own objects, not copies), forward order."""
    tensors: list[Tensor] = []
    for _, sub in fp8_modules(module):
        for state in delayed_scaling_states(sub) or ():
            tensors += [getattr(state, attr) for attr in STATE_TENSORS]
    return tensors


def any_nonfinite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool tensor on the tensors' device: does any of ``tensors`` hold NaN/Inf? No host sync.

    One fused max-abs reduction over all of them (``get_total_norm`` with the inf norm, multi-tensor kernels):
    NaN and Inf propagate through a max, while TE's FLT_MAX scales stay finite (a sum of two would overflow).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    # get_total_norm runs without autograd; TE's state tensors need no detach.
    return ~torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf))


def sanitize_fp8_state(module: nn.Module) -> None:
    """Zero every non-finite amax-history entry and reset non-finite scales to 1, in place, with no host sync.

    An Inf amax left in a ``max``-over-history would otherwise freeze that tensor's scale (TE keeps the previous
    scale while the amax is not finite) until it ages out of the history, e.g. 1024 steps. Zero is what TE itself
    writes for "no amax" and is ignored by the max.
    """
    with torch.no_grad():
        for _, sub in fp8_modules(module):
            for state in delayed_scaling_states(sub) or ():
                state.amax_history.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                state.scale.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)


def save_fp8_state(module: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Copies of every FP8 module's amax histories and scales: ``{module_name: {"scaling_fwd.amax_history": ...}}``.

    Keys per module: ``scaling_fwd.amax_history``, ``scaling_fwd.scale``, ``scaling_bwd.amax_history``,
    ``scaling_bwd.scale``. The copies stay on the module's device (no host sync), ready for :func:`load_fp8_state`.
    """
    saved: dict[str, dict[str, Tensor]] = {}
    for name, sub in fp8_modules(module):
        states = delayed_scaling_states(sub)
        assert states is not None
        saved[name] = {
            f"{key}.{attr}": getattr(state, attr).detach().clone()
            for key, state in zip(SCALING_KEYS, states, strict=True)
            for attr in STATE_TENSORS
        }
    return saved


def load_fp8_state(module: nn.Module, state: dict[str, dict[str, Tensor]]) -> None:
    """Copy a :func:`save_fp8_state` snapshot back into the modules' own tensors, in place.

    In place (``copy_``) because TE keeps other references to these very tensors: its global amax buffers hold
    the histories, and each quantizer holds a view of ``scale[i]`` and ``amax_history[0][i]``. Replacing the
    objects would leave TE updating the old ones.

    Everything is checked before anything is copied, so a mismatch leaves the modules untouched.

    Raises:
        ValueError: the snapshot's modules, keys or tensor shapes differ from the model's (naming the module).
    """
    current = {name: delayed_scaling_states(sub) for name, sub in fp8_modules(module)}
    missing = [name for name in current if name not in state]
    unexpected = [name for name in state if name not in current]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"no saved state for FP8 module(s) {_preview(missing)}")
        if unexpected:
            parts.append(f"saved state for module(s) {_preview(unexpected)} that hold no FP8 state in this model")
        raise ValueError(f"FP8 state does not match the model: {'; '.join(parts)}.")

    copies: list[tuple[Tensor, Tensor]] = []
    for name, states in current.items():
        assert states is not None
        saved = state[name]
        if set(saved) != set(STATE_KEYS):
            raise ValueError(f"FP8 state for module {name!r} has keys {sorted(saved)}; expected {list(STATE_KEYS)}.")
        for key, live in zip(SCALING_KEYS, states, strict=True):
            for attr in STATE_TENSORS:
                target, source = getattr(live, attr), saved[f"{key}.{attr}"]
                if tuple(source.shape) != tuple(target.shape):
                    raise ValueError(
                        f"FP8 state for module {name!r}: {key}.{attr} has shape {tuple(source.shape)}, but the "
                        f"module's is {tuple(target.shape)} (did amax_history_len or the layer change?)."
                    )
                copies.append((target, source))
    with torch.no_grad():
        for target, source in copies:
            target.copy_(source)


def _preview(names: list[str]) -> str:
    return format_names([repr(name) for name in names])
