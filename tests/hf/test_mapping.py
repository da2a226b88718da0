"""The Hugging Face <-> Megatron tensor mapping (hf/mapping.py): bitwise exact both ways, Megatron's QKV grouping
and TP shards, the zero-centered norm weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf import llama_config_from_hf
from lightning_llama_fp8.hf.mapping import (
    LAYER_TENSORS,
    StateDictSource,
    hf_tensors,
    megatron_tensor,
)
from tests.helpers.hf_models import LLAMA31_ROPE, make_hf_model
from tests.helpers.models import CPU_ARCH


def _megatron_full(state: dict[str, torch.Tensor], arch: LlamaConfig, tp: int) -> dict[tuple[str, int | None], Any]:
    """Every Megatron weight as the ``tp`` ranks' shards."""
    source = StateDictSource(state)
    kinds = [(kind, layer) for layer in range(arch.num_layers) for kind in LAYER_TENSORS]
    kinds += [("embedding", None), ("final_norm", None)] + ([] if arch.tie_embeddings else [("output", None)])
    return {key: [megatron_tensor(*key, source, arch, rank, tp) for rank in range(tp)] for key in kinds}


@pytest.mark.parametrize(
    "case",
    [
        {"groups": 4},  # GQA, untied, vocab padded 1000 -> 1024
        {"groups": 2, "rope_scaling": LLAMA31_ROPE},
        {"groups": 8, "tie": True, "vocab": 1024},  # MHA, tied, no padding
        {"groups": 1, "tie": True, "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0}},  # MQA, Llama 3.2 style
    ],
    ids=["gqa", "rope-scaling", "tied-mha", "tied-mqa-rope32"],
)
def test_mapping_round_trip_is_bitwise_exact(tmp_path: Path, case: dict[str, Any]) -> None:
    state = make_hf_model(tmp_path, **case)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    back: dict[str, torch.Tensor] = {}
    for (kind, layer), (full,) in _megatron_full(state, arch, tp=1).items():
        back.update(hf_tensors(kind, layer, full, arch))
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    embedding = megatron_tensor("embedding", None, StateDictSource(state), arch)
    assert embedding.shape[0] == arch.padded_vocab_size() and not embedding[arch.vocab_size :].any()


def test_qkv_is_grouped_per_key_value_head(tmp_path: Path) -> None:
    """Megatron's linear_qkv rows: per group g, the group's query heads, then key head g, then value head g."""
    state = make_hf_model(tmp_path, heads=8, groups=2)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    qkv = megatron_tensor("qkv", 0, StateDictSource(state), arch)
    hd = arch.kv_channels
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    grouped = qkv.reshape(2, 4 + 2, hd, -1)
    assert torch.equal(grouped[1, 0], q[4 * hd : 5 * hd])  # group 1 starts with query head 4
    assert torch.equal(grouped[1, 4], k[hd : 2 * hd]) and torch.equal(grouped[1, 5], v[hd : 2 * hd])


def test_tp2_shards_are_megatrons_layout(tmp_path: Path) -> None:
    """Each TP rank's shard: whole key/value groups of linear_qkv, [own gate rows; own up rows] of linear_fc1,
    column halves of linear_proj / linear_fc2, row halves of the padded vocabulary."""
    state = make_hf_model(tmp_path, groups=4, vocab=1000)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    one, two = _megatron_full(state, arch, tp=1), _megatron_full(state, arch, tp=2)
    assert torch.equal(torch.cat(two[("qkv", 1)]), one[("qkv", 1)][0])  # groups are contiguous in rows
    gate, up = one[("fc1", 0)][0].chunk(2)
    for rank, shard in enumerate(two[("fc1", 0)]):
        assert torch.equal(shard, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
    for kind in ("proj", "fc2"):
        assert torch.equal(torch.cat(two[(kind, 0)], dim=1), one[(kind, 0)][0])
    assert arch.padded_vocab_size(2) == 1024 and [s.shape[0] for s in two[("output", None)]] == [512, 512]
    assert torch.equal(torch.cat(two[("output", None)])[:1000], state["lm_head.weight"])


def test_zero_centered_gamma_stores_weight_minus_one(tmp_path: Path) -> None:
    state = make_hf_model(tmp_path)
    arch = llama_config_from_hf(tmp_path, zero_centered_gamma=True)  # TE spec (Megatron's --apply-layernorm-1p)
    norm = megatron_tensor("attn_norm", 1, StateDictSource(state), arch)
    original = state["model.layers.1.input_layernorm.weight"]
    assert norm.dtype == torch.float32 and torch.equal(norm, original.float() - 1)
    assert torch.equal(hf_tensors("attn_norm", 1, norm, arch)["model.layers.1.input_layernorm.weight"], original)
