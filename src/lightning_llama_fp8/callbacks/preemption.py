"""Stop a run cleanly when the cluster asks: on SIGTERM or SIGUSR1, every rank saves the same step as a complete
checkpoint, and the process exits with :data:`EXIT_PREEMPTED`; ``ckpt_path="last"`` then resumes from it.

Clusters send SIGTERM before they end a job (SLURM at the time limit, on ``scancel`` and before a preemption;
Kubernetes before it evicts a pod) and SIGKILL after a grace period; SLURM also sends a chosen signal a chosen time
before the time limit (``sbatch --signal=USR1@600``: SIGUSR1 ten minutes ahead). Lightning alone loses every step
since the last save: on SIGTERM its loops raise ``SIGTERMException`` (exit status 0) with nothing saved, each rank
when it notices the signal (ranks that got it at different points of a step stop at different points and the others
wait for them), and its handler runs a collective inside the signal handler; under SLURM its SIGUSR1 handler saves a
checkpoint inside the signal handler, wherever each rank happens to be. And a DataLoader worker that gets the
cluster's SIGTERM too dies, which makes the training process raise (``DataLoader worker ... is killed by signal``)
before anything is saved (seen on CPU in the run of tests/callbacks/test_preemption.py, one worker per rank).
:class:`PreemptionCheckpoint` replaces those handlers while ``fit`` trains with ones that only note the signal; the
decision is taken between steps:

1. After each training step (and before the first step after a save, so that a saved step is not trained past),
   the ranks agree whether any of them got a signal (one small all-reduce over every rank:
   ``reduce_boolean_decision``), so all of them stop after the same step.
2. If that step is not saved yet, every rank saves it (``trainer.save_checkpoint``, as ModelCheckpoint would name it
   in its ``dirpath``; a background save is waited for): ``last.ckpt`` (``save_last``) then names it too. A step that
   ModelCheckpoint just saved is not saved twice.
3. Under SLURM with Lightning's ``SLURMEnvironment(auto_requeue=True)`` (its default) and its requeue signal
   (SIGUSR1), rank 0 requeues the job (``scontrol requeue``), as Lightning does.
4. Every rank raises :class:`TrainingPreempted` (a Lightning ``SIGTERMException``): ``fit`` ends through Lightning's
   exception path (``on_exception`` hooks, loggers finalized) and the process exits with status 75
   (:data:`EXIT_PREEMPTED`, ``EX_TEMPFAIL``: "try again later"). A signal during the last step of ``max_steps``
   saves it and lets ``fit`` finish (status 0). A run without a ModelCheckpoint (warned at setup) saves nothing:
   it is not requeued and every rank exits with :data:`EXIT_UNSAVED` (143, as a process SIGTERM stopped), since
   trying again would start it over.

Time budget: from the signal to the exit takes the rest of what runs when it comes (a training step, a periodic
checkpoint save, or a validation and, if that step is not saved yet, one more step), one checkpoint save (none
after a periodic save), and the shutdown. Give the cluster's warning (``--signal=USR1@<seconds>``) at least two
steps and one save of your run; each stop logs how long it took after the signal. A signal before the first step
stops without a save (nothing new to keep).

Children that the training processes fork (``os.fork``: DataLoader workers with the default start method on
Linux) block these signals while the callback is active, so that they live until their parent has saved and stops
them. (A DataLoader with a ``spawn`` or ``forkserver`` context starts workers that do not inherit this; its
``worker_init_fn`` must block the signals.)

``llama-fp8 fit`` adds this callback to every run; configure it (or turn it off: ``signals: []``) by listing it in
``trainer.callbacks``. With ModelCheckpoint(``save_on_exception=True``) or Lightning's ``OnExceptionCheckpoint``,
those save again on the way out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "PreemptionCheckpoint", "TrainingPreempted"]

#: Exit status of a run stopped by a preemption signal after its checkpoint was saved (sysexits' ``EX_TEMPFAIL``).
EXIT_PREEMPTED = 75

#: Exit status of every rank of a run stopped by a preemption signal with nothing saved (128 + SIGTERM, as a process
#: the signal ended): not "try again later", since trying again would start the run over.
EXIT_UNSAVED = 128 + signal.SIGTERM

#: Signals that cannot be caught, or that the training process needs for itself.
_UNUSABLE_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}


class TrainingPreempted(SIGTERMException):
    """Raised on every rank once the preemption checkpoint is complete; the process exits with status 75.

    A ``SystemExit`` (through Lightning's ``SIGTERMException``), so an uncaught one prints no traceback;
    ``message`` says what was saved.
    """

    def __init__(self, message: str, status: int = EXIT_PREEMPTED) -> None:
        super().__init__(status)
        self.message = message


# ---------------------------------------------------------------------- forked children
_SHIELDED_SIGNALS: set[signal.Signals] = set()
_FORK_HOOK_REGISTERED = False


def _block_shielded_signals_in_child() -> None:
    """Runs in every child forked by this process (``os.register_at_fork``): the preemption signals are the
    training process's to handle; the child goes on until its parent stops it. Blocked rather than ignored: a
    DataLoader worker sets its own SIGTERM handler when it starts (one that dies unless the parent sent it)."""
    if _SHIELDED_SIGNALS:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED_SIGNALS)


def shield_forked_children(signums: set[signal.Signals]) -> None:
    """Make children forked from now on (by ``os.fork``: not ``subprocess`` nor ``spawn``) block ``signums`` (an empty
    set: none)."""
    global _FORK_HOOK_REGISTERED
    _SHIELDED_SIGNALS.clear()
    _SHIELDED_SIGNALS.update(signums)
    if signums and not _FORK_HOOK_REGISTERED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_block_shielded_signals_in_child)  # once per process; cannot be removed
        _FORK_HOOK_REGISTERED = True


def signal_from_name(name: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"``, ``"sigusr1"`` or a number as a signal; refuses unknown and uncatchable ones."""
    try:
        if isinstance(name, int) and not isinstance(name, bool):
            signum = signal.Signals(name)
        else:
            text = str(name).strip().upper()
            signum = signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ValueError(
            f"PreemptionCheckpoint(signals=...): {name!r} is not a signal of this system; name signals such as "
            "SIGTERM or SIGUSR1."
        ) from None
    if signum in _UNUSABLE_SIGNALS:
        raise ValueError(
            f"PreemptionCheckpoint(signals=...): {signum.name} cannot be used (SIGKILL and SIGSTOP cannot be caught; "
            "the DataLoader needs SIGCHLD). Use SIGTERM, SIGUSR1, SIGUSR2 or SIGHUP."
        )
    return signum


class PreemptionCheckpoint(Callback):
    """On a preemption signal, save a complete checkpoint of the same step on every rank and stop (module docstring).

    Args:
        signals: the signals that stop the run (names or numbers); SLURM's requeue signal is added under
            ``SLURMEnvironment(auto_requeue=True)``. An empty list turns the callback off.
    """

    def __init__(self, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1")) -> None:
        super().__init__()
        self.signals = tuple(signal_from_name(name) for name in signals)
        self._received: tuple[signal.Signals, float] | None = None  # the first signal and when (time.monotonic)
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._saved_step: int | None = None  # the newest step whose full state is on disk (or needs none)
        self._step_at_batch_start = -1

    # ------------------------------------------------------------------ signals
    def _note_signal(self, signum: int, frame: Any) -> None:
        """The handler: only notes the signal (no I/O, no collective inside a signal handler)."""
        if self._received is None:
            self._received = (signal.Signals(signum), time.monotonic())

    def _handled_signals(self, trainer: Any) -> set[signal.Signals]:
        if not self.signals:
            return set()
        requeue = _slurm_requeue_signal(trainer)
        return set(self.signals) | ({requeue} if requeue is not None else set())

    def _install_handlers(self, trainer: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: fit does not run in the main thread, where signal handlers must be set; "
                        "preemption signals are not handled.")  # fmt: skip
            return
        for signum in sorted(self._handled_signals(trainer)):
            # Replaces the handlers Lightning set for this fit (restored by Lightning when fit ends).
            self._previous_handlers[signum] = signal.signal(signum, self._note_signal)

    def _restore_handlers(self) -> None:
        """Put back the handlers found at ``on_train_start``, unless someone (Lightning's teardown) already replaced
        this callback's."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous_handlers.items():
                if signal.getsignal(signum) == self._note_signal:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}
        shield_forked_children(set())

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            # Before the DataLoader forks its workers (fit_loop.setup_data, ahead of on_train_start).
            shield_forked_children(self._handled_signals(trainer))
            if self.signals and not _model_checkpoints(trainer):
                rank_zero_warn(
                    "PreemptionCheckpoint: this run has no ModelCheckpoint, so a preemption signal stops it after a "
                    "step without saving it (and without requeueing the job). Enable checkpointing "
                    "(trainer.enable_checkpointing, or a ModelCheckpoint callback) to resume after one."
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._received = None
        # A fresh run's step 0 needs no checkpoint; a resumed run's step is the checkpoint it resumed from.
        self._saved_step = trainer.global_step
        self._install_handlers(trainer)
        if getattr(trainer, "received_sigterm", False):  # SIGTERM before this callback's handler took over
            self._received = (signal.SIGTERM, time.monotonic())

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this for full saves only (not weights-only ones), on every rank.
        self._saved_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        # One collective per step is enough: a signal seen now would stop the run at this step's end, which the
        # check in on_train_batch_end decides as well. Only right after a save (a periodic one, or the run's start)
        # can the run stop here without training another step; every rank agrees on that condition.
        if not self.signals or self._saved_step != trainer.global_step:
            return
        if self._agreed_to_stop(trainer):
            self._stop(trainer, save=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.signals or trainer.global_step == self._step_at_batch_start:
            return  # not a step boundary (gradient accumulation): the state in between cannot be saved
        if self._agreed_to_stop(trainer):
            self._stop(trainer, save=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ stopping
    def _agreed_to_stop(self, trainer: Any) -> bool:
        """Collective: whether any rank got a signal (every rank gets the same answer)."""
        return bool(trainer.strategy.reduce_boolean_decision(self._received is not None, all=False))

    def _stop(self, trainer: Any, save: bool) -> None:
        step = trainer.global_step
        received = self._received
        what = (
            f"{received[0].name} {time.monotonic() - received[1]:.1f} s ago" if received else "a signal on another rank"
        )
        rank_zero_info(f"PreemptionCheckpoint: stopping after step {step} ({what}).")
        started = time.monotonic()
        saved = None
        if save and self._saved_step != step:
            saved = self._save(trainer)
        _finish_background_save(trainer)
        summary = (
            f"saved step {step} to {saved} in {time.monotonic() - started:.1f} s"
            if saved is not None
            else f"step {step} was already saved"
            if self._saved_step == step
            else "nothing saved (no ModelCheckpoint): steps since the last save are lost"
        )
        if received is not None:
            summary += f", {time.monotonic() - received[1]:.1f} s after {received[0].name}"
        requeue_signal = _slurm_requeue_signal(trainer)
        got_requeue_signal = received is not None and received[0] == requeue_signal
        # Collective: rank 0 requeues if any rank got SLURM's requeue signal.
        requeue = bool(trainer.strategy.reduce_boolean_decision(got_requeue_signal, all=False))
        max_steps = trainer.max_steps
        if max_steps is not None and 0 < max_steps <= step:
            rank_zero_info(f"PreemptionCheckpoint: {summary}; that was the last step, so fit ends normally.")
            self._received = None
            return
        if saved is None and self._saved_step != step:
            # Nothing to resume from: "try again later" (75) or a requeue would start the run over from scratch,
            # again at every preemption. Every rank exits as a process that SIGTERM stopped.
            rank_zero_info(f"PreemptionCheckpoint: {summary}. Not requeued; exiting with status {EXIT_UNSAVED}.")
            raise TrainingPreempted(f"stopped after step {step}: {summary}", status=EXIT_UNSAVED)
        if requeue:
            if trainer.is_global_zero:
                summary += "; " + requeue_slurm_job()
            # No rank exits before the requeue is done: srun --kill-on-bad-exit would stop rank 0 in the middle of it.
            trainer.strategy.barrier("preemption_requeue")
        rank_zero_info(f"PreemptionCheckpoint: {summary}. Exiting with status {EXIT_PREEMPTED}.")
        raise TrainingPreempted(f"stopped after step {step}: {summary}")

    def _save(self, trainer: Any) -> Path | None:
        """Save this step as the run's first ModelCheckpoint would name it, and make its ``last`` name point at it;
        returns the path (``None``: the run has no ModelCheckpoint to save with)."""
        saver = next((cb for cb in _model_checkpoints(trainer) if cb.dirpath), None)
        if saver is None:
            return None
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        # save_last=True (and "link" without top-k checkpoints, as ModelCheckpoint does) keeps the newest state as a
        # full last.ckpt: saved there, once. Otherwise a step checkpoint, and last.ckpt linked to it ("link").
        last_is_a_copy = saver.save_last is True or (saver.save_last == "link" and saver.save_top_k == 0)
        if trainer.is_global_zero:
            last = _free_name(saver, metrics, saver.CHECKPOINT_NAME_LAST, renewing=saver.last_model_path)
            names = (last, None) if last_is_a_copy else (_free_name(saver, metrics), last if saver.save_last else None)
        else:
            names = None
        path, link = trainer.strategy.broadcast(names)
        # Without a monitor, ModelCheckpoint keeps its newest step checkpoint as best_model_path and, with
        # save_top_k=1, deletes the one before: this save takes that place, so that the rotation goes on from it.
        rotates = saver.monitor is None and saver.save_top_k != 0 and not last_is_a_copy
        replaced = saver.best_model_path if rotates and saver.save_top_k == 1 else ""
        if rotates:
            saver.best_model_path = path
        if saver.save_last:  # before the save, which stores them (as ModelCheckpoint does)
            saver.last_model_path = link or path
        trainer.save_checkpoint(path, weights_only=False)
        _finish_background_save(trainer)  # the link must not point at a save still being written
        if link is not None and trainer.is_global_zero:
            point_link_at(Path(link), Path(path))
        if replaced and _may_delete(trainer, saver, replaced, keep=path):
            trainer.strategy.remove_checkpoint(replaced)
        trainer.strategy.barrier("preemption_checkpoint")
        return Path(path)


def _model_checkpoints(trainer: Any) -> list[Any]:
    """The run's ModelCheckpoint callbacks (what a preemption save is named and rotated by)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in getattr(trainer, "checkpoint_callbacks", []) if isinstance(cb, ModelCheckpoint)]


def _may_delete(trainer: Any, saver: Any, previous: str, keep: str) -> bool:
    """Whether ModelCheckpoint's rotation would delete ``previous`` now: not the new checkpoint, not the one this run
    resumed from, and inside the callback's own directory."""
    resumed_from = getattr(trainer, "ckpt_path", None)
    previous_path = Path(previous).absolute()
    return (
        previous != keep
        and (resumed_from is None or previous_path != Path(resumed_from).absolute())
        and Path(saver.dirpath).absolute() in previous_path.parents
    )


def _free_name(saver: Any, metrics: dict[str, Any], filename: str | None = None, renewing: str = "") -> str:
    """``saver``'s path for this save (``filename``: a template such as its last name; ``None``: its own), with
    ``-v1``, ``-v2``, ... while the name is taken by another file, as ModelCheckpoint does, unless it is ``renewing``
    (the name the callback renews at every save)."""
    path = saver.format_checkpoint_name(metrics, filename)
    version = saver.STARTING_VERSION
    while os.path.lexists(path) and path != renewing:
        path = saver.format_checkpoint_name(metrics, filename, ver=version)
        version += 1
    return path


def point_link_at(link: Path, target: Path) -> None:
    """Make ``link`` a relative symbolic link to ``target`` in one rename (a reader sees the old or the new one, never
    none); a full checkpoint directory at ``link`` (an earlier ``save_last=True`` copy) is set aside first and deleted
    once the link is in place."""
    staged = link.with_name(link.name + ".linking")
    if staged.is_symlink() or staged.exists():
        staged.unlink()
    try:
        staged.symlink_to(os.path.relpath(target, link.parent))
    except OSError as err:  # a file system without symbolic links
        log.warning("Could not link %s to %s (%s); the newest checkpoint is %s.", link, target, err, target)
        return
    if link.is_dir() and not link.is_symlink():
        aside = link.with_name(link.name + ".replaced")  # what an interrupted save leaves: restored by the next one
        link.rename(aside)
        os.replace(staged, link)
        shutil.rmtree(aside)
    else:
        os.replace(staged, link)


def _finish_background_save(trainer: Any) -> None:
    """Wait for a checkpoint the strategy writes in the background (``MegatronCPStrategy(async_save=True)``) and
    publish it; nothing for other strategies."""
    finish = getattr(getattr(trainer.strategy, "checkpointing", None), "finish_pending_save", None)
    if callable(finish):
        finish()


def _slurm_requeue_signal(trainer: Any) -> signal.Signals | None:
    """SLURM's requeue signal when Lightning's SLURMEnvironment requeues the job (``auto_requeue``), else ``None``."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        return signal.Signals(environment.requeue_signal)
    return None


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this SLURM job (an array task as ``<array job>_<task>``); returns what happened."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("Requeueing SLURM job %s failed (%s); resubmit it to resume.", job, err)
        return f"requeueing SLURM job {job} failed ({err}); resubmit it to resume"
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); resubmit it to resume.", job, result.stderr.strip())
        return f"scontrol requeue {job} failed with status {result.returncode}; resubmit it to resume"
    return f"requeued SLURM job {job}"
