"""Small random Hugging Face Llamas saved locally (no downloads), and the tiny Megatron model imported from one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.config import LlamaConfig
from tests.helpers.models import CPU_ARCH

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


def make_hf_model(
    directory: Path,
    *,
    tie: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    heads: int = 8,
    groups: int = 4,
    vocab: int = 1000,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config: Any,
) -> dict[str, torch.Tensor]:
    """Save a random BF16 Llama (norms random too, not ones) to ``directory``; return its state dict.

    Skips the calling test where transformers is not installed.
    """
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        max_position_embeddings=16384 if rope_scaling else 2048,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        **config,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.05, 2.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}


def module_from_hf(hf_dir: str, world_size: int, arch_overrides: dict[str, Any], **strategy: Any) -> tuple[Any, Any]:
    """``LlamaLightningModule(init_weights=hf_dir)`` built by ``MegatronCPStrategy(**strategy)`` as configure_model
    runs it (also used by the pipeline tests)."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy, MegatronPrecision

    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=MegatronCPStrategy(**strategy),
                      plugins=[MegatronPrecision()], logger=False, enable_checkpointing=False)  # fmt: skip
    module = LlamaLightningModule(arch=LlamaConfig.from_hf(hf_dir, **arch_overrides), init_weights=hf_dir)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.strategy.setup_environment()
    torch.manual_seed(1)
    module.configure_model()
    return trainer.strategy, module


def import_and_save_worker(rank: int, world_size: int, hf_dir: str, ckpt_dir: str, tp: int) -> dict[str, Any]:
    from megatron.core import parallel_state

    from tests.helpers.distributed import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_from_hf(hf_dir, world_size, CPU_ARCH, tensor_model_parallel_size=tp)
    local = {name: param.detach().clone() for name, param in module.model.named_parameters()}
    strategy.save_checkpoint({"global_step": 3, "state_dict": module.state_dict()}, ckpt_dir)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    strategy.teardown()
    return {"tp_rank": tp_rank, "local": local}


def copy_hf_dir(hf_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    return copy


def edit_hf_config(directory: Path, **changes: Any) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def hf_module(directory: Path, **kwargs: Any) -> Any:
    from lightning_llama_fp8 import LlamaLightningModule

    return LlamaLightningModule(init_weights=str(directory), **kwargs)
