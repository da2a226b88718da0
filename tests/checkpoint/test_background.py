"""Asynchronous checkpoints (``MegatronCPStrategy(async_save=True)``) through ``Trainer.fit`` and ``ModelCheckpoint``.

Everything runs for real in gloo processes on the CPU: megatron-core's background save (``AsyncCallsQueue``, a
forked writer per save, its finalize collectives) needs no stub beyond ``allow_dist_checkpointing_on_cpu``'s two
(its D2H wait is ``torch.cuda.synchronize``, its all-reduce flags live on ``torch.cuda.current_device()``). The
Megatron model is a small ``MegatronModule`` of which each rank holds its own shard, so both ranks' writers run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import state_io
from lightning_llama_fp8.checkpoint.info import read_checkpoint_info
from lightning_llama_fp8.checkpoint.resume import resolve_last_checkpoint
from tests.helpers import run_distributed

SEQ, VOCAB, GBS = 16, 1000, 4
STEP = "epoch=0-step={}.ckpt"


# ---------------------------------------------------------------------------------------------- harness
def _fit(root: str, ckpt_path: str | None = None, **options: Any) -> dict[str, Any]:
    """One ``trainer.fit`` in this gloo process; returns what the module and the probes saw.

    ``options``: ``async_save``, ``max_steps``, ``save_top_k``, ``save_last``, ``dirpath`` and ``probe_at`` (the
    0-based batch indices at whose start, before the strategy finalizes anything, the directory is looked at).
    """
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from lightning_llama_fp8 import MegatronPrecision
    from tests.helpers import StrategyWithoutDDP, allow_dist_checkpointing_on_cpu, cpu_trainer
    from tests.helpers.models import mock_data

    allow_dist_checkpointing_on_cpu()
    # As tests/helpers/distributed.py sets them (Lightning deletes WORLD_SIZE at the end of each fit).
    rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])

    class RankShards(MegatronModule):
        """A Megatron model of which each rank holds its own slice: every rank's writer has something to write."""

        def __init__(self) -> None:
            config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, use_cpu_initialization=True)
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)
            with torch.no_grad():
                self.linear.weight.copy_(torch.arange(16.0).reshape(4, 4) / (rank + 3))
                self.linear.bias.fill_(float(rank))

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
            return {
                f"{prefix}linear.{name}": ShardedTensor.from_rank_offsets(
                    f"{prefix}linear.{name}", tensor, (0, rank, world), replica_id=0, prepend_axis_num=1
                )
                for name, tensor in self.linear.state_dict(keep_vars=True).items()
            }

    class Recorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = RankShards()
            self.extra = torch.nn.Parameter(torch.zeros(3))  # outside the Megatron model: saved in lightning.pt
            self.seen: list[list[int]] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.seen.append([hash(tuple(s.tolist())) for s in batch["tokens"].reshape(-1, SEQ)])
            # No Megatron DDP on the CPU, and lightning.pt holds rank 0's SGD state: the gradients must be the same on
            # every rank, so the slice's term is linear (each rank's slice still takes its own values).
            slope = torch.arange(16.0).reshape(4, 4) / 16
            return (self.model.linear.weight * slope).sum() + ((self.extra - 1.0) ** 2).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)  # momentum: state lightning.pt holds

    dirpath = Path(options.pop("dirpath", Path(root, "ckpts")))
    probe_at = set(options.pop("probe_at", ()))
    kill_at = options.pop("kill_at", None)

    class Probe(Callback):
        """Looks at the checkpoint directory at a step's start, before the strategy's finalize (callbacks first)."""

        def __init__(self) -> None:
            self.views: dict[int, dict[str, Any]] = {}
            self.saver: Any = None  # the strategy's background saver, kept past teardown for its timings

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.saver = trainer.strategy.checkpointing.async_saver

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == kill_at:
                _kill_this_rank()
            if batch_idx not in probe_at:
                return
            pending = trainer.strategy.pending_checkpoint
            self.views[batch_idx] = {
                "pending": None if pending is None else pending.name,
                "listing": _listing(dirpath),
                "last": _resolve_last(dirpath),
            }

    records = _capture_megatron_save_log()
    module = Recorder()
    data = mock_data(SEQ, GBS, VOCAB)
    saver = ModelCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=2,
        save_top_k=options.pop("save_top_k", -1),
        save_last=options.pop("save_last", None),
    )
    probe = Probe()
    strategy = StrategyWithoutDDP(async_save=options.pop("async_save"))
    trainer = cpu_trainer(
        devices=world,
        strategy=strategy,
        plugins=[MegatronPrecision()],
        enable_checkpointing=True,
        callbacks=[saver, probe],
        limit_val_batches=0,
        max_steps=options.pop("max_steps", 4),
    )
    assert not options, options
    error = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Exception as err:
        error = (type(err).__name__, str(err))
    return {
        "error": error,
        "step": trainer.global_step,
        "seen": module.seen,
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()],
        "views": probe.views,
        "listing": _listing(dirpath),
        "last": _resolve_last(dirpath),
        "pending_after_fit": strategy.pending_checkpoint,
        "megatron_save_log": list(records),
        "timings": [(t.step, t.waited_for_previous_s, t.write_s) for t in getattr(probe.saver, "timings", [])],
    }


