"""Loading Hugging Face weights into the Megatron model (hf/load.py): each TP rank gets its shard; weights that do
not fit config.json are refused before anything is built, naming the tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.hf import HFConfigError, llama_config_from_hf
from lightning_llama_fp8.hf.mapping import (
    StateDictSource,
    megatron_tensor,
)
from tests.helpers.hf_models import copy_hf_dir, edit_hf_config, hf_module, make_hf_model
from tests.helpers.models import CPU_ARCH


@pytest.mark.multiprocess
def test_each_tp_rank_holds_its_shard_of_the_hf_weights(imported: dict[str, Any]) -> None:
    arch = llama_config_from_hf(imported["hf_dir"], **CPU_ARCH)
    source = StateDictSource(imported["state"])
    from lightning_llama_fp8.hf.mapping import parse_megatron_name

    for rank in imported["ranks"]:
        names = set(rank["local"])
        assert ("output_layer.weight" in names) != arch.tie_embeddings
        assert "decoder.layers.1.input_layernorm.weight" in names  # the local spec's norm names
        for name, value in rank["local"].items():
            expected = megatron_tensor(*parse_megatron_name(name), source, arch, rank["tp_rank"], 2)
            assert torch.equal(value, expected.to(value.dtype)), name


def test_config_that_disagrees_with_the_weights(hf_dir: Path, tmp_path: Path) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, intermediate_size=512)
    expected = r"model-\d+-of-\d+.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape \[256, 128\]"
    with pytest.raises(HFConfigError, match=expected + r", but config.json implies \[512, 128\]"):
        hf_module(copy)


def test_untied_config_without_lm_head(tmp_path: Path) -> None:
    make_hf_model(tmp_path, tie=True)
    edit_hf_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(HFConfigError, match=r"lm_head.weight are missing .* is it a tied model"):
        hf_module(tmp_path)


def test_unexpected_bias_tensor(tmp_path: Path) -> None:
    make_hf_model(tmp_path, attention_bias=True)
    edit_hf_config(tmp_path, attention_bias=False)  # a config that hides the biases the weights have
    with pytest.raises(HFConfigError, match=r"no place for: model.layers.0.self_attn.*bias"):
        hf_module(tmp_path)
