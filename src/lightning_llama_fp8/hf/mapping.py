"""The Llama weight mapping between Hugging Face ``LlamaForCausalLM`` and Megatron-Core's ``GPTModel``.

Per layer (Hugging Face name -> Megatron):

- ``q_proj``, ``k_proj``, ``v_proj`` -> ``self_attention.linear_qkv``, grouped per key/value head: for each group,
  its ``heads / groups`` query heads, then its key head, then its value head. No permutation of q/k: both
  transformers' Llama and Megatron's RoPE (``rotary_interleaved=False``) rotate the two halves of each head
  (``rotate_half``), and Hugging Face's Llama weights are already stored for that convention.
- ``o_proj`` -> ``self_attention.linear_proj``; ``down_proj`` -> ``mlp.linear_fc2``.
- ``gate_proj``, ``up_proj`` -> ``mlp.linear_fc1`` as ``[gate; up]``; a tensor-parallel rank holds
  ``[its gate rows; its up rows]``.
- ``input_layernorm`` / ``post_attention_layernorm`` -> the norm fused into ``linear_qkv`` / ``linear_fc1``
  (Transformer Engine spec: ``layer_norm_weight``) or ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec);
  with ``zero_centered_gamma`` Megatron stores ``weight - 1``.
- ``embed_tokens`` / ``lm_head`` -> ``embedding.word_embeddings`` / ``output_layer``, padded with zero rows to
  Megatron's padded vocabulary (:meth:`LlamaConfig.padded_vocab_size`); tied models have no ``lm_head``.

Distributed checkpoints store the same tensors unsharded, with the layers stacked on a leading axis, under the
Transformer Engine names (``decoder.layers.self_attention.linear_qkv.weight`` is ``[layers, rows, hidden]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf.config import HFConfigError

#: Megatron tensors per layer, by kind: (Transformer Engine spec name, local spec name), relative to the layer.
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "qkv": ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight"),
    "proj": ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight"),
    "mlp_norm": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "fc1": ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight"),
    "fc2": ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight"),
}
#: Megatron tensors outside the layers, by kind.
MODEL_TENSORS: dict[str, str] = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
}
#: Hugging Face tensors per layer, relative to ``model.layers.{i}.``, by the Megatron kind they make up.
HF_LAYER_TENSORS: dict[str, tuple[str, ...]] = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "proj": ("self_attn.o_proj.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "fc1": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "fc2": ("mlp.down_proj.weight",),
}
HF_MODEL_TENSORS: dict[str, str] = {
    "embedding": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "output": "lm_head.weight",
}
#: Buffers some older checkpoints saved; recomputed by every implementation, never a weight.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NORM_KINDS = ("attn_norm", "mlp_norm", "final_norm")
#: Layout of a Megatron tensor under tensor parallelism: which dimension is split ("rows", "cols") or none.
TP_SPLIT = {"qkv": "rows", "fc1": "rows", "embedding": "rows", "output": "rows", "proj": "cols", "fc2": "cols"}

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class TensorSource(Protocol):
    """Where Hugging Face tensors come from: a safetensors directory, or a dict in tests."""

    def shape(self, tensor: str) -> tuple[int, ...]: ...

    def read(self, tensor: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


@dataclass
class StateDictSource:
    """A :class:`TensorSource` over an in-memory Hugging Face state dict."""

    tensors: dict[str, torch.Tensor]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self.tensors[tensor].shape)

    def read(self, tensor: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        value = self.tensors[tensor]
        value = value[rows or slice(None)]
        return value[:, cols] if cols is not None else value


def hf_layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def parse_megatron_name(name: str) -> tuple[str, int | None]:
    """``(kind, layer)`` of a GPTModel parameter name (either layer spec); ``layer`` is None outside the layers."""
    for kind, model_name in MODEL_TENSORS.items():
        if name == model_name:
            return kind, None
    match = _LAYER_NAME.match(name)
    if match:
        for kind, spellings in LAYER_TENSORS.items():
            if match.group(2) in spellings:
                return kind, int(match.group(1))
    raise HFConfigError(f"GPTModel parameter {name} has no Hugging Face Llama counterpart.")


def expected_hf_shapes(arch: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``arch`` holds, with its shape."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for layer in range(arch.num_layers):
        shapes.update({hf_layer_name(layer, suffix): shape for suffix, shape in per_layer.items()})
    return shapes


# ---------------------------------------------------------------------------------------------- HF -> Megatron
def megatron_tensor(
    kind: str,
    layer: int | None,
    source: TensorSource,
    arch: LlamaConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s part of one Megatron weight, reading only that part from ``source``.

    Norms come back in float32 when ``arch.zero_centered_gamma`` (``weight - 1`` rounds once, when the caller
    copies it into the parameter); everything else in the source's dtype.
    """
    hd = arch.kv_channels
    if kind in NORM_KINDS:
        name = HF_MODEL_TENSORS[kind] if layer is None else hf_layer_name(layer, HF_LAYER_TENSORS[kind][0])
        weight = source.read(name)
        return weight.float() - 1.0 if arch.zero_centered_gamma else weight
    if kind in ("embedding", "output"):
        name = HF_MODEL_TENSORS["embedding" if kind == "embedding" or arch.tie_embeddings else "output"]
        padded = arch.padded_vocab_size(tp_size)
        start, stop = _part(padded, tp_rank, tp_size)
        rows = source.read(name, rows=slice(start, min(stop, arch.vocab_size)))
        if rows.shape[0] < stop - start:  # Megatron's padding rows: never looked up, zero logits in the output
            rows = torch.cat([rows, rows.new_zeros(stop - start - rows.shape[0], rows.shape[1])])
        return rows
    assert layer is not None
    names = [hf_layer_name(layer, suffix) for suffix in HF_LAYER_TENSORS[kind]]
    if kind == "qkv":
        first, last = _part(arch.num_query_groups, tp_rank, tp_size)
        groups, heads_per_group = last - first, arch.num_attention_heads // arch.num_query_groups
        q = source.read(names[0], rows=slice(first * heads_per_group * hd, last * heads_per_group * hd))
        k = source.read(names[1], rows=slice(first * hd, last * hd))
        v = source.read(names[2], rows=slice(first * hd, last * hd))
        hidden = q.shape[1]
        grouped = [q.reshape(groups, heads_per_group * hd, hidden), k.reshape(groups, hd, hidden)]
        grouped.append(v.reshape(groups, hd, hidden))
        return torch.cat(grouped, dim=1).reshape(-1, hidden)
    if kind == "fc1":
        rows = slice(*_part(arch.ffn_hidden_size, tp_rank, tp_size))
        return torch.cat([source.read(names[0], rows=rows), source.read(names[1], rows=rows)])
    if kind == "proj":
        return source.read(names[0], cols=slice(*_part(arch.num_attention_heads * hd, tp_rank, tp_size)))
    if kind == "fc2":
        return source.read(names[0], cols=slice(*_part(arch.ffn_hidden_size, tp_rank, tp_size)))
    raise HFConfigError(f"Unknown Megatron tensor kind {kind!r}.")


