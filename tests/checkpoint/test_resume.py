"""Whether a checkpoint fits this run (check_can_resume) and which checkpoint 'last' means (resolve_last_checkpoint)."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import resume
from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo
from lightning_llama_fp8.checkpoint.resume import check_can_resume
from lightning_llama_fp8.config import get_preset
from tests.helpers.models import CPU_ARCH, tiny_llama


def _tiny_te() -> Any:
    """The tiny Llama with Transformer Engine's layer spec (a run that can resume; never built on the CPU here)."""
    return get_preset("llama_tiny", apply_rope_fusion=False)


def _info(**overrides: Any) -> CheckpointInfo:
    from dataclasses import asdict

    fields: dict[str, Any] = dict(
        path=Path("ck"),
        global_step=100,
        tensor_model_parallel_size=2,
        context_parallel_size=1,
        world_size=8,
        arch=asdict(tiny_llama()),
        optimizer_sharding="dp_reshardable",
    )
    return CheckpointInfo(**{**fields, **overrides})


def test_other_architecture_is_refused_with_the_differences() -> None:
    arch = get_preset("llama_tiny", num_layers=4, hidden_size=512, **CPU_ARCH)
    with pytest.raises(
        CheckpointError, match=r"num_layers: checkpoint 2, model 4; hidden_size: checkpoint 256, model 512\)"
    ):
        check_can_resume(_info(), arch, 2, 1, with_optimizer=True)


def test_another_zero_centered_gamma_is_refused_for_training_and_validation() -> None:
    """Found by an audit: the norm weights are stored as gamma - 1 with zero_centered_gamma, as gamma without; the
    shapes agree, so a checkpoint loaded with the other setting gave every norm an offset of one, silently."""
    info = _info(optimizer_sharding="fully_reshardable")
    arch = get_preset("llama_tiny", zero_centered_gamma=True, apply_rope_fusion=False)
    expected = (
        r"stores its weights in another form than this model reads them \(zero_centered_gamma: checkpoint False, "
        r"model True\).*gamma - 1.*Set model.arch.zero_centered_gamma to the checkpoint's value.*llama-fp8 convert"
    )
    for with_optimizer in (True, False):
        with pytest.raises(CheckpointError, match=expected):
            check_can_resume(info, arch, 2, 1, with_optimizer=with_optimizer)
    check_can_resume(_info(arch={**info.arch, "zero_centered_gamma": True}), arch, 2, 1, with_optimizer=True)


def test_changed_adam_settings_are_refused_as_the_saved_ones_would_replace_them() -> None:
    """Megatron loads each saved parameter group whole, Adam's betas and eps with it (see
    RESTORED_OPTIMIZER_FIELDS): a run resumed with other ones would train with the checkpoint's, silently."""
    from lightning_llama_fp8 import OptimizerSettings

    saved = asdict(OptimizerSettings())
    info = _info(optimizer_settings=saved)
    for name, value in (("adam_beta1", 0.8), ("adam_beta2", 0.999), ("adam_eps", 1e-5)):
        expected = (
            rf"other Adam settings \({name}: checkpoint {saved[name]!r}, this run {value!r}\).*set model.optimizer "
            r"back to the checkpoint's values, or start a new run from its weights \(llama-fp8 convert"
        )
        with pytest.raises(CheckpointError, match=expected):
            check_can_resume(info, _tiny_te(), 2, 1, with_optimizer=True, optimizer_settings={**saved, name: value})
    # What the scheduler sets at every step from this run's settings may change.
    changed = {**saved, "weight_decay": 0.0, "warmup_steps": 7, "clip_grad": 0.5}
    check_can_resume(info, _tiny_te(), 2, 1, with_optimizer=True, optimizer_settings=changed)
    check_can_resume(_info(), _tiny_te(), 2, 1, with_optimizer=True, optimizer_settings=changed)  # none recorded


def test_sequence_length_and_kernels_may_change() -> None:
    arch = get_preset("llama_tiny", seq_length=64, attention_backend="flash", apply_rope_fusion=False)
    check_can_resume(_info(), arch, 2, 1, with_optimizer=True)


def test_dp_reshardable_optimizer_needs_the_same_tp_and_cp() -> None:
    check_can_resume(_info(), _tiny_te(), 2, 1, with_optimizer=True)  # same TP/CP, any DP: fine
    with pytest.raises(CheckpointError, match=r"TP=2, CP=1 .* this run has TP=1, CP=2. .*fully_reshardable"):
        check_can_resume(_info(), _tiny_te(), 1, 2, with_optimizer=True)
    check_can_resume(_info(), _tiny_te(), 1, 2, with_optimizer=False)  # weights alone reshard to any layout
    check_can_resume(_info(optimizer_sharding="fully_reshardable"), _tiny_te(), 1, 2, with_optimizer=True)


def test_weights_only_checkpoint_cannot_resume_training() -> None:
    with pytest.raises(CheckpointError, match="no optimizer state, so training cannot resume"):
        check_can_resume(_info(optimizer_sharding=None), tiny_llama(), 2, 1, with_optimizer=True)
    check_can_resume(_info(optimizer_sharding=None), tiny_llama(), 2, 1, with_optimizer=False)


