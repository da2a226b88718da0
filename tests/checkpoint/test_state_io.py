"""Megatron's sharded state in and out: the host copy a background save stages, TE's pickled FP8 state, and load
errors that say what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint import state_io
from lightning_llama_fp8.checkpoint.info import CheckpointError
from tests.helpers import run_distributed
from tests.helpers.checkpoints import (
    full_weights,
    module_on_strategy,
)
from tests.helpers.models import tiny_llama


def _host_copy_sizes_worker(rank: int, world_size: int, tp: int, path: str) -> dict[str, Any]:
    """``host_copy_sizes`` against what Megatron's writer really stages in a save of the same model on this rank."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from tests.helpers import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_on_strategy(tp, world_size, seed=0)
    models = strategy.checkpointing.megatron_models()
    sizes = state_io.host_copy_sizes(models, None, "dp_reshardable", strategy.data_parallel_group(), device_type="cpu")
    staged: list[int] = []
    preload = FileSystemWriterAsync.preload_tensors

    def recording_preload(write_buckets: Any, non_blocking: bool = True) -> Any:
        for _, _, (_, tensor_data) in write_buckets:
            staged.extend(tensor.numel() * tensor.dtype.itemsize for _, tensor in tensor_data)
        return preload(write_buckets, non_blocking)

    FileSystemWriterAsync.preload_tensors = staticmethod(recording_preload)  # type: ignore[method-assign]
    try:
        strategy.save_checkpoint({"global_step": 1, "state_dict": module.state_dict()}, path)
    finally:
        FileSystemWriterAsync.preload_tensors = staticmethod(preload)  # type: ignore[method-assign]
    full_bytes = sum(w.numel() * w.element_size() for w in full_weights(module).values())
    params = len(list(module.model.parameters()))
    strategy.teardown()
    return {"sizes": sizes, "staged": staged, "full_bytes": full_bytes, "params": params}


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp", [1, 2])
def test_host_copy_sizes_are_what_the_writer_stages(tp: int, tmp_path: Path) -> None:
    """What the pinned-memory reserve for the first background save is sized by (``PinnedHostReserve``): on each
    rank, the very tensor sizes Megatron's writer stages for host memory in a real save (its ``preload_tensors``);
    together the ranks copy every weight once (a TP-replicated norm by one rank only), split as the save splits them
    (SwiGLU's fused fc1 into its two halves: more tensors than parameters)."""
    results = run_distributed(_host_copy_sizes_worker, tp, tmp_path / "workers", tp, str(tmp_path / "step=1.ckpt"))
    for result in results:
        assert sorted(result["sizes"]) == sorted(result["staged"]) and result["sizes"]
    assert sum(sum(r["sizes"]) for r in results) == results[0]["full_bytes"]
    assert len(results[0]["sizes"]) == results[0]["params"] + tiny_llama().num_layers  # each layer's fc1 in two


class _PickledFP8State(torch.nn.Module):
    """Stands in for a TE layer with delayed scaling: its extra state loads only with TE's pickle opt-in."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.loaded_extra_state: object = None

    def get_extra_state(self) -> object:
        return b"pickled amax history"

    def set_extra_state(self, state: object) -> None:
        if os.environ.get(state_io.TE_UNSAFE_PICKLE_ENV) != "1":  # what TE 2.20's set_extra_state does
            raise RuntimeError("Refusing to load pickled Transformer Engine extra state for TELinear. ...")
        self.loaded_extra_state = state

    def sharded_state_dict(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("preset", [None, "0"])
def test_te_fp8_pickles_load_with_the_opt_in_scoped_to_the_load(
    preset: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """TE 2.20 refuses even its own delayed-scaling state without NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1; the load
    turns it on for itself only and leaves the variable as it found it."""
    from megatron.core import dist_checkpointing

    layer = _PickledFP8State()
    saved = {"weight": torch.ones(2), "_extra_state": b"pickled amax history"}
    monkeypatch.setattr(dist_checkpointing, "load_content_metadata", lambda directory: {})
    monkeypatch.setattr(dist_checkpointing, "load", lambda template, directory: {"model": saved})
    if preset is None:
        monkeypatch.delenv(state_io.TE_UNSAFE_PICKLE_ENV, raising=False)
    else:
        monkeypatch.setenv(state_io.TE_UNSAFE_PICKLE_ENV, preset)
    with pytest.raises(RuntimeError, match="Refusing to load pickled"):  # what TE does outside our load
        layer.load_state_dict(saved)
    state_io.load_megatron_state(tmp_path, {"model": layer}, None, None)
    assert layer.loaded_extra_state == b"pickled amax history" and torch.equal(layer.weight, torch.ones(2))
    assert os.environ.get(state_io.TE_UNSAFE_PICKLE_ENV) == preset


def test_changed_learning_rates_give_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Megatron pairs saved optimizer groups with the current ones by their LR settings and fails with a bare
    KeyError/ValueError when they differ; the load says what to do instead."""
    from megatron.core import dist_checkpointing

    class ChangedGroups:
        def sharded_state_dict(self, model_state: dict, is_loading: bool, metadata: dict) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            raise ValueError("Could not find parameter group with max_lr=0.0003")

    monkeypatch.setattr(dist_checkpointing, "load_content_metadata", lambda directory: {})
    monkeypatch.setattr(dist_checkpointing, "load", lambda template, directory: {"optimizer": {}})
    with pytest.raises(CheckpointError, match=r"optimizer state does not fit .* resume with the optimizer settings"):
        state_io.load_megatron_state(tmp_path, {}, ChangedGroups(), None)


def test_shard_read_errors_name_the_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    def fail(template: Any, directory: str) -> None:
        raise RuntimeError("Global shape mismatch for loaded (torch.Size([2])) and expected (torch.Size([3]))")

    monkeypatch.setattr(dist_checkpointing, "load_content_metadata", lambda directory: {})
    monkeypatch.setattr(dist_checkpointing, "load", fail)
    with pytest.raises(CheckpointError, match=rf"Checkpoint {re.escape(str(tmp_path))}: reading its shards failed .*"):
        state_io.load_megatron_state(tmp_path, {}, None, None)
