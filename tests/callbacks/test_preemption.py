"""PreemptionCheckpoint: a signal stops a real training run after a complete checkpoint of the same step on every rank
(exit status 75) and ``ckpt_path="last"`` resumes it with the same samples; what it changes in signal handling, in
forked children and in the checkpoint directory; and the strategy's rank-wide decisions it relies on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_llama_fp8.callbacks import PreemptionCheckpoint, TrainingPreempted, preemption
from lightning_llama_fp8.checkpoint.info import read_checkpoint_info
from lightning_llama_fp8.checkpoint.resume import resolve_last_checkpoint
from tests.helpers import REPO_ROOT, run_distributed

PROBE = "tests.helpers.preemption_probe"
MAX_STEPS = 8


# ---------------------------------------------------------------------- settings and signal handling
def test_signals_by_name_or_number_and_the_uncatchable_refused() -> None:
    callback = PreemptionCheckpoint(["SIGTERM", "usr1", int(signal.SIGUSR2)])
    assert callback.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    assert PreemptionCheckpoint([]).signals == ()
    with pytest.raises(ValueError, match=r"SIGKILL cannot be used .*Use SIGTERM, SIGUSR1"):
        PreemptionCheckpoint(["SIGKILL"])
    with pytest.raises(ValueError, match=r"'SIGNOPE' is not a signal of this system"):
        PreemptionCheckpoint(["SIGNOPE"])
    assert TrainingPreempted("x").code == preemption.EXIT_PREEMPTED == 75


def _fake_trainer(**overrides: Any) -> Any:
    strategy = SimpleNamespace(cluster_environment=None, reduce_boolean_decision=lambda decision, all=True: decision)
    return SimpleNamespace(**{"strategy": strategy, "global_step": 0, "received_sigterm": False, **overrides})


def test_handlers_note_the_signal_and_give_back_only_their_own() -> None:
    callback = PreemptionCheckpoint(["SIGUSR2"])
    before = signal.getsignal(signal.SIGUSR2)
    trainer = _fake_trainer()
    try:
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGUSR2) == callback._note_signal
        assert not callback._agreed_to_stop(trainer)
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler only notes it
        assert callback._received is not None and callback._received[0] == signal.SIGUSR2
        assert callback._agreed_to_stop(trainer)
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR2) == before
        # Lightning's teardown put its originals back first: this callback leaves them alone.
        callback.on_train_start(trainer, None)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_sigterm_lightning_noted_before_the_handler_took_over_counts() -> None:
    callback = PreemptionCheckpoint(["SIGUSR2"])
    before = signal.getsignal(signal.SIGUSR2)
    try:
        callback.on_train_start(_fake_trainer(received_sigterm=True), None)
        assert callback._received is not None and callback._received[0] == signal.SIGTERM
    finally:
        signal.signal(signal.SIGUSR2, before)


def _blocked_in_a_forked_child() -> set[int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its blocked signals, exit without running anything else
        os.write(write, json.dumps(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        blocked = set(json.loads(pipe.read()))
    os.waitpid(pid, 0)
    return blocked


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_forked_children_block_the_signals_while_the_callback_is_set_up() -> None:
    """A DataLoader worker killed by the cluster's SIGTERM would make the training process raise before it saves."""
    callback = PreemptionCheckpoint(["SIGUSR2"])
    trainer = _fake_trainer()
    callback.setup(trainer, None, "fit")
    try:
        assert signal.SIGUSR2 in _blocked_in_a_forked_child()
        assert signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # not in the training process
    finally:
        callback.teardown(trainer, None, "fit")
    assert signal.SIGUSR2 not in _blocked_in_a_forked_child()


def test_the_last_link_is_replaced_in_one_rename(tmp_path: Path) -> None:
    (tmp_path / "step=3.ckpt").mkdir()
    (tmp_path / "step=5.ckpt").mkdir()
    link = tmp_path / "last.ckpt"
    link.symlink_to("step=3.ckpt")
    preemption.point_link_at(link, tmp_path / "step=5.ckpt")
    assert os.readlink(link) == "step=5.ckpt"  # relative, as ModelCheckpoint links
    link.unlink()
    link.mkdir()  # a full last checkpoint of an earlier save_last=True run
    (link / "lightning.pt").write_text("old")
    preemption.point_link_at(link, tmp_path / "step=5.ckpt")
    assert os.readlink(link) == "step=5.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=3.ckpt", "step=5.ckpt"]


