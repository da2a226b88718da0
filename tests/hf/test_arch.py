"""The architecture of a run (hf/arch.py): a preset, a LlamaConfig or a Hugging Face directory's config.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_llama_fp8.config import LlamaConfig, get_preset
from lightning_llama_fp8.hf import HFConfigError
from lightning_llama_fp8.hf.arch import resolve_arch
from tests.helpers.hf_models import LLAMA31_ROPE, hf_module, make_hf_model
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
