"""Reading and writing a checkpoint's state: the Megatron models and optimizer in Megatron-Core's sharded
``torch_dist`` format, which reshards into another layout on load, and Lightning's ``lightning.pt``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_llama_fp8._compat.megatron import copy_main_params_to_model_params
from lightning_llama_fp8.checkpoint.info import LIGHTNING_FILENAME, CheckpointError

TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def load_lightning_state(path: Path) -> dict[str, Any]:
    """Lightning's part of a checkpoint (unpickled in full: it holds hyper-parameter dataclasses and callback state)."""
    try:
        return torch.load(path / LIGHTNING_FILENAME, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint {path}: {LIGHTNING_FILENAME} cannot be read ({type(err).__name__}: {err}). If the file is "
            "damaged, resume from another checkpoint; if a class it names cannot be imported, install what wrote it."
        ) from err


# ---------------------------------------------------------------------- Megatron's sharded state
def _sharded_metadata(sharding: str, dp_cp_group: Any) -> dict[str, Any]:
    """The ``metadata`` Megatron's ``sharded_state_dict`` methods take (the keys Megatron-LM passes)."""
    return {
        "distrib_optim_sharding_type": sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": dp_cp_group,
    }


def _megatron_sharded_state_dict(
    modules: dict[str, torch.nn.Module], optimizer: Any, metadata: dict[str, Any], loading: bool
) -> dict[str, Any]:
    state = {name: module.sharded_state_dict(metadata=metadata) for name, module in modules.items()}
    if optimizer is not None:
        # The optimizer's entries are keyed by the model's, so it is built from (and saved with) the model dict.
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
    return state


def save_megatron_state(
    directory: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: Any,
    sharding: str,
    dp_cp_group: Any,
    *,
    in_background: bool = False,
) -> Any:
    """Write ``modules`` (unwrapped Megatron models, by key) and ``optimizer`` into ``directory``; all ranks call.

    ``sharding`` is the distributed optimizer's ``distrib_optim_sharding_type``; it is stored as the checkpoint's
    content metadata, from which :func:`load_megatron_state` takes it back. ``in_background=True`` only plans the
    write and returns Megatron's ``AsyncRequest`` for it (see ``background.py``); otherwise returns ``None``
    once the files are written.
    """
    from megatron.core import dist_checkpointing

    metadata = _sharded_metadata(sharding, dp_cp_group)
    state = _megatron_sharded_state_dict(modules, optimizer, metadata, loading=False)
    content = {key: value for key, value in metadata.items() if key != "dp_cp_group"}  # a group is not data
    if not in_background:
        return dist_checkpointing.save(state, str(directory), content_metadata=content)
    # megatron-core's own background writer ("mcore"): its default, "nvrx", needs nvidia-resiliency-ext.
    return dist_checkpointing.save(
        state, str(directory), content_metadata=content, async_sharded_save=True, async_strategy="mcore"
    )


def host_copy_sizes(
    modules: dict[str, torch.nn.Module], optimizer: Any, sharding: str, dp_cp_group: Any, device_type: str = "cuda"
) -> list[int]:
    """The bytes of each tensor this rank copies to host memory in a background save of ``modules`` / ``optimizer``.

    The same sharded state dict :func:`save_megatron_state` writes, after the preprocessing Megatron's save applies
    (factories that split fused weights, non-persistent entries dropped), without its collective checks (building a
    ``fully_reshardable`` optimizer state gathers it: pass ``optimizer=None`` there); only the
    tensors on ``device_type`` that this rank writes (the main replica: Megatron's torch_dist writer drops the
    others). FP8 weights count at their nominal dtype (BF16): the writer dequantizes them before the copy.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    state = _megatron_sharded_state_dict(modules, optimizer, _sharded_metadata(sharding, dp_cp_group), loading=False)
    sharded, _ = save_preprocess(state, validate_access_integrity=False)
    sizes = []
    for item in nested_values(sharded):
        if not isinstance(item, ShardedTensor) or not is_main_replica(item.replica_id):
            continue
        data = item.data
        if isinstance(data, torch.Tensor) and data.device.type == device_type:
            sizes.append(data.numel() * data.dtype.itemsize)
    return sizes


def load_megatron_state(directory: Path, modules: dict[str, torch.nn.Module], optimizer: Any, dp_cp_group: Any) -> None:
    """Load what :func:`save_megatron_state` wrote into ``modules`` (any layout) and ``optimizer``; all ranks call.

    Like every torch checkpoint this unpickles data (torch.distributed.checkpoint's index and objects, Transformer
    Engine's delayed-scaling FP8 state): load only checkpoints you trust.
    """
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(str(directory)) or {}
    metadata = {**_sharded_metadata("dp_reshardable", dp_cp_group), **content, "dp_cp_group": dp_cp_group}
    template = _megatron_sharded_state_dict(modules, optimizer, metadata, loading=optimizer is not None)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(template, str(directory))
    # torch.distributed.checkpoint / Megatron raise many kinds (CheckpointException is a BaseException): name the path
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"Checkpoint {directory}: reading its shards failed ({type(err).__name__}: {err}). Its files are damaged "
            "or do not belong together, or it holds another model than this one; resume from another checkpoint."
        ) from err
    with _te_extra_state_pickles_allowed():
        for name, module in modules.items():
            module.load_state_dict(loaded[name])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (KeyError, ValueError) as err:  # Megatron pairs saved and current parameter groups by their settings
            raise CheckpointError(
                f"Checkpoint {directory}: its optimizer state does not fit this run's parameter groups ({err!r}). "
                "Megatron pairs them by learning rate, min_lr, decoupled_lr and weight decay: resume with the "
                "optimizer settings the checkpoint was trained with (its lightning.pt holds them as hyper-parameters)."
            ) from err
        _requantize_fp8_weights_from_main_params(optimizer, modules)


def _requantize_fp8_weights_from_main_params(optimizer: Any, modules: dict[str, torch.nn.Module]) -> None:
    """Rebuild FP8 weights (``fp8_param_gather``) from the fp32 main weights, as every optimizer step does.

    An FP8 weight is checkpointed dequantized (FP8 value x a non-power-of-two scale, rounded to BF16), and loading
    quantizes that again: near a rounding boundary it lands on the neighbouring FP8 value. Training itself always
    quantizes from the fp32 main weights, which the optimizer state holds exactly, so do that (Megatron's own
    end-of-step copy) and all-gather the result. Found on one H200: without it the first resumed step's loss was
    6e-4 off the uninterrupted run's.
    """
    if not any(_is_quantized(param) for module in modules.values() for param in module.parameters()):
        return
    copy_main_params_to_model_params(optimizer)
    for model_chunk in getattr(optimizer, "model_chunks", []):  # the DDP-wrapped models, once each
        model_chunk.start_param_sync(force_sync=True)


def _is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored in a Transformer Engine low-precision format (FP8 weights)."""
    return type(param).__module__.startswith("transformer_engine") or type(param.data).__module__.startswith(
        "transformer_engine"
    )


@contextmanager
def _te_extra_state_pickles_allowed() -> Iterator[None]:
    """Transformer Engine's opt-in for its pickled FP8 state (``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``), for
    this load only: TE 2.20 refuses that state by default, including in checkpoints it wrote itself."""
    previous = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TE_UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = previous