def _listing(directory: Path) -> dict[str, str]:
    """Each entry: 'complete', 'link -> <target>' or 'not a checkpoint (<reason>)'."""
    entries: dict[str, str] = {}
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        if entry.is_symlink():
            entries[entry.name] = f"link -> {os.readlink(entry)}"
            continue
        try:
            read_checkpoint_info(entry)
            entries[entry.name] = "complete"
        except ckpt.CheckpointError as err:
            entries[entry.name] = f"not a checkpoint ({err})"
    return entries


def _resolve_last(directory: Path) -> str | None:
    newest = resolve_last_checkpoint([directory])
    return None if newest is None else newest.name


def _capture_megatron_save_log() -> list[str]:
    """What megatron-core's checkpoint strategy logs from now on, as it reaches its logger's handlers."""
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addHandler(Keep())
    return records


def _kill_this_rank() -> None:
    """SIGKILL this rank and its child processes (the forked checkpoint writer, Megatron's result-queue manager) at
    once, as a node failure would. The children go first: a forked child holds the rank's exit pipe open, and the
    test's process launcher would wait for it forever."""
    import multiprocessing

    torch.distributed.barrier()  # every rank got here (the save of step 4 is scheduled everywhere)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _dcp_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's Megatron shards, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- sync vs async
def _sync_async_and_resume(rank: int, world_size: int, root: str) -> dict[str, Any]:
    sync = _fit(root, async_save=False, dirpath=Path(root, "sync"))
    asynchronous = _fit(root, async_save=True, dirpath=Path(root, "async"), probe_at=(2,))
    resumed = _fit(root, str(Path(root, "async", STEP.format(2))), async_save=True, dirpath=Path(root, "resumed"))
    top1 = _fit(
        root, async_save=True, dirpath=Path(root, "top1"), max_steps=6, save_top_k=1, save_last="link", probe_at=(4,)
    )
    return {"sync": sync, "async": asynchronous, "resumed": resumed, "top1": top1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("async")
    return root, run_distributed(_sync_async_and_resume, 2, root / "workers", str(root))


@pytest.mark.multiprocess
def test_async_checkpoint_equals_the_sync_one_of_the_same_step(
    runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Also: the weights trained on while step 2 was written, and the checkpoint still holds step 2's."""
    root, results = runs
    for rank in results:
        assert rank["sync"]["error"] is None and rank["async"]["error"] is None
        torch.testing.assert_close(rank["async"]["weights"], rank["sync"]["weights"], rtol=0, atol=0)
    saved = {}
    for step in (2, 4):
        sync, asynchronous = root / "sync" / STEP.format(step), root / "async" / STEP.format(step)
        assert sorted(p.name for p in asynchronous.iterdir()) == sorted(p.name for p in sync.iterdir())
        assert any(p.suffix == ".distcp" for p in asynchronous.iterdir())
        sync_tensors, async_tensors = _dcp_tensors(sync, tmp_path), _dcp_tensors(asynchronous, tmp_path)
        assert set(async_tensors) == {"linear.weight", "linear.bias"}
        assert async_tensors["linear.weight"].shape == (2, 4, 4)  # both ranks' slices were written
        torch.testing.assert_close(async_tensors, sync_tensors, rtol=0, atol=0)
        sync_state = state_io.load_lightning_state(sync)
        async_state = state_io.load_lightning_state(asynchronous)
        for key in ("global_step", "epoch", "loops", "state_dict", "optimizer_states", "lr_schedulers"):
            torch.testing.assert_close(async_state[key], sync_state[key], rtol=0, atol=0)
        assert read_checkpoint_info(asynchronous).global_step == step
        saved[step] = (async_tensors["linear.weight"], async_state["state_dict"]["extra"])
    assert not torch.equal(saved[2][0], saved[4][0]) and not torch.equal(saved[2][1], saved[4][1])


@pytest.mark.multiprocess
def test_resuming_from_an_async_checkpoint_continues_identically(runs: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = runs
    for rank in results:
        resumed, first = rank["resumed"], rank["async"]
        assert resumed["error"] is None and resumed["step"] == 4
        assert resumed["seen"] == first["seen"][2:]  # the data position...
        torch.testing.assert_close(resumed["weights"], first["weights"], rtol=0, atol=0)  # ...the weights...
        torch.testing.assert_close(resumed["momentum"], first["momentum"], rtol=0, atol=0)  # ...and the optimizer
    assert not torch.equal(
        results[0]["async"]["weights"]["model.linear.weight"], results[1]["async"]["weights"]["model.linear.weight"]
    )  # each rank got its own slice back


@pytest.mark.multiprocess
def test_the_save_runs_in_the_background_and_is_published_before_fit_returns(
    runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, results = runs
    for rank in results:
        run = rank["async"]
        at_step_3 = run["views"][2]
        assert at_step_3["pending"] == STEP.format(2)  # save_checkpoint returned before the checkpoint was there
        assert STEP.format(2) not in at_step_3["listing"]
        assert at_step_3["listing"][STEP.format(2) + ".saving"].startswith("not a checkpoint")
        # The save at the last step has no later step to publish it: fit waited for it.
        assert run["pending_after_fit"] is None
        assert run["listing"] == {STEP.format(2): "complete", STEP.format(4): "complete"}
        # Each save's step, whether it waited for the one before, and its write time (all published by now).
        assert [step for step, _, _ in run["timings"]] == [2, 4]
        assert run["timings"][0][1] == 0.0 and run["timings"][1][1] >= 0.0
        assert all(write_s is not None and write_s >= 0.0 for _, _, write_s in run["timings"])
        assert not [m for m in run["megatron_save_log"] if m.startswith("MCore's async save is deprecated")]
    assert not list((root / "async").glob("*.saving"))


@pytest.mark.multiprocess
def test_top_1_with_last_link_keeps_the_previous_checkpoint_until_the_new_one_is_published(
    runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, results = runs
    for rank in results:
        run = rank["top1"]
        assert run["error"] is None
        at_step_5 = run["views"][4]  # step 4 saved in the background; ModelCheckpoint already relinked and "deleted"
        assert at_step_5["pending"] == STEP.format(4)
        assert at_step_5["listing"][STEP.format(2)] == "complete"  # kept until step 4 is published
        assert at_step_5["listing"]["last.ckpt"] == f"link -> {STEP.format(4)}"  # not there yet...
        assert STEP.format(4) not in at_step_5["listing"]
        assert at_step_5["last"] == STEP.format(2)  # ...so 'last' resolves to the newest complete one
        assert run["listing"] == {STEP.format(6): "complete", "last.ckpt": f"link -> {STEP.format(6)}"}
    assert read_checkpoint_info(root / "top1" / "last.ckpt").global_step == 6


# ---------------------------------------------------------------------------------------------- kill, failure
def _killed_during_the_write(rank: int, world_size: int, root: str) -> None:
    _fit(root, async_save=True, max_steps=6, save_top_k=1, save_last="link", kill_at=4)
    raise AssertionError("not killed")


def _resume(rank: int, world_size: int, root: str, ckpt_path: str) -> dict[str, Any]:
    return _fit(root, ckpt_path, async_save=True, max_steps=6, save_top_k=1, save_last="link")


@pytest.mark.multiprocess
def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint_to_resume_from(tmp_path: Path) -> None:
    """SIGKILL on every rank at the start of step 5: step 4's shards are written or being written, not published."""
    from lightning_llama_fp8.cli import fit as cli

    with pytest.raises(Exception, match=r"signal|SIGKILL|exited"):
        run_distributed(_killed_during_the_write, 2, tmp_path / "workers", str(tmp_path))
    directory = tmp_path / "ckpts"
    listing = _listing(directory)
    assert listing[STEP.format(2)] == "complete"  # ModelCheckpoint asked to delete it; the save was not published
    assert STEP.format(4) not in listing and (directory / (STEP.format(4) + ".saving")).is_dir()
    assert listing["last.ckpt"] == f"link -> {STEP.format(4)}"
    assert resolve_last_checkpoint([directory]) == directory / STEP.format(2)
    config = {"trainer": {"callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(directory)}}]}}
    resolved = cli.resolve_last_from_config(config)  # what `llama-fp8 fit --ckpt_path last` resumes from
    assert resolved == str(directory / STEP.format(2))
    results = run_distributed(_resume, 2, tmp_path / "resume", str(tmp_path), resolved)
    for rank in results:
        assert rank["error"] is None and rank["step"] == 6 and len(rank["seen"]) == 4  # steps 3..6
    # Step 2 stays: Lightning never deletes the checkpoint a run resumed from; the re-saved step 4 was rotated out.
    assert _listing(directory) == {
        STEP.format(2): "complete",
        STEP.format(6): "complete",
        "last.ckpt": f"link -> {STEP.format(6)}",
    }


def _write_fails_on_rank_1_at_step_4(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data

    def write(transform_list: Any, local_proc_idx: int, write_bucket: Any, *args: Any, **kwargs: Any) -> Any:
        if rank == 1 and STEP.format(4) in write_bucket[0]:  # runs in the forked writer, which inherits the patch
            raise OSError(28, "No space left on device (simulated)")
        return original(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(write)  # type: ignore[method-assign]
    return _fit(root, async_save=True, max_steps=6, save_top_k=1, save_last="link")


@pytest.mark.multiprocess
def test_a_failed_background_write_is_raised_on_every_rank_and_damages_nothing(tmp_path: Path) -> None:
    results = run_distributed(_write_fails_on_rank_1_at_step_4, 2, tmp_path / "workers", str(tmp_path))
    directory = tmp_path / "ckpts"
    for rank in results:
        assert rank["error"] is not None, "the failed write went unnoticed"
        kind, message = rank["error"]
        assert kind == "CheckpointError"
        assert f"Saving checkpoint {directory / STEP.format(4)} in the background failed" in message
        assert "No space left on device (simulated)" in message  # rank 1's reason, on rank 0 too
        assert "kept instead of deleted" in message and STEP.format(2) in message
        assert rank["step"] in (4, 5, 6)  # raised at the first finalize after step 4's save
        assert rank["pending_after_fit"] is None
    listing = _listing(directory)
    assert listing[STEP.format(2)] == "complete"  # size and digest of every file as saved
    assert STEP.format(4) not in listing
    assert resolve_last_checkpoint([directory]) == directory / STEP.format(2)


# ---------------------------------------------------------------------------------------------- waiting for a write
class _Request:
    """Megatron's ``AsyncRequest`` as the saver uses it: finalize functions to run once the write is done."""

    def __init__(self) -> None:
        self.finalize_fns: list[Any] = []

    def add_finalize_fn(self, fn: Any) -> None:
        self.finalize_fns.append(fn)


class _TimedWrites:
    """Megatron's ``AsyncCallsQueue`` with writes that take ``write_s`` on a fake clock: a blocking finalize moves the
    clock to the end of the write, a non-blocking one finds it done only once the clock is past it."""

    def __init__(self, clock: Any, write_s: float) -> None:
        self.clock, self.write_s = clock, write_s
        self.running: list[tuple[float, _Request]] = []

    def schedule_async_request(self, request: _Request) -> None:
        self.running.append((self.clock() + self.write_s, request))

    def maybe_finalize_async_calls(self, blocking: bool = False) -> list[int]:
        if not self.running:
            return []
        done_at, request = self.running[0]
        if self.clock() < done_at:
            if not blocking:
                return []
            self.clock.advance(done_at - self.clock())
        self.running.pop(0)
        for fn in request.finalize_fns:
            fn()
        return [0]


def test_a_save_during_the_previous_write_waits_for_it_and_says_how_long_and_how_to_avoid_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Saves 8 steps (8 s) apart while a write takes 24 s: the second save waits 16 s for the first write (what an
    H100 run showed as a 16.4 s block), and the log says so with the interval that would not wait."""
    import logging
    import time

    from lightning_llama_fp8.checkpoint import background
    from tests.helpers.timed import FakeClock

    clock = FakeClock()
    monkeypatch.setattr(background, "time", SimpleNamespace(monotonic=clock, perf_counter=time.perf_counter))
    saver = background.AsyncCheckpointSaver(agree=lambda failure: failure)
    saver._queue = _TimedWrites(clock, write_s=24.0)  # type: ignore[assignment]

    def save(step: int) -> None:
        saver.save(
            tmp_path / STEP.format(step),
            is_rank_zero=True,
            plan_shards=lambda directory: _Request(),
            write_rank_zero_files=lambda directory: (directory / "lightning.pt").write_bytes(b"state"),
            step=step,
        )

    def train(steps: int) -> None:  # one second per step; each step start publishes a finished write, never waits
        for _ in range(steps):
            saver.finalize(blocking=False)
            clock.advance(1.0)

    with caplog.at_level(logging.WARNING, logger="lightning_llama_fp8.checkpoint.background"):
        save(8)
        train(8)
        save(16)
        waited = caplog.text
        caplog.clear()
        train(30)  # the step-16 write ends 24 s after its save, found done at the step start then
        save(46)  # no write running: no wait
        clock.advance(30.0)  # no step starts (a long validation, say): the step-46 write ends unpublished
        save(47)  # published now, without waiting
    assert "Waited 16.0 s for the previous checkpoint write (epoch=0-step=8.ckpt) to finish before saving step 16" in (
        waited
    )
    assert "that write took 24.0 s, and the two saves came 8.0 s apart (8 steps)" in waited
    assert "Save at least 24 s apart (every 24 steps or more at 1.00 s per step)" in waited
    assert caplog.text == ""  # the later saves did not wait
    timings = [(t.step, t.waited_for_previous_s, t.write_s) for t in saver.timings]
    assert timings == [(8, 0.0, 24.0), (16, 16.0, 24.0), (46, 0.0, 30.0), (47, 0.0, None)]
    # Each waited-for checkpoint was published whole before the next save began.
    assert sorted(p.name for p in tmp_path.iterdir()) == [STEP.format(s) for s in (16, 46)] + [
        STEP.format(47) + ".saving",
        STEP.format(8),
    ]


def test_the_wait_message_names_the_path_where_the_step_is_unknown() -> None:
    from lightning_llama_fp8.checkpoint.background import SaveTiming, _PendingSave, _wait_message

    previous = _PendingSave(Path("a.ckpt"), True, timing=SaveTiming(Path("a.ckpt"), None, 0.0))
    message = _wait_message(previous, waited=3.0, since_s=2.0, path=Path("b.ckpt"), step=None)
    assert message.startswith("Waited 3.0 s for the previous checkpoint write (a.ckpt) to finish before saving b.ckpt")
    assert "that write took 5.0 s, and the two saves came 2.0 s apart. Save at least 5 s apart, or write faster" in (
        message
    )


# ---------------------------------------------------------------------------------------------- pinned host memory
def test_pinned_host_reserve_holds_every_block_until_all_are_pinned() -> None:
    """Freed one by one, each block would only be reused by the next request of its size class: all are held, then
    dropped together (into torch's host cache)."""
    import weakref

    from lightning_llama_fp8.checkpoint.background import PinnedHostReserve

    alive: list[weakref.ref] = []
    seen_alive: list[int] = []

    class Block:
        pass

    def allocate(nbytes: int) -> Block:
        seen_alive.append(sum(ref() is not None for ref in alive))
        block = Block()
        alive.append(weakref.ref(block))
        return block

    reserve = PinnedHostReserve(allocate)
    reserve.start([4096, 2**20, 2**20])
    reserve.wait()
    assert seen_alive == [0, 1, 2]  # the earlier blocks were still held at each allocation
    assert all(ref() is None for ref in alive)  # and all dropped at the end
    assert reserve.reserved_bytes == 4096 + 2**21 and reserve.seconds is not None and reserve.error is None


def test_pinned_host_reserve_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from lightning_llama_fp8.checkpoint.background import PinnedHostReserve

    def allocate(nbytes: int) -> None:
        raise RuntimeError("CUDA error: out of memory (host)")

    reserve = PinnedHostReserve(allocate)
    reserve.start([3 * 2**30])
    reserve.wait()
    assert isinstance(reserve.error, RuntimeError) and reserve.reserved_bytes == 0 and reserve.seconds is not None
    # 3 GiB as torch would pin it: rounded up to a power of two.
    assert "Could not pin 4.0 GiB of host memory ahead of the first background checkpoint" in caplog.text
    assert "that save will pin it itself" in caplog.text
    PinnedHostReserve().wait()  # never started: returns at once


def test_pinned_bytes_rounds_each_block_up_to_a_power_of_two() -> None:
    from lightning_llama_fp8.checkpoint.background import pinned_bytes

    # As torch's caching host allocator does (PowerOf2Ceil): 25.1 GiB of tensors pinned 29.1 GB on an H200.
    assert pinned_bytes([3, 4096, 5000, 0]) == 4 + 4096 + 8192
    assert pinned_bytes([2**30 + 1]) == 2**31


def test_available_host_memory_reads_memavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from lightning_llama_fp8.checkpoint.background import available_host_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=20480000 * 1024))
    assert available_host_memory() == 20480000 * 1024

    def unreadable() -> None:
        raise OSError("/proc/meminfo: no such file")  # e.g. a sandbox without /proc

    monkeypatch.setattr(psutil, "virtual_memory", unreadable)
    assert available_host_memory() is None
