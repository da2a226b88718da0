"""Hugging Face weights into a freshly built GPTModel, on every rank, in any TP x CP x DP layout.

Each rank reads only the rows or columns of its tensor-parallel rank (context- and data-parallel ranks hold full
replicas of their TP shard), straight into its parameters, before Megatron's DDP and optimizer are built from
them: the fp32 main weights of the (distributed) optimizer start from the Hugging Face values and the optimizer
state is fresh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_llama_fp8._compat.transformer_engine import replace_high_precision_init_val
from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf.arch import check_weights_hold_the_layers
from lightning_llama_fp8.hf.config import HFConfigError
from lightning_llama_fp8.hf.files import SafetensorsDir
from lightning_llama_fp8.hf.mapping import (
    HF_IGNORED_SUFFIXES,
    HF_MODEL_TENSORS,
    expected_hf_shapes,
    megatron_tensor,
    parse_megatron_name,
)
from lightning_llama_fp8.parallel.pipeline import chunk_layer_offset
from lightning_llama_fp8.validate import format_names

log = logging.getLogger(__name__)


def check_hf_weights(path: str | os.PathLike[str], arch: LlamaConfig) -> SafetensorsDir:
    """Open the weights of ``path`` and check every tensor's presence and shape against ``arch``; reads no data.

    Raises:
        HFConfigError: naming the file and tensor, for a missing/truncated shard, a missing or unexpected tensor
            (e.g. a bias), or a shape that config.json does not predict.
    """
    weights = SafetensorsDir(path)
    check_weights_hold_the_layers(arch, weights.names(), path)  # before the tables below grow with config.json
    expected = expected_hf_shapes(arch)
    missing = [name for name in expected if name not in weights]
    if missing:
        shown = format_names(missing)
        hint = ""
        if missing == [HF_MODEL_TENSORS["output"]]:
            hint = " (config.json says tie_word_embeddings is false, but there is no lm_head: is it a tied model?)"
        raise HFConfigError(f"{path}: tensor(s) {shown} are missing from the weights{hint}.")
    allowed = set(expected) | ({HF_MODEL_TENSORS["output"]} if arch.tie_embeddings else set())
    unexpected = [n for n in weights.names() if n not in allowed and not n.endswith(HF_IGNORED_SUFFIXES)]
    if unexpected:
        raise HFConfigError(
            f"{path}: the weights hold tensors a Llama of config.json has no place for: {', '.join(unexpected[:5])} "
            "(biases, extra layers or another architecture?)."
        )
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise HFConfigError(
                f"{path / Path(weights.file_of[name])}: tensor {name} has shape {list(weights.shape(name))}, but "
                f"config.json implies {list(shape)}; config.json and the weights disagree."
            )
    return weights


def load_hf_weights(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    path: str | os.PathLike[str],
    arch: LlamaConfig,
    tp_rank: int | None = None,
    tp_size: int | None = None,
) -> None:
    """Copy the Hugging Face weights of ``path`` into ``model`` (an unwrapped GPTModel built for ``arch``).

    ``model`` may be one pipeline chunk or this rank's list of them (the files are checked once): layers are
    matched by their global layer numbers, and a last stage's copy of tied embeddings gets the embedding too.
    ``tp_rank``/``tp_size`` default to Megatron's ``parallel_state``. Every parameter of the model is written; one
    without a Hugging Face counterpart is an error, not left at its random initial value.
    """
    if tp_rank is None or tp_size is None:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    weights = check_hf_weights(path, arch)
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    for chunk in chunks:
        offset = chunk_layer_offset(chunk)
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                kind, layer = parse_megatron_name(name)
                layer = None if layer is None else layer + offset
                value = megatron_tensor(kind, layer, weights, arch, tp_rank, tp_size)
                if tuple(value.shape) != tuple(param.shape):
                    raise HFConfigError(
                        f"{name}: the Hugging Face weights give a {list(value.shape)} shard at TP rank {tp_rank} of "
                        f"{tp_size}, the model has {list(param.shape)}; was the model built for another architecture?"
                    )
                _assign(param, value)
        log.info(
            "Initialised the model from the Hugging Face weights in %s (TP rank %d of %d, layers from %d).",
            path,
            tp_rank,
            tp_size,
            offset,
        )


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into ``param``; for a Transformer Engine FP8 weight also into its high-precision copy.

    Megatron's distributed optimizer builds the fp32 main weight of an FP8 parameter from TE's
    ``get_high_precision_init_val()`` when the parameter has one (the BF16 value before quantization, kept while the
    model is built with ``preserve_high_precision_init_val``). That copy still holds the random initialisation, so
    it is replaced too; otherwise training would start from the random weights with FP8 weights on.
    """
    replace_high_precision_init_val(param, value)
    param.copy_(value.to(device=param.device, dtype=param.dtype))
