"""Asynchronous distributed checkpoints: Megatron-Core writes the shards in a background process, training goes on.

One save with ``MegatronCPStrategy(async_save=True)``, as :class:`AsyncCheckpointSaver` runs it:

1. ``save_checkpoint`` (every rank; training waits): rank 0 prepares ``<path>.saving``; every rank builds its sharded
   state dict and Megatron plans the write (``dist_checkpointing.save(..., async_sharded_save=True)``, which returns
   an ``AsyncRequest``); scheduling it on Megatron's ``AsyncCallsQueue`` copies every shard to host memory and forks
   the process that writes them. Then ``save_checkpoint`` returns and training goes on.
2. Finalize (every rank): at the start of each training step without waiting, and waiting before the next save,
   before a load, at the end of fitting and in ``teardown``. Megatron first agrees over all ranks that every writer
   is done (one all-reduce), then runs the finalize functions on all ranks: the shard index (``.metadata``) and
   ``metadata.json``, then ours: rank 0 writes ``lightning.pt`` and ``lightning_llama_fp8.json`` (with the sizes and
   digests of the finished files) and renames ``<path>.saving`` to ``<path>``.

One save is pending at a time (each holds a host copy as large as the rank's share of the checkpoint): a save that
comes while the previous one is still being written waits for that write first, and training waits with it. The wait
is logged with its length and the save interval that would avoid it ("Waited X s for the previous checkpoint write
(...) to finish before saving step N ..."), and kept per save in :attr:`AsyncCheckpointSaver.timings`. A save blocks
training only for its host copy when the saves are at least one write apart: interval >= the node's share of the
checkpoint / the write speed of its file system.

So a checkpoint appears under its name only complete, as with synchronous saves, just some steps later; the older
checkpoints ModelCheckpoint deletes right after ``save_checkpoint`` returns (``save_top_k``) are deleted only then
(:meth:`AsyncCheckpointSaver.remove_after_pending_save`). A kill during the background write leaves ``<path>.saving``
and every earlier checkpoint as it was; ``last.ckpt`` (``save_last="link"``) may point at the unpublished path,
which :func:`~.info.resolve_last_checkpoint` sees through. A failed write is raised on every
rank at the next finalize, naming the checkpoint; nothing saved before is touched.

Why training may change the weights right after step 1 (checked in megatron-core 0.19.2,
``dist_checkpointing/strategies/filesystem_async.py`` and ``async_utils.py``): ``FileSystemWriterAsync.
prepare_write_data`` keeps references to the tensors (dequantized copies for FP8 weights on the GPU, clones for CPU
views), and ``TemporalAsyncCaller.schedule_async_call`` runs its ``preload_fn`` (``preload_tensors``: ``.to("cpu")``
of every GPU tensor, then ``torch.cuda.synchronize()``) before it forks the writer. When scheduling returns, the
writer holds host copies taken before the next optimizer step; CPU tensors (optimizer offload) are not copied, but
the forked writer sees the memory as it was at the fork (copy-on-write). The host copy is as large as the rank's
share of the checkpoint and lives until the save is finalized, which is why one save is pending at a time.

Why the first save would block longest, and :class:`PinnedHostReserve`: ``.to("cpu", non_blocking=True)`` takes
pinned blocks from torch's caching host allocator, which rounds each request up to a power of two and reuses freed
blocks of the same size. The first save finds that cache empty and pins every block itself, which takes most of the
time its scheduling blocks; later saves are served from the cache. So after the first optimizer step (when the
optimizer state exists) the blocks a save will need are pinned once, in a thread, and freed into the cache, and the
first save finds them there. Training may wait for that pinning once, after the first step, instead of at the first
save mid-run. The measured stalls are in the README ("Checkpoints").
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_llama_fp8.checkpoint.directories import (
    prepare_saving_directory,
    publish_saving_directory,
    remove_checkpoint_directory,
    run_and_agree,
    saving_directory,
)
from lightning_llama_fp8.checkpoint.info import CheckpointError

log = logging.getLogger(__name__)

#: A collective over all ranks: each passes its failure text (or None) and gets the first rank's failure (or None).
Agree = Callable[[str | None], str | None]


@dataclass
class SaveTiming:
    """How one background save went on this rank (:attr:`AsyncCheckpointSaver.timings`)."""

    path: Path
    #: The training step saved, where the caller said (``None``: not known).
    step: int | None
    #: Seconds the save waited for the previous background write to finish before it could begin (0: none was
    #: still being written). Training waits as long.
    waited_for_previous_s: float
    #: Seconds from the end of the save call (host copy taken, writer started) until this rank found the write
    #: finished, at a finalize: the write time, to within a training step. ``None`` while it is being written.
    write_s: float | None = None


@dataclass
class _PendingSave:
    """A save whose shards are being written; published (and ``removals`` deleted) at its finalize."""

    path: Path
    is_rank_zero: bool
    removals: list[Path] = field(default_factory=list)
    timing: SaveTiming | None = None
    scheduled_at: float = 0.0  # time.monotonic() when the save call returned


class PinnedHostReserve:
    """Pin host blocks of the given sizes in a background thread, then free them into torch's host cache.

    ``allocate(nbytes)`` returns one pinned block (default: a pinned ``uint8`` tensor); every block is held until
    all are allocated (a block freed at once would only be reused by the next request of its size class), then all
    are dropped together. The thread lets training go on where the pinning allows it; on an H200 it did not (no step
    finished while 27.1 GiB were pinned; ``benchmarks.throughput`` records this as ``host_reserve``). A failure (host
    memory short of the checkpoint's size, say) is logged: the first save then pins what it needs itself.
    """

    def __init__(self, allocate: Callable[[int], Any] | None = None) -> None:
        self._allocate = allocate or _pinned_block
        self._thread: threading.Thread | None = None
        self.reserved_bytes = 0  # what torch pinned: each size rounded up to a power of two
        self.seconds: float | None = None  # how long the pinning took, once done
        self.error: Exception | None = None

    def start(self, sizes: list[int], device: Any = None) -> None:
        """Begin pinning ``sizes`` (bytes each) in a daemon thread; ``device``: the rank's CUDA device."""
        self._thread = threading.Thread(
            target=self._run, args=(list(sizes), device), name="pinned-host-reserve", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Return once the pinning is over (at once if it never started)."""
        if self._thread is not None:
            self._thread.join()

    def _run(self, sizes: list[int], device: Any) -> None:
        start = time.perf_counter()
        try:
            if device is not None:  # pin through the rank's own device, as its training thread would
                import torch

                torch.cuda.set_device(device)
            blocks = [self._allocate(size) for size in sizes]
            self.reserved_bytes = pinned_bytes(sizes)
            del blocks
        except Exception as err:  # raised in a thread it would vanish: logged; the save then pins what it needs
            self.error = err
            log.warning(
                "Could not pin %.1f GiB of host memory ahead of the first background checkpoint (%s: %s); that save "
                "will pin it itself and block training while it does.",
                pinned_bytes(sizes) / 2**30,
                type(err).__name__,
                err,
            )
        self.seconds = time.perf_counter() - start


def pinned_bytes(sizes: list[int]) -> int:
    """The host memory torch's caching host allocator pins for blocks of ``sizes``: each rounded up to a power of 2."""
    return sum(1 << max(size - 1, 0).bit_length() for size in sizes if size > 0)


def available_host_memory() -> int | None:
    """The host memory the kernel can hand out now (psutil's ``available``: Linux's ``MemAvailable``), bytes;
    ``None`` where it cannot be read."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


def _pinned_block(nbytes: int) -> Any:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class AsyncCheckpointSaver:
    """Megatron's ``AsyncCallsQueue`` with at most one checkpoint directory being written in the background.

    Every method but :attr:`pending_path` is collective: all ranks call it at the same point.
    """

    def __init__(self, agree: Agree) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        # Not persistent: a forked writer per save (Megatron-LM's default). The persistent worker is spawned and
        # would need the whole request pickled; a fork shares the host copy instead.
        self._queue = AsyncCallsQueue(persistent=False)
        self._agree = agree
        self._pending: _PendingSave | None = None
        #: Every save of this saver, in order: how long it waited for the one before, how long its write took.
        self.timings: list[SaveTiming] = []

    @property
    def pending_path(self) -> Path | None:
        """The checkpoint being written in the background and not yet published, if any."""
        return self._pending.path if self._pending is not None else None

    def save(
        self,
        path: Path,
        is_rank_zero: bool,
        plan_shards: Callable[[Path], Any],
        write_rank_zero_files: Callable[[Path], None],
        step: int | None = None,
    ) -> None:
        """Start saving ``path`` (training step ``step``, for the log); returns once every shard is in host memory
        and its writer runs.

        ``plan_shards(directory)`` returns Megatron's ``AsyncRequest`` for the shards (every rank);
        ``write_rank_zero_files(directory)`` writes the rest into the finished directory before it is published
        (rank 0, at the finalize).
        """
        # One at a time: each holds a host copy as large as the checkpoint.
        timing = SaveTiming(path, step, waited_for_previous_s=self._wait_for_previous_save(path, step))
        tmp = saving_directory(path)
        run_and_agree((lambda: prepare_saving_directory(path)) if is_rank_zero else None, self._agree)
        planned: list[Any] = []
        run_and_agree(lambda: planned.append(plan_shards(tmp)), self._agree)
        request = planned[0]

        def publish() -> None:  # a finalize function: on all ranks, after all of them finished writing
            def on_rank_zero() -> None:
                write_rank_zero_files(tmp)
                publish_saving_directory(path)

            run_and_agree(on_rank_zero if is_rank_zero else None, self._agree)

        request.add_finalize_fn(publish)  # after Megatron's own (shard index, metadata.json)
        self._queue.schedule_async_request(request)  # the host copy is taken here (see the module docstring)
        self._pending = _PendingSave(path, is_rank_zero, timing=timing, scheduled_at=time.monotonic())
        self.timings.append(timing)

    def _wait_for_previous_save(self, path: Path, step: int | None) -> float:
        """Publish the previous save, waiting for its write if it is still running; the seconds waited for the write
        (0 when it was done: then publishing it costs one all-reduce and its rank-0 files). Rank 0 logs a wait."""
        previous = self._pending
        if previous is None:
            return 0.0
        start = time.monotonic()
        self.finalize(blocking=False)  # every rank agrees whether all writes are done (one all-reduce)
        if self._pending is None:
            return 0.0
        self.finalize(blocking=True)
        waited = time.monotonic() - start
        if previous.is_rank_zero:
            log.warning(_wait_message(previous, waited, start - previous.scheduled_at, path, step))
        return waited

    def finalize(self, blocking: bool) -> None:
        """Publish the pending save if every rank's write is done (``blocking``: wait for it).

        Raises:
            CheckpointError: on every rank, if the background write or the publishing failed anywhere.
        """
        pending = self._pending
        if pending is None:
            return
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            finished = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            self._pending = None  # Megatron dropped the request; the next save starts afresh
            # Every rank is here: Megatron broadcasts a failed write to all ranks (rank 0 alone has the details)
            # and run_and_agree raises a failed publish everywhere; share rank 0's text so each rank names it.
            failure = self._agree(f"{type(err).__name__}: {err}")
            raise CheckpointError(self._failure_message(pending, failure)) from err
        if not finished:
            return
        self._pending = None
        if pending.timing is not None:
            pending.timing.write_s = time.monotonic() - pending.scheduled_at
        if pending.is_rank_zero:
            for removal in pending.removals:
                remove_checkpoint_directory(removal)

    def remove_after_pending_save(self, path: Path) -> bool:
        """Delete ``path`` only once the pending save is published; ``False``: none is pending, delete it now.

        ModelCheckpoint deletes the checkpoint that the new one replaces right after ``save_checkpoint`` returns;
        deleting it then would leave no complete checkpoint if the run died during the background write.
        """
        if self._pending is None:
            return False
        self._pending.removals.append(path)
        return True

    def wait_before_exit(self) -> None:
        """Publish a pending save before the process ends (``teardown``); a failure is logged, not raised.

        Reached with a save pending only when the run stopped on an error after scheduling it: that error is the
        one to raise, and the checkpoint is published if its write completes.
        """
        try:
            self.finalize(blocking=True)
        except Exception as err:  # finalize raises CheckpointError for any failure of the save itself
            log.error("%s", err)

    @staticmethod
    def _failure_message(pending: _PendingSave, failure: str | None) -> str:
        kept = (
            " (including " + ", ".join(str(path) for path in pending.removals) + ", kept instead of deleted)"
            if pending.removals
            else ""
        )
        return (
            f"Saving checkpoint {pending.path} in the background failed: {failure}. It was not published (its "
            f"unfinished files are in {saving_directory(pending.path)}); every checkpoint saved before it is "
            f"as it was{kept}. Check the file system (space, permissions), then resume from the newest complete "
            "checkpoint (ckpt_path='last')."
        )


def _wait_message(previous: _PendingSave, waited: float, since_s: float, path: Path, step: int | None) -> str:
    """What a save that had to wait for the previous background write tells the user: the wait, the write time, and
    the save interval that would not wait."""
    saving = f"step {step}" if step is not None else path.name
    write_s = previous.timing.write_s if previous.timing is not None else None
    write_s = since_s + waited if write_s is None else write_s
    previous_step = previous.timing.step if previous.timing is not None else None
    apart = f"{since_s:.1f} s apart"
    interval = f"at least {math.ceil(write_s)} s apart"
    if step is not None and previous_step is not None and step > previous_step:
        steps = step - previous_step
        apart += f" ({steps} steps)"
        s_per_step = since_s / steps
        if s_per_step > 0:
            interval += f" (every {math.ceil(write_s / s_per_step)} steps or more at {s_per_step:.2f} s per step)"
    return (
        f"Waited {waited:.1f} s for the previous checkpoint write ({previous.path.name}) to finish before saving "
        f"{saving}; training waited as long. A background save begins only once the one before it is written: that "
        f"write took {write_s:.1f} s, and the two saves came {apart}. Save {interval}, or write faster (the write "
        "time is this node's share of the checkpoint divided by the file system's write speed)."
    )