def _fake_scontrol(tmp_path: Path, status: int = 0) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit {status}\n')
    script.chmod(0o755)
    return bin_dir, log


def test_requeue_names_the_job_or_array_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, log = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert preemption.requeue_slurm_job() == "requeued SLURM job 77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert preemption.requeue_slurm_job() == "requeued SLURM job 70_3"
    assert log.read_text().splitlines() == ["requeue 77", "requeue 70_3"]
    failing, _ = _fake_scontrol(tmp_path / "failing", status=1)
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}{os.environ['PATH']}")
    assert "failed with status 1; resubmit it to resume" in preemption.requeue_slurm_job()


# ---------------------------------------------------------------------- real runs, stopped by a signal
def _start(out: Path, resume: str, env: dict[str, str] | None = None, name: str = "log") -> subprocess.Popen[bytes]:
    """The probe as its own process group (SLURM signals every process of a step: ranks and DataLoader workers)."""
    log = (out / name).open("w")
    return subprocess.Popen(
        [sys.executable, "-m", PROBE, str(out), str(MAX_STEPS), resume],
        cwd=REPO_ROOT,
        env=env or dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_step(out: Path, step: int, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 240
    progress = out / "progress"
    while time.monotonic() < deadline:
        if progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= step:
            return
        if any(process.poll() is not None for process in processes):
            raise AssertionError("the run ended before it was signalled:\n" + (out / "log").read_text()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def _ranks(out: Path) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60  # rank 1 (a child of rank 0's launcher) may write after rank 0 exited
    while not all((out / f"rank{r}.json").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _directory(path: Path) -> list[tuple[str, str]]:
    return sorted((p.name, os.readlink(p) if p.is_symlink() else "") for p in path.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each rank of the same run saw and ended with, without a signal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _start(out, "none").wait(timeout=300) == 0, (out / "log").read_text()[-3000:]
    return _ranks(out)


@pytest.mark.multiprocess
def test_sigterm_saves_the_same_step_on_every_rank_and_last_resumes_it(
    tmp_path: Path, uninterrupted: list[dict[str, Any]]
) -> None:
    """SIGTERM to every process of a two-rank run (Lightning's launcher, a DataLoader worker per rank) after step 4:
    both ranks stop after the same step with status 75, that step is a complete checkpoint that ``last.ckpt`` names
    and ModelCheckpoint's save_top_k=1 rotation continues from, and the run resumed from ``last`` sees the samples
    and reaches the weights of the uninterrupted run."""
    run = _start(tmp_path, "none")
    _wait_for_step(tmp_path, 4, [run])
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait(timeout=240) == preemption.EXIT_PREEMPTED, (tmp_path / "log").read_text()[-3000:]
    stopped = _ranks(tmp_path)
    step = stopped[0]["step"]
    assert 4 <= step < MAX_STEPS
    for rank in stopped:
        assert rank["ended"] == {"how": "TrainingPreempted", "code": 75}
        assert rank["step"] == step
    name = f"epoch=0-step={step}.ckpt"
    # The step-3 checkpoint it replaced is gone (save_top_k=1), last.ckpt names the new one, nothing half-written.
    assert _directory(tmp_path / "ckpts") == [(name, ""), ("last.ckpt", name)]
    assert read_checkpoint_info(tmp_path / "ckpts" / name).global_step == step
    assert resolve_last_checkpoint([tmp_path / "ckpts"]) == tmp_path / "ckpts" / "last.ckpt"
    assert f"PreemptionCheckpoint: saved step {step} to " in (tmp_path / "log").read_text()

    for record in tmp_path.glob("rank*.json"):
        record.unlink()
    assert _start(tmp_path, "last", name="log_resumed").wait(timeout=300) == 0
    resumed = _ranks(tmp_path)
    for rank, reference in zip(resumed, uninterrupted, strict=True):
        assert rank["resumed_from"] == str(tmp_path / "ckpts" / "last.ckpt")
        assert rank["step"] == MAX_STEPS
        assert rank["seen"] == reference["seen"][step:]  # the same samples from where it stopped...
        assert rank["weight"] == reference["weight"]  # ...to the same weights (SGD with momentum: state restored)
    # The resumed run renewed last.ckpt at its own save (step 6), and rotated the preemption checkpoint away.
    assert _directory(tmp_path / "ckpts") == [("epoch=0-step=6.ckpt", ""), ("last.ckpt", "epoch=0-step=6.ckpt")]


def _slurm_env(rank: int, port: int, bin_dir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="probe",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )


@pytest.mark.multiprocess
def test_slurm_requeue_signal_on_one_rank_stops_every_rank_and_requeues(tmp_path: Path) -> None:
    """Two SLURM tasks (SLURMEnvironment, auto_requeue on: Lightning's default), SIGUSR1 to rank 1 only: the ranks
    agree, both save the same step and exit with 75, and rank 0 runs ``scontrol requeue <job>`` once, after the save."""
    bin_dir, scontrol_log = _fake_scontrol(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [_start(tmp_path, "none", _slurm_env(r, port, bin_dir), name=f"log{r}" if r else "log") for r in (0, 1)]
    _wait_for_step(tmp_path, 4, ranks)
    os.kill(ranks[1].pid, signal.SIGUSR1)
    assert [rank.wait(timeout=240) for rank in ranks] == [75, 75], (tmp_path / "log").read_text()[-3000:]
    stopped = _ranks(tmp_path)
    step = stopped[0]["step"]
    assert stopped[1]["step"] == step and 4 <= step < MAX_STEPS
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert read_checkpoint_info(tmp_path / "ckpts" / "last.ckpt").global_step == step
    log = (tmp_path / "log").read_text()
    assert "(a signal on another rank)" in log and "requeued SLURM job 4242" in log


# ---------------------------------------------------------------------- the strategy's decisions over every rank
def _decisions_worker(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision

    strategy = MegatronCPStrategy(tensor_model_parallel_size=2)
    Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
    strategy.setup_environment()
    try:
        return (
            strategy.reduce_boolean_decision(rank == 1, all=False),
            strategy.reduce_boolean_decision(True, all=True),
            strategy.reduce_boolean_decision(rank == 0, all=True),
        )
    finally:
        strategy.teardown()


@pytest.mark.multiprocess
def test_boolean_decisions_reach_every_rank_with_tensor_parallelism(tmp_path: Path) -> None:
    """TP2 on two ranks: each DP x CP group is one rank. Reduced over it (Lightning's default), "any" stayed on the
    rank that voted and "all" was never true (ModelCheckpoint's monitored top-k never saved)."""
    assert run_distributed(_decisions_worker, 2, tmp_path) == [(True, True, False), (True, True, False)]


def test_a_run_without_model_checkpoint_is_warned_and_not_told_to_try_again(tmp_path: Path) -> None:
    """Nothing to resume from: status 75 ("try again later") or a requeue would start the run over at every
    preemption. It stops after the step, exits as the signal would (128 + 15), and the GC is back on (ManualGC)."""
    import gc

    from lightning_llama_fp8.callbacks import ManualGC
    from tests.helpers.models import Recorder, mock_data
    from tests.helpers.trainers import megatron_cpu_trainer

    class SignalledAtStepTwo(Recorder):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch, batch_idx)

    trainer = megatron_cpu_trainer(
        1, max_steps=6, callbacks=[PreemptionCheckpoint(), ManualGC(interval=100)], default_root_dir=str(tmp_path)
    )
    warned = pytest.warns(UserWarning, match="no ModelCheckpoint, so a preemption signal stops it after a step without")
    try:
        with warned, pytest.raises(TrainingPreempted) as stop:
            trainer.fit(SignalledAtStepTwo(seq_length=16), datamodule=mock_data(16, global_batch_size=2))
    finally:  # the process group of this in-process fit (a training process would exit here)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert stop.value.code == 128 + signal.SIGTERM
    assert "nothing saved (no ModelCheckpoint)" in stop.value.message
    assert trainer.global_step == 3 and gc.isenabled()
