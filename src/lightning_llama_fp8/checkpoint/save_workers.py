"""Saving from a training script without an ``if __name__ == "__main__":`` guard.

megatron-core's distributed-checkpoint writer (``FileSystemWriterAsync``, behind every ``torch_dist`` save, the
synchronous ones too) collects its write results through a queue of a ``multiprocessing`` manager, which it creates
on the first save of a process with the ``spawn`` start method (``get_write_results_queue(mp_mode="spawn")`` in
``megatron/core/dist_checkpointing/strategies/filesystem_async.py``, megatron-core 0.19.2). A spawned process
re-imports the main script before it does anything; a script whose training code is not under the
``__main__`` guard therefore starts a second training run inside the manager process (on the GPU machine it failed
with EADDRINUSE on torch.distributed's port) and the save waits for a manager that never answers.

:func:`prepare_checkpoint_writer` creates that queue first, with a manager started by ``fork``: the forked manager
process serves the queue and never runs the script, guarded or not. Megatron keeps the queue for the life of the
process, so later saves reuse it. The manager process touches no CUDA; forking the training process is what
Megatron's own asynchronous saves (``TemporalAsyncCaller``) and torch's DataLoader workers do too. It is also faster
than ``spawn``, which imports torch and the script again before the first save can finish.
"""

from __future__ import annotations

MANAGER_START_METHOD = "fork"


def prepare_checkpoint_writer() -> None:
    """Create megatron-core's write-results queue with a ``fork``-started manager (no-op once it exists).

    Call before the first ``dist_checkpointing.save`` of a process. Platforms without ``fork`` (Windows, where
    megatron-core does not run) keep Megatron's default.
    """
    import multiprocessing

    if MANAGER_START_METHOD not in multiprocessing.get_all_start_methods():
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue(mp_mode=MANAGER_START_METHOD)
