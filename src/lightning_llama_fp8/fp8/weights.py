"""FP8 weights refreshed from the optimizer's main weights without a transpose that is thrown away.

With FP8 weights (``TEFP8Precision(fp8_param_gather=True)``) and per-tensor delayed scaling, Megatron's distributed
optimizer writes the updated main weights back into the FP8 weights at the end of every ``optimizer.step()``
(``quantize_param_shard`` -> Transformer Engine's ``quantize_master_weights``). TE views each rank's shard of a
weight as a single row and quantizes it with the weight's own quantizer. That quantizer also asks for the transpose
(columnwise usage: the backward GEMMs on Hopper need it), so TE allocates an ``[N, 1]`` transpose of the one-row
shard and runs its statically compiled ``cast_transpose_general_kernel`` (a one-row shape does not fit the tuned
kernel's 32 x 32 tiles), then drops that transpose with the shard view. The weight's real transpose is made later
from the whole weight (``post_all_gather_processing``), so the work buys nothing; the README ("Speed") has what it
costs a step.

:func:`rowwise_only_weight_refresh` turns the columnwise usage of those quantizers off for the duration of the
optimizer step, so TE runs its plain cast: the same FP8 bytes, scale-inverse and amax (``tests/gpu``, bitwise),
without the transpose. The usages are put back when the step ends, before anything else uses the quantizers.
Current scaling is left alone: TE builds a fresh quantizer for each shard there, out of our reach.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def rowwise_only_weight_refresh(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While inside, the delayed-scaling quantizers of ``modules``' FP8 weights produce no transpose.

    Yields how many quantizers it switched (0 without TE or without FP8 weights, and then it changes nothing).
    """
    with rowwise_only(delayed_scaling_weight_quantizers(modules)) as switched:
        yield switched


def delayed_scaling_weight_quantizers(modules: Iterable[torch.nn.Module]) -> list[Any]:
    """The quantizers of the FP8 (``Float8Tensor``) weights in ``modules`` that use delayed scaling, each once."""
    try:
        from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer, Float8Tensor
    except ImportError:  # no TE: no FP8 weights either
        return []
    quantizers: dict[int, Any] = {}
    for module in modules:
        for param in module.parameters():
            quantizer = getattr(param, "_quantizer", None) if isinstance(param, Float8Tensor) else None
            # type(), not isinstance: the current-scaling quantizer must not match, should TE derive it one day.
            if type(quantizer) is Float8Quantizer:
                quantizers.setdefault(id(quantizer), quantizer)
    return list(quantizers.values())


@contextlib.contextmanager
def rowwise_only(quantizers: Iterable[Any]) -> Iterator[int]:
    """Switch off the columnwise usage of each quantizer that has both usages while inside; restore them on the way
    out (errors too). One without rowwise usage is left alone: TE would write its transpose only, not its data."""
    saved = [(q, q.rowwise_usage, q.columnwise_usage) for q in quantizers if q.rowwise_usage and q.columnwise_usage]
    try:
        for quantizer, _, _ in saved:
            quantizer.set_usage(columnwise=False)
        yield len(saved)
    finally:
        for quantizer, rowwise, columnwise in saved:
            quantizer.set_usage(rowwise=rowwise, columnwise=columnwise)
