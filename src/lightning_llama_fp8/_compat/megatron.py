"""megatron-core's private calls this package makes (checked against megatron-core 0.19.2)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def copy_main_params_to_model_params(optimizer: Any) -> None:
    """Write the fp32 main weights of Megatron's (chained) ``optimizer`` into the model's weights, quantizing FP8
    weights on the way: the copy Megatron's ``optimizer.step()`` ends with (``_copy_main_params_to_model_params``)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part._copy_main_params_to_model_params()


_MISSING = object()


@contextmanager
def graph_capture_undone_on_failure(layers: list[Any]) -> Iterator[None]:
    """While megatron-core captures ``layers`` as CUDA graphs: if the capture raises, undo the process-wide state a
    capture sets and only a successful one clears (megatron-core 0.19.2 ``transformer/cuda_graphs.py`` clears its
    capture and warm-up flags in ``_finish_capturing``; Transformer Engine's ``make_graphed_callables`` swaps the
    layer class's ``__call__`` for an autocast wrapper and puts it back at its end; with torch < 2.9 megatron-core
    also freezes the garbage collector for the capture). Left behind, Megatron DDP would
    drop the unfused gradients of every later step (its hooks return early while "capturing") and layers built later
    would run without FP8 autocast."""
    from megatron.core.transformer import cuda_graphs

    classes = {type(layer) for layer in layers}
    calls = {cls: cls.__dict__.get("__call__", _MISSING) for cls in classes}
    try:
        yield
    except BaseException:
        for cls, call in calls.items():
            if call is _MISSING:
                if "__call__" in cls.__dict__:
                    delattr(cls, "__call__")
            elif cls.__dict__.get("__call__") is not call:
                cls.__call__ = call
        cuda_graphs._set_capture_end()
        cuda_graphs._set_warmup_end()
        if cuda_graphs.FREEZE_GC:  # frozen at the capture's start (torch < 2.9), thawed only at its end
            gc.unfreeze()
        if getattr(cuda_graphs, "te_set_capture_end", None) is not None:
            cuda_graphs.te_set_capture_end()
        raise
