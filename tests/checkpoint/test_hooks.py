"""The strategy's checkpoint hooks (StrategyCheckpointing): what a save writes, loading into another TP layout,
resuming through Lightning, gathering stale parameters before a save, and the pinned host memory reserved ahead of
the first background save."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import state_io
from lightning_llama_fp8.checkpoint.info import read_checkpoint_info
from tests.helpers import run_distributed
from tests.helpers.checkpoints import (
    load_worker,
    save_worker,
)
from tests.helpers.models import Recorder, tiny_llama


@pytest.mark.multiprocess
def test_tp2_checkpoint_layout_on_disk(tp2_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = tp2_checkpoint
    names = {p.name for p in path.iterdir()}
    assert {ckpt.INFO_FILENAME, ckpt.LIGHTNING_FILENAME, "metadata.json", ".metadata"} <= names
    assert any(name.endswith(".distcp") for name in names)
    assert not path.with_name(path.name + ".saving").exists()
    info = read_checkpoint_info(path)
    assert (info.global_step, info.tensor_model_parallel_size, info.context_parallel_size, info.world_size) == (
        7,
        2,
        1,
        2,
    )
    assert info.arch["num_layers"] == tiny_llama().num_layers and info.optimizer_sharding is None  # no optimizer saved
    assert json.loads((path / ckpt.INFO_FILENAME).read_text())["format"] == ckpt.FORMAT


@pytest.mark.multiprocess
def test_tp2_checkpoint_loads_into_one_rank(
    tp2_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, saved = tp2_checkpoint
    (result,) = run_distributed(load_worker, 1, tmp_path, str(path), 1)
    assert set(result["after"]) == set(saved)
    assert any(not torch.equal(result["before"][k], saved[k]) for k in saved)  # loading changed the weights...
    torch.testing.assert_close(result["after"], saved, rtol=0, atol=0)  # ...into exactly the saved ones
    assert result["restored"]["global_step"] == 7
    assert result["restored"]["loops"] == {"marker": "from the save"}


@pytest.mark.multiprocess
def test_tp1_checkpoint_loads_into_two_tp_ranks(tmp_path: Path) -> None:
    path = tmp_path / "tp1.ckpt"
    (saved,) = run_distributed(save_worker, 1, tmp_path / "save", str(path), 1)
    loaded = run_distributed(load_worker, 2, tmp_path / "load", str(path), 2)
    for rank in loaded:
        torch.testing.assert_close(rank["after"], saved, rtol=0, atol=0)


def _save_twice_then_onto_a_folder_worker(rank: int, world_size: int, root: str) -> list[str]:
    """ModelCheckpoint's flow (last.ckpt saved, then saved again over itself), then a save onto a run's folder:
    what each save raised on this rank ("" where it succeeded)."""
    from tests.helpers.checkpoints import module_on_strategy
    from tests.helpers.distributed import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_on_strategy(1, world_size, seed=0)
    raised = []
    for step, path in ((7, Path(root, "last.ckpt")), (8, Path(root, "last.ckpt")), (9, Path(root))):
        try:
            strategy.save_checkpoint({"global_step": step, "state_dict": module.state_dict()}, path)
            raised.append("")
        except ckpt.CheckpointError as err:
            raised.append(str(err))
    strategy.teardown()
    return raised


@pytest.mark.multiprocess
def test_a_save_onto_a_folder_is_refused_on_every_rank_before_any_shard_is_written(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "notes.txt").write_text("precious")
    results = run_distributed(_save_twice_then_onto_a_folder_worker, 2, tmp_path / "workers", str(root))
    for rank, raised in enumerate(results):
        assert raised[:2] == ["", ""], f"rank {rank}: {raised}"  # last.ckpt replaced by the second save
        refusal = raised[2]
        assert f"Cannot save the checkpoint at {root}: it is a directory that is not a checkpoint" in refusal, rank
        assert "(it holds last.ckpt, notes.txt)" in refusal and "Nothing was written or deleted" in refusal
    assert results[1][2].startswith("Saving the checkpoint failed on another rank")  # rank 0 checks, all raise
    assert sorted(p.name for p in root.iterdir()) == ["last.ckpt", "notes.txt"]
    assert (root / "notes.txt").read_text() == "precious"
    assert read_checkpoint_info(root / "last.ckpt").global_step == 8
    assert not list(tmp_path.glob("*.saving"))  # nothing was written for the refused save


def _load_warnings_worker(rank: int, world_size: int, path: str) -> list[str]:
    """Every warning loading ``path`` raises, however the caller filters (``always``), as ``category: message``."""
    import warnings

    from tests.helpers.checkpoints import module_on_strategy

    strategy, _ = module_on_strategy(1, world_size, seed=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strategy.load_checkpoint(path)
    finally:
        strategy.teardown()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.multiprocess
def test_loading_shows_none_of_torchs_messages_about_megatron_cores_reads(
    tp2_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """torch.distributed.checkpoint says "torch.distributed is disabled, unavailable or uninitialized" (megatron-core
    reads with no_dist=True on purpose), "The argument order of load has been changed" and, per ShardedTensor,
    "Please use DTensor instead" (several copies of each on every rank before the filter; a user can act on none of
    them); now none, on both ranks."""
    path, _ = tp2_checkpoint
    for messages in run_distributed(_load_warnings_worker, 2, tmp_path, str(path)):
        noise = [m for m in messages if "torch.distributed" in m or "argument order" in m or "DTensor" in m]
        assert noise == [], noise


SEQ, GBS = 64, 4


def _resume_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Train 4 steps saving every 2 (ModelCheckpoint), then resume a fresh run from step 2: what did each see?"""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import allow_dist_checkpointing_on_cpu, megatron_cpu_trainer
    from tests.helpers.models import Recorder, mock_data

    allow_dist_checkpointing_on_cpu()

    def run(ckpt_path: str | None, max_steps: int = 4) -> tuple[Recorder, Any, list[str]]:
        module = Recorder(SEQ, momentum=0.9)  # momentum: optimizer state that must survive a resume
        data = mock_data(SEQ, GBS)
        saver = ModelCheckpoint(dirpath=Path(root, "ckpts"), every_n_train_steps=2, save_top_k=-1, save_last="link")
        trainer = megatron_cpu_trainer(
            world_size, max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, trainer, [str(w.message) for w in caught]

    first, first_trainer, _ = run(None)
    last_after_first = read_checkpoint_info(Path(root, "ckpts", "last.ckpt")).global_step
    step2 = sorted(Path(root, "ckpts").glob("*step=2*"))
    resumed, resumed_trainer, messages = run(str(step2[0]))  # the run's first checkpoint
    last_after_resume = os.readlink(Path(root, "ckpts", "last.ckpt"))
    last_names = sorted(p.name for p in Path(root, "ckpts").glob("last*"))
    continued, continued_trainer, _ = run("last", max_steps=6)  # Lightning resolves "last" to the link
    return {
        "last_after_first": last_after_first,
        "last_after_resume": last_after_resume,
        "last_names": last_names,
        "continued": (continued_trainer.global_step, len(continued.seen)),
        "first_seen": first.seen,
        "resumed_seen": resumed.seen,
        "first_weight": first.weight.detach().clone(),
        "resumed_weight": resumed.weight.detach().clone(),
        "global_steps": (first_trainer.global_step, resumed_trainer.global_step),
        "checkpoints": sorted(p.name for p in Path(root, "ckpts").iterdir() if not p.is_symlink()),
        "messages": messages,
    }


@pytest.mark.multiprocess
def test_resumed_run_continues_with_the_next_batches_and_the_saved_weights(tmp_path: Path) -> None:
    """Lightning's ModelCheckpoint and fit(ckpt_path=...) through MegatronCPStrategy on two DP ranks."""
    results = run_distributed(_resume_worker, 2, tmp_path / "workers", str(tmp_path))
    for rank in results:
        assert rank["global_steps"] == (4, 4)
        # step 4 twice: the first run's, and the resumed run's (ModelCheckpoint adds -v1 to a name in use)
        assert rank["checkpoints"] == [
            "epoch=0-step=2.ckpt",
            "epoch=0-step=4-v1.ckpt",
            "epoch=0-step=4.ckpt",
            "epoch=1-step=6.ckpt",  # the 4-step run had ended its epoch; the longer run starts the next
        ]
        assert len(rank["first_seen"]) == 4
        assert rank["resumed_seen"] == rank["first_seen"][2:]  # the data position was restored...
        torch.testing.assert_close(rank["resumed_weight"], rank["first_weight"])  # ...and the weights
        assert not [m for m in rank["messages"] if "not resumable" in m]
        # The resumed run continues its own checkpoint directory: Lightning's warning for a new run writing into
        # another run's directory is not said (it still is for any other directory: tests/_compat/test_warnings.py).
        assert not [m for m in rank["messages"] if "exists and is not empty" in m], rank["messages"]
        assert rank["last_after_first"] == 4  # save_last="link": last.ckpt points at the newest checkpoint
        # Resumed from the run's first checkpoint (whose saved state remembers no last.ckpt), the run renewed
        # last.ckpt rather than starting last-v1.ckpt beside it (which left last.ckpt at step 2).
        assert rank["last_after_resume"] == "epoch=0-step=4-v1.ckpt"
        assert rank["last_names"] == ["last.ckpt"]
        assert rank["continued"] == (6, 2)  # fit(ckpt_path="last") went on from step 4 for two more steps
    assert set(results[0]["first_seen"][0]).isdisjoint(results[1]["first_seen"][0])  # two DP shards
    info = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=2.ckpt")
    assert info.global_step == 2 and info.world_size == 2


class _FakeDDP:
    """Megatron DDP's hook bookkeeping: handles registered while overlapped param gathers are on."""

    def __init__(self, hooks_on: bool) -> None:
        self.remove_forward_pre_hook_handles = {"layer": object()} if hooks_on else {}
        self.calls: list[str] = []

    def disable_forward_pre_hook(self, param_sync: bool = True) -> None:
        self.calls.append(f"disable(param_sync={param_sync})")
        self.remove_forward_pre_hook_handles = {}

    def enable_forward_pre_hook(self) -> None:
        self.calls.append("enable")
        self.remove_forward_pre_hook_handles = {"layer": object()}


def test_save_gathers_parameters_that_overlapped_gathers_left_stale() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    strategy = MegatronCPStrategy()
    training, validating = _FakeDDP(hooks_on=True), _FakeDDP(hooks_on=False)  # validation already synced
    strategy._ddp_modules = [training, validating]
    with strategy.checkpointing.parameters_gathered():
        assert training.calls == ["disable(param_sync=True)"]
    assert training.calls == ["disable(param_sync=True)", "enable"]
    assert validating.calls == []


class _FakeCheckpointTrainer:
    def __init__(self, global_step: int, savers: list[Any]) -> None:
        self.global_step, self.checkpoint_callbacks = global_step, savers


class _FakeMegatronOptimizer:
    """A Megatron optimizer around a torch optimizer whose state appears at its first real step."""

    def __init__(self, has_state: bool) -> None:
        self.optimizer = SimpleNamespace(state={0: {"exp_avg": None}} if has_state else {})


def _reserve_setup(
    monkeypatch: pytest.MonkeyPatch,
    step: int,
    savers: list[str],
    async_save: bool = True,
    device: str = "cuda",
    sharding: str = "dp_reshardable",
    optimizer: Any = None,
    sizing_error: Exception | None = None,
    available: int | None = 2**40,
    ranks: int = 1,
) -> tuple[Any, Any, list[str], list[Any]]:
    from lightning_llama_fp8.checkpoint import background as async_checkpoint
    from lightning_llama_fp8.checkpoint.hooks import StrategyCheckpointing

    started: list[Any] = []
    monkeypatch.setattr(
        async_checkpoint.PinnedHostReserve, "start", lambda self, sizes, device: started.append((sizes, device))
    )
    asked: list[str] = []

    def host_copy_sizes(models: Any, optimizer: Any, sharding: str, group: Any) -> list[int]:
        asked.append("model+optimizer" if optimizer is not None else "model")
        if sizing_error is not None:
            raise sizing_error
        return [2**20, 2**30]

    monkeypatch.setattr(state_io, "host_copy_sizes", host_copy_sizes)
    monkeypatch.setattr(async_checkpoint, "available_host_memory", lambda: available)
    trainer = _FakeCheckpointTrainer(step, [SimpleNamespace(save_weights_only=s == "weights") for s in savers])
    strategy = SimpleNamespace(
        async_save=async_save,
        lightning_module=SimpleNamespace(trainer=trainer),
        root_device=torch.device(device),
        checkpoint_optimizer_sharding=sharding,
        data_parallel_group=lambda: None,
        num_processes=ranks,
    )
    checkpointing = StrategyCheckpointing(strategy)  # type: ignore[arg-type]
    monkeypatch.setattr(checkpointing, "megatron_models", lambda: {"model": None})
    the_optimizer = optimizer if optimizer is not None else _FakeMegatronOptimizer(has_state=True)
    monkeypatch.setattr(checkpointing, "megatron_optimizer", lambda: the_optimizer)
    return checkpointing, trainer, asked, started


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"step": 1, "savers": ["full"]}, "model+optimizer"),  # after the first step: the optimizer state exists
        ({"step": 1, "savers": ["weights"]}, "model"),  # every saver weights-only: no optimizer in the save
        ({"step": 1, "savers": ["weights", "full"]}, "model+optimizer"),
        # fully_reshardable gathers the optimizer state into CPU tensors the save does not copy: not built here.
        ({"step": 1, "savers": ["full"], "sharding": "fully_reshardable"}, "model"),
        ({"step": 3, "savers": ["full"], "async_save": False}, None),  # synchronous saves pin nothing ahead
        ({"step": 3, "savers": []}, None),  # nothing will save during fit
        ({"step": 3, "savers": ["full"], "device": "cpu"}, None),  # no pinned memory without CUDA
    ],
)
def test_reserve_host_copy_starts_once_when_a_background_save_will_come(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], expect: str | None
) -> None:
    checkpointing, trainer, asked, started = _reserve_setup(monkeypatch, **options)
    checkpointing.reserve_host_copy()
    assert asked == ([expect] if expect else [])
    assert started == ([([2**20, 2**30], torch.device(options.get("device", "cuda")))] if expect else [])
    trainer.global_step += 1
    checkpointing.reserve_host_copy()  # the next step: never a second reserve
    assert len(started) == (1 if expect else 0)