def test_last_with_only_damaged_checkpoints_stops_with_their_paths(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").symlink_to("gone.ckpt")
    (tmp_path / "epoch=0-step=2.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in ") as excinfo:
        resume.resolve_last_checkpoint([tmp_path])
    assert "last.ckpt is a link to gone.ckpt, which does not exist" in str(excinfo.value)
    assert re.search(r"step=2\.ckpt is not a complete .*save did not finish", str(excinfo.value))
    assert resume.resolve_last_checkpoint([tmp_path / "empty"]) is None  # nothing there yet: a new run


def test_resuming_with_the_local_layer_spec_is_refused() -> None:
    info = ckpt.CheckpointInfo(
        Path("ck"), 8, 1, 1, 1, arch=asdict(get_preset("llama_tiny")), optimizer_sharding="dp_reshardable"
    )
    local = get_preset("llama_tiny", transformer_impl="local", apply_rope_fusion=False)
    with pytest.raises(CheckpointError, match=r"cannot resume with model.arch.transformer_impl 'local'.*validation"):
        check_can_resume(info, local, 1, 1, with_optimizer=True)
    check_can_resume(info, local, 1, 1, with_optimizer=False)  # its weights load for validation


def _complete_checkpoint(path: Path, step: int) -> Path:
    """A complete checkpoint record at ``path`` for ``step`` (the tiny Llama's; its tensors are not needed here)."""
    import json
    import shutil
    import tempfile

    from tests.helpers.checkpoints import fake_resumable_checkpoint

    made = fake_resumable_checkpoint(Path(tempfile.mkdtemp(dir=path.parent)))
    shutil.move(made, path)
    shutil.rmtree(made.parent)
    info = json.loads((path / ckpt.INFO_FILENAME).read_text())
    (path / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "global_step": step}))
    return path


def test_last_is_the_newest_step_among_step_last_and_slurm_requeue_checkpoints(tmp_path: Path) -> None:
    """Lightning's SLURM requeue signal saves hpc_ckpt_<n>.ckpt into default_root_dir, where "last" did not look."""
    checkpoints, run = tmp_path / "ckpts", tmp_path / "run"
    checkpoints.mkdir()
    run.mkdir()
    _complete_checkpoint(checkpoints / "epoch=0-step=100.ckpt", 100)
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=100.ckpt")
    _complete_checkpoint(run / "hpc_ckpt_1.ckpt", 130)
    _complete_checkpoint(run / "other.ckpt", 500)  # not Lightning's requeue name: not this run's
    assert resume.resolve_last_checkpoint([checkpoints], run_directories=[run]) == run / "hpc_ckpt_1.ckpt"
    # On the same step the last* name wins: resumed through it, ModelCheckpoint may later rotate the step checkpoint.
    assert resume.resolve_last_checkpoint([checkpoints]) == checkpoints / "last.ckpt"
    _complete_checkpoint(checkpoints / "epoch=0-step=150.ckpt", 150)  # a newer step checkpoint, last.ckpt stale
    assert resume.resolve_last_checkpoint([checkpoints], run_directories=[run]) == checkpoints / "epoch=0-step=150.ckpt"
    # The same directory as both (default_root_dir == dirpath) counts each checkpoint once.
    assert resume.resolve_last_checkpoint([run], run_directories=[run]) == run / "other.ckpt"


def test_only_the_runs_own_last_checkpoint_is_renewed(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    own = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last="link")
    templated = ModelCheckpoint(dirpath=tmp_path / "t", save_last=True, every_n_train_steps=2)
    templated.CHECKPOINT_NAME_LAST = "{step}-last"
    no_last = ModelCheckpoint(dirpath=tmp_path / "n", every_n_train_steps=5)

    def saved(dirpath: Any) -> dict[str, Any]:
        return {"dirpath": dirpath, "last_model_path": "", "best_model_path": ""}

    state = {
        "callbacks": {
            own.state_key: saved(own.dirpath),  # the run's first checkpoint: no last.ckpt remembered
            templated.state_key: saved(templated.dirpath),
            no_last.state_key: saved(no_last.dirpath),
        }
    }
    renewed = resume.renew_own_last_checkpoints(state, [own, templated, no_last])
    assert renewed == [str(tmp_path / "ckpts" / "last.ckpt")]
    assert state["callbacks"][own.state_key]["last_model_path"] == renewed[0]
    assert state["callbacks"][templated.state_key]["last_model_path"] == ""
    # Another directory in the checkpoint: another run's (Lightning restores nothing of it either).
    moved = {"callbacks": {own.state_key: saved(str(tmp_path / "elsewhere"))}}
    assert resume.renew_own_last_checkpoints(moved, [own]) == []
    assert moved["callbacks"][own.state_key]["last_model_path"] == ""


def test_which_checkpoint_directory_a_resume_continues(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpts"
    (checkpoints / "epoch=0-step=3.ckpt").mkdir(parents=True)
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=3.ckpt")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.mkdir()
    assert resume.resumes_into(checkpoints / "last.ckpt", checkpoints, set())
    assert resume.resumes_into(checkpoints / "epoch=0-step=3.ckpt", checkpoints, set())
    assert not resume.resumes_into(hpc, checkpoints, set())
    recorded = resume.recorded_checkpoint_directories(
        {"callbacks": {"ModelCheckpoint{...}": {"dirpath": str(checkpoints)}, "Other": {"x": 1}}}
    )
    assert recorded == {checkpoints}
    assert resume.resumes_into(hpc, checkpoints, recorded)  # its run saved into checkpoints/
    assert not resume.resumes_into(hpc, tmp_path / "another", recorded)
