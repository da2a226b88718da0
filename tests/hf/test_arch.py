"""The architecture of a run (hf/arch.py): a preset, a LlamaConfig or a Hugging Face directory's config.json."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lightning_llama_fp8.config import LlamaConfig, get_preset
from lightning_llama_fp8.hf import HFConfigError
from lightning_llama_fp8.hf.arch import check_weights_hold_the_layers, resolve_arch
from tests.helpers.hf_models import LLAMA31_ROPE, copy_hf_dir, edit_hf_config, hf_module, make_hf_model
from tests.helpers.models import CPU_ARCH


def test_resolve_arch() -> None:
    arch = LlamaConfig(num_layers=3)
    assert resolve_arch(arch) is arch
    assert resolve_arch("llama3_2_3b") == get_preset("llama3_2_3b")
    with pytest.raises(ValueError, match="Unknown Llama preset"):
        resolve_arch("nope")


def test_module_takes_the_architecture_from_config_json(tmp_path: Path) -> None:
    from lightning_llama_fp8 import LlamaLightningModule

    make_hf_model(tmp_path, tie=True, rope_scaling={**LLAMA31_ROPE, "factor": 32.0}, groups=2)
    module = LlamaLightningModule(init_weights=str(tmp_path))
    assert (module.arch.num_layers, module.arch.hidden_size, module.arch.num_query_groups) == (2, 128, 2)
    assert module.arch.tie_embeddings and module.arch.rope_scaling and module.arch.rope_scaling_factor == 32.0
    assert module.arch.rotary_base == 500000 and module.arch.vocab_size == 1000 and module.arch.norm_epsilon == 1e-5
    assert LlamaLightningModule(arch=str(tmp_path)).arch == module.arch  # arch given as the directory


def test_arch_that_disagrees_with_config_json(hf_dir: Path) -> None:
    with pytest.raises(HFConfigError, match=r"model.arch disagrees with .*config.json on num_layers: 32 vs 2"):
        hf_module(hf_dir, arch="llama3_8b")
    with pytest.raises(HFConfigError, match="cannot be overridden"):
        LlamaConfig.from_hf(hf_dir, num_layers=4)
    agreeing = LlamaConfig.from_hf(hf_dir, seq_length=512, **CPU_ARCH)
    assert hf_module(hf_dir, arch=agreeing).arch.seq_length == 512


@pytest.mark.parametrize(("layers", "held"), [(1e9, 2), (3, 2)], ids=["1e9-layers", "one-layer-too-many"])
def test_a_config_json_with_more_layers_than_its_weights_is_refused_before_anything_is_sized(
    hf_dir: Path, tmp_path: Path, layers: float, held: int
) -> None:
    """The tables of tensor names and shapes that check and load the weights grow with config.json's layer count: 1e9
    layers used to exhaust host memory there with no message. Now the layers are counted in the files' headers first."""
    from lightning_llama_fp8.hf import check_hf_weights

    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, num_hidden_layers=layers)
    arch = LlamaConfig.from_hf(copy)  # reading config.json allocates nothing that grows with it
    assert arch.num_layers == int(layers) and resolve_arch(str(copy)) == arch  # nor does planning with it
    message = (
        rf"says num_hidden_layers is {int(layers):,}, but the safetensors files of .* hold layers 0 to {held - 1}:"
    )
    started = time.perf_counter()
    with pytest.raises(HFConfigError, match=message):
        hf_module(copy)
    with pytest.raises(HFConfigError, match=message):
        check_hf_weights(copy, arch)
    assert time.perf_counter() - started < 10
    with pytest.raises(HFConfigError, match=r"says num_hidden_layers is 2, but .* hold no layers"):
        check_weights_hold_the_layers(LlamaConfig(num_layers=2), ["model.embed_tokens.weight"], copy)


@pytest.mark.parametrize("changes", [{"hidden_size": 10**7, "head_dim": 16}, {"vocab_size": 10**12}])
def test_other_sizes_larger_than_the_weights_are_refused_by_shape(hf_dir: Path, tmp_path: Path, changes: dict) -> None:
    """They only enter the shapes, which the weight check compares tensor by tensor before reading any data."""
    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, **changes)
    with pytest.raises(HFConfigError, match=r"has shape \[.*\], but config.json implies"):
        hf_module(copy)