def test_reserve_host_copy_waits_for_a_first_step_and_an_optimizer_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 0, and a first step whose update was skipped (Megatron creates the optimizer state lazily): not yet."""
    optimizer = _FakeMegatronOptimizer(has_state=False)
    checkpointing, trainer, asked, started = _reserve_setup(monkeypatch, 0, ["full"], optimizer=optimizer)
    checkpointing.reserve_host_copy()
    trainer.global_step = 1
    checkpointing.reserve_host_copy()
    assert asked == [] and started == []
    optimizer.optimizer.state[0] = {"exp_avg": None}  # the second step updated
    trainer.global_step = 2
    checkpointing.reserve_host_copy()
    assert asked == ["model+optimizer"] and len(started) == 1


def test_reserve_host_copy_logs_a_sizing_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointing, trainer, asked, started = _reserve_setup(
        monkeypatch, 1, ["full"], sizing_error=KeyError("master_param")
    )
    checkpointing.reserve_host_copy()  # does not raise: the save will pin for itself
    assert started == [] and "Could not size the host copy of a checkpoint" in caplog.text
    trainer.global_step = 2
    checkpointing.reserve_host_copy()
    assert asked == ["model+optimizer"]  # tried once only


@pytest.mark.parametrize(
    ("available", "ranks", "pinned"), [(3 * 2**29, 1, True), (3 * 2**29, 2, False), (None, 8, True)]
)
def test_reserve_host_copy_pins_nothing_ahead_that_the_machine_cannot_hold(
    monkeypatch: pytest.MonkeyPatch, available: int | None, ranks: int, pinned: bool
) -> None:
    """Blocks of 1 MiB and 1 GiB: 1.001 GiB per rank, which 1.5 GiB available holds for one rank but not for two;
    ``None``: /proc/meminfo unreadable, nothing to check against."""
    checkpointing, _, _, started = _reserve_setup(monkeypatch, 1, ["full"], available=available, ranks=ranks)
    expect_warning = pytest.warns(UserWarning, match=r"\(2 ranks on this machine: 2.0 GiB\), more than the 1.5 GiB")
    with contextlib.nullcontext() if pinned else expect_warning:
        checkpointing.reserve_host_copy()
    assert len(started) == (1 if pinned else 0)
