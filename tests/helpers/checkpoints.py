"""The tiny Llama on ``MegatronCPStrategy`` for the checkpoint tests: built, saved, loaded, gathered; and a
checkpoint record written directly where a real save would need CUDA."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.config import get_preset
from tests.helpers.fits import GBS
from tests.helpers.models import tiny_llama


def module_on_strategy(tp: int, world_size: int, seed: int) -> tuple[Any, Any]:
    """A LlamaLightningModule with its GPTModel built by ``MegatronCPStrategy(tp)``, as ``configure_model`` does."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy, MegatronPrecision

    strategy = MegatronCPStrategy(tensor_model_parallel_size=tp)
    trainer = Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        plugins=[MegatronPrecision()],
        logger=False,
        enable_checkpointing=False,
    )
    module = LlamaLightningModule(arch=tiny_llama())
    strategy.connect(module)
    module.trainer = trainer
    strategy.setup_environment()
    torch.manual_seed(seed)  # CPU initialisation draws the full weights from torch's generator, then slices
    module.configure_model()
    return strategy, module


def full_weights(module: Any) -> dict[str, torch.Tensor]:
    """Every weight gathered to its full shape over the TP group (TE/FP8 extra state left out)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = torch.distributed.get_world_size(group)
    full = {}
    for name, param in module.model.named_parameters():
        value = param.detach()
        dim = next(
            (d for d in (0, 1) if getattr(param, "partition_dim", -1) == d and param.tensor_model_parallel), None
        )
        if tp > 1 and dim is not None:
            parts = [torch.empty_like(value) for _ in range(tp)]
            torch.distributed.all_gather(parts, value.contiguous(), group=group)
            if name.endswith("linear_fc1.weight"):  # SwiGLU: each rank holds [its gate rows; its up rows]
                halves = [part.chunk(2, dim=0) for part in parts]
                parts = [half[0] for half in halves] + [half[1] for half in halves]
            value = torch.cat(parts, dim=dim)
        full[name] = value.clone()
    return full


def save_worker(rank: int, world_size: int, path: str, tp: int) -> dict[str, torch.Tensor]:
    from tests.helpers.distributed import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_on_strategy(tp, world_size, seed=0)
    lightning_state = {"global_step": 7, "state_dict": module.state_dict(), "loops": {"marker": "from the save"}}
    strategy.save_checkpoint(lightning_state, path)
    weights = full_weights(module)
    strategy.teardown()
    return weights


def load_worker(rank: int, world_size: int, path: str, tp: int) -> dict[str, Any]:
    strategy, module = module_on_strategy(tp, world_size, seed=1)  # other weights than the saved ones
    before = full_weights(module)
    restored = strategy.load_checkpoint(path)
    after = full_weights(module)
    strategy.teardown()
    return {"before": before, "after": after, "restored": {k: v for k, v in restored.items() if k != "state_dict"}}


def fake_resumable_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint's info as a Megatron-optimizer run of the tiny Llama writes it (the files' content not needed:
    the refusal comes first). Saved files need CUDA for Megatron's optimizer, so the record is written directly."""
    from lightning_llama_fp8 import OptimizerSettings

    path = tmp_path / "step=8.ckpt"
    path.mkdir()
    torch.save({"global_step": 8}, path / ckpt.LIGHTNING_FILENAME)
    (path / ckpt.MEGATRON_METADATA_FILENAME).write_text("{}")
    write_empty_index(path)
    info = ckpt.CheckpointInfo(
        path,
        8,
        1,
        1,
        1,
        arch=asdict(get_preset("llama_tiny")),
        optimizer_sharding="dp_reshardable",
        data={"global_batch_size": GBS, "train_index": [{"samples": 32, "seed": 1234}]},
        optimizer_settings=asdict(OptimizerSettings()),
        files=ckpt.record_files(path),
    )
    (path / ckpt.INFO_FILENAME).write_text(info.to_json())
    return path


def write_empty_index(path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata

    writer = FileSystemWriter(str(path))
    writer.set_up_storage_writer(True)
    writer.finish(Metadata(state_dict_metadata={}), [])