def _part(size: int, rank: int, parts: int) -> tuple[int, int]:
    if size % parts:
        raise HFConfigError(f"A dimension of {size} does not split into {parts} tensor-parallel parts.")
    return rank * size // parts, (rank + 1) * size // parts


# ---------------------------------------------------------------------------------------------- Megatron -> HF
def hf_tensors(kind: str, layer: int | None, full: torch.Tensor, arch: LlamaConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors (BF16) made from one unsharded Megatron weight ``full`` (one layer's, if a layer)."""
    out = _hf_tensors(kind, layer, full, arch)
    return {name: value.to(torch.bfloat16).contiguous() for name, value in out.items()}


def hf_tensor_pieces(
    kind: str, layer: int | None, full: torch.Tensor, arch: LlamaConfig
) -> dict[str, list[torch.Tensor]]:
    """:func:`hf_tensors`, each tensor as contiguous BF16 pieces whose concatenation (along rows) is the tensor.

    q, k and v are row blocks of the fused ``linear_qkv``, one per key/value group: given as those blocks (views of
    ``full`` once it is BF16 and contiguous), a writer can write them without copying them into tensors of their
    own first. Every other tensor is one piece.
    """
    if kind != "qkv":
        return {name: [value] for name, value in hf_tensors(kind, layer, full, arch).items()}
    assert layer is not None
    names = [hf_layer_name(layer, suffix) for suffix in HF_LAYER_TENSORS[kind]]
    blocks = _qkv_blocks(full.to(torch.bfloat16).contiguous(), arch)
    return {name: list(block.unbind(0)) for name, block in zip(names, blocks, strict=True)}


def _qkv_blocks(full: torch.Tensor, arch: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a fused ``linear_qkv`` as [groups, rows of the group, hidden] views: Megatron stores each key/value
    group's query heads, then its key head, then its value head."""
    hd, groups = arch.kv_channels, arch.num_query_groups
    heads_per_group = arch.num_attention_heads // groups
    grouped = full.reshape(groups, heads_per_group + 2, hd, full.shape[-1])
    q = grouped[:, :heads_per_group].reshape(groups, heads_per_group * hd, full.shape[-1])
    return q, grouped[:, heads_per_group], grouped[:, heads_per_group + 1]


def _hf_tensors(kind: str, layer: int | None, full: torch.Tensor, arch: LlamaConfig) -> dict[str, torch.Tensor]:
    if kind in NORM_KINDS:
        weight = full.float() + 1.0 if arch.zero_centered_gamma else full
        name = HF_MODEL_TENSORS[kind] if layer is None else hf_layer_name(layer, HF_LAYER_TENSORS[kind][0])
        return {name: weight}
    if kind in ("embedding", "output"):
        if full.shape[0] < arch.vocab_size:
            raise HFConfigError(f"{MODEL_TENSORS[kind]} has {full.shape[0]} rows, fewer than vocab {arch.vocab_size}.")
        return {HF_MODEL_TENSORS[kind]: full[: arch.vocab_size]}  # Megatron's padding rows are dropped
    assert layer is not None
    names = [hf_layer_name(layer, suffix) for suffix in HF_LAYER_TENSORS[kind]]
    if kind == "qkv":
        return {
            name: block.reshape(-1, full.shape[-1]) for name, block in zip(names, _qkv_blocks(full, arch), strict=True)
        }
    if kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return {names[0]: gate, names[1]: up}
    return {names[0]: full}  # proj, fc2: the same matrix
