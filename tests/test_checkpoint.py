"""Distributed checkpoints: save at one layout, load at another; damaged or unsuitable checkpoints are refused.

The saves and loads run megatron-core's real ``dist_checkpointing`` through ``MegatronCPStrategy`` in gloo
processes on the CPU (``allow_dist_checkpointing_on_cpu`` stubs its two CUDA calls). Resuming a whole FP8 run and
its losses is checked on the GPU (``tests/gpu/test_checkpoint_resume.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_llama_fp8.checkpoint import directories, state_io
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo, read_checkpoint_info
from lightning_llama_fp8.checkpoint.resume import check_can_resume
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.parallel.layout import ParallelLayout
from tests.helpers import run_distributed

ARCH_OVERRIDES = {"transformer_impl": "local", "apply_rope_fusion": False}


def _tiny() -> Any:
    return get_preset("llama_tiny", **ARCH_OVERRIDES)


def _tiny_te() -> Any:
    """The tiny Llama with Transformer Engine's layer spec (a run that can resume; never built on the CPU here)."""
    return get_preset("llama_tiny", apply_rope_fusion=False)


def _module_on_strategy(tp: int, world_size: int, seed: int) -> tuple[Any, Any]:
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
    module = LlamaLightningModule(arch=_tiny())
    strategy.connect(module)
    module.trainer = trainer
    strategy.setup_environment()
    torch.manual_seed(seed)  # CPU initialisation draws the full weights from torch's generator, then slices
    module.configure_model()
    return strategy, module


def _full_weights(module: Any) -> dict[str, torch.Tensor]:
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


def _save_worker(rank: int, world_size: int, path: str, tp: int) -> dict[str, torch.Tensor]:
    from tests.helpers import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = _module_on_strategy(tp, world_size, seed=0)
    lightning_state = {"global_step": 7, "state_dict": module.state_dict(), "loops": {"marker": "from the save"}}
    strategy.save_checkpoint(lightning_state, path)
    weights = _full_weights(module)
    strategy.teardown()
    return weights


def _load_worker(rank: int, world_size: int, path: str, tp: int) -> dict[str, Any]:
    strategy, module = _module_on_strategy(tp, world_size, seed=1)  # other weights than the saved ones
    before = _full_weights(module)
    restored = strategy.load_checkpoint(path)
    after = _full_weights(module)
    strategy.teardown()
    return {"before": before, "after": after, "restored": {k: v for k, v in restored.items() if k != "state_dict"}}


def _host_copy_sizes_worker(rank: int, world_size: int, tp: int, path: str) -> dict[str, Any]:
    """``host_copy_sizes`` against what Megatron's writer really stages in a save of the same model on this rank."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from tests.helpers import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = _module_on_strategy(tp, world_size, seed=0)
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
    full_bytes = sum(w.numel() * w.element_size() for w in _full_weights(module).values())
    params = len(list(module.model.parameters()))
    strategy.teardown()
    return {"sizes": sizes, "staged": staged, "full_bytes": full_bytes, "params": params}


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
    assert len(results[0]["sizes"]) == results[0]["params"] + _tiny().num_layers  # each layer's fc1 in two


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of the tiny Llama saved by two gloo ranks at TP2, and the full weights it holds."""
    root = tmp_path_factory.mktemp("tp2")
    path = root / "step=7.ckpt"
    weights = run_distributed(_save_worker, 2, root / "workers", str(path), 2)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)  # both ranks gathered the same model
    return path, weights[0]


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
    assert info.arch["num_layers"] == _tiny().num_layers and info.optimizer_sharding is None  # no optimizer saved
    assert json.loads((path / ckpt.INFO_FILENAME).read_text())["format"] == ckpt.FORMAT


def test_tp2_checkpoint_loads_into_one_rank(
    tp2_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, saved = tp2_checkpoint
    (result,) = run_distributed(_load_worker, 1, tmp_path, str(path), 1)
    assert set(result["after"]) == set(saved)
    assert any(not torch.equal(result["before"][k], saved[k]) for k in saved)  # loading changed the weights...
    torch.testing.assert_close(result["after"], saved, rtol=0, atol=0)  # ...into exactly the saved ones
    assert result["restored"]["global_step"] == 7
    assert result["restored"]["loops"] == {"marker": "from the save"}


def test_tp1_checkpoint_loads_into_two_tp_ranks(tmp_path: Path) -> None:
    path = tmp_path / "tp1.ckpt"
    (saved,) = run_distributed(_save_worker, 1, tmp_path / "save", str(path), 1)
    loaded = run_distributed(_load_worker, 2, tmp_path / "load", str(path), 2)
    for rank in loaded:
        torch.testing.assert_close(rank["after"], saved, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- damaged
def _copy(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> Path:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(tp2_checkpoint[0], copy)
    return copy


def test_missing_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist\. Check the path"):
        read_checkpoint_info(tmp_path / "nope.ckpt")


def test_interrupted_replacement_points_at_the_intact_previous_version(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path
) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    copy.rename(copy.with_name("copy.ckpt.replaced"))
    with pytest.raises(CheckpointError, match=r"previous version is intact at .*copy\.ckpt\.replaced; rename it back"):
        read_checkpoint_info(copy)


def test_single_file_checkpoint_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}}, file)
    with pytest.raises(CheckpointError, match="is a file, but MegatronCPStrategy checkpoints are directories"):
        read_checkpoint_info(file)


def test_unfinished_save_is_refused(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    for marker in (ckpt.INFO_FILENAME, "metadata.json"):
        (copy / marker).unlink()
    with pytest.raises(CheckpointError, match="save did not finish"):
        read_checkpoint_info(copy)


def test_megatron_lm_checkpoint_is_recognised_as_foreign(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ckpt.INFO_FILENAME).unlink()
    with pytest.raises(CheckpointError, match="not written by this package"):
        read_checkpoint_info(copy)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_is_found_without_reading_tensors(
    tp2_checkpoint: tuple[Path, Any], tmp_path: Path, damage: str
) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    shard = sorted(copy.glob("*.distcp"))[-1]
    if damage == "delete":
        shard.unlink()
        expected = rf"{shard.name} is missing"
    else:
        shard.write_bytes(shard.read_bytes()[:100])
        expected = rf"{shard.name} has 100 bytes, the save wrote \d+"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint_info(copy)


def test_damaged_index_and_info_are_reported(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"damaged: \.metadata has 7 bytes, the save wrote \d+"):
        read_checkpoint_info(copy)
    info = json.loads((copy / ckpt.INFO_FILENAME).read_text())
    (copy / ckpt.INFO_FILENAME).write_text(json.dumps({**info, "files": {}}))  # as written before files were recorded
    with pytest.raises(CheckpointError, match=r"shard index \(\.metadata\) cannot be read"):
        read_checkpoint_info(copy)
    (copy / ckpt.INFO_FILENAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"lightning_llama_fp8\.json is unreadable"):
        read_checkpoint_info(copy)


def test_missing_lightning_state_is_reported(tp2_checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    copy = _copy(tp2_checkpoint, tmp_path)
    (copy / ckpt.LIGHTNING_FILENAME).unlink()
    with pytest.raises(CheckpointError, match=r"lightning\.pt is missing"):
        read_checkpoint_info(copy)


# ---------------------------------------------------------------------------------------------- fits this run?
def _info(**overrides: Any) -> CheckpointInfo:
    from dataclasses import asdict

    fields: dict[str, Any] = dict(
        path=Path("ck"),
        global_step=100,
        tensor_model_parallel_size=2,
        context_parallel_size=1,
        world_size=8,
        arch=asdict(_tiny()),
        optimizer_sharding="dp_reshardable",
    )
    return CheckpointInfo(**{**fields, **overrides})


def test_other_architecture_is_refused_with_the_differences() -> None:
    arch = get_preset("llama_tiny", num_layers=4, hidden_size=512, **ARCH_OVERRIDES)
    with pytest.raises(
        CheckpointError, match=r"num_layers: checkpoint 2, model 4; hidden_size: checkpoint 256, model 512\)"
    ):
        check_can_resume(_info(), arch, 2, 1, with_optimizer=True)


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
        check_can_resume(_info(optimizer_sharding=None), _tiny(), 2, 1, with_optimizer=True)
    check_can_resume(_info(optimizer_sharding=None), _tiny(), 2, 1, with_optimizer=False)


# ---------------------------------------------------------------------------------------------- nothing is lost
def _write_marker(text: str) -> Any:
    def write(directory: Path) -> None:
        (directory / "marker").write_text(text)

    return write


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save = directories.save_directory_atomically
    save(path, _write_marker("old"), is_rank_zero=True, agree=lambda failure: failure)

    def crash(directory: Path) -> None:
        (directory / "marker").write_text("half")
        raise OSError("disk full")

    # Named as a checkpoint failure with its cause, what is intact and the free space (seen on an H200: torch's
    # writer reports a full disk as "unexpected pos 704 vs 598" from inside a Megatron worker).
    expected = r"Writing checkpoint .*last\.ckpt failed: OSError: disk full\. Nothing was replaced.*GiB free there now"
    with pytest.raises(CheckpointError, match=expected):
        save(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "old"  # untouched
    assert (tmp_path / "last.ckpt.saving").exists()  # the unfinished one, apart

    save(path, _write_marker("new"), is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # leftovers cleaned up


def test_a_save_stopped_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    """Killed after moving the old checkpoint aside and before moving the new one in: the next save restores the
    old one first, so even if that save fails too, the previous checkpoint is back under its name."""
    path = tmp_path / "last.ckpt"
    replaced, saving = tmp_path / "last.ckpt.replaced", tmp_path / "last.ckpt.saving"
    replaced.mkdir()
    (replaced / "marker").write_text("old")
    saving.mkdir()
    (saving / "marker").write_text("new but never published")
    with pytest.raises(CheckpointError, match=r"previous version is intact at .*last\.ckpt\.replaced"):
        read_checkpoint_info(path)

    def crash(directory: Path) -> None:
        raise OSError("killed again")

    with pytest.raises(CheckpointError, match="killed again"):
        directories.save_directory_atomically(path, crash, is_rank_zero=True, agree=lambda failure: failure)
    assert (path / "marker").read_text() == "old"
    assert not replaced.exists()


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    """What a non-zero rank sees when rank 0's file operations fail: an error, not a wait at the next barrier."""
    calls: list[str | None] = []

    def agree(failure: str | None) -> str | None:  # as if rank 0 reported a failure in the first phase
        calls.append(failure)
        return "PermissionError: read-only file system" if len(calls) == 1 else None

    with pytest.raises(CheckpointError, match=r"failed on another rank .*read-only file system.*nothing was replaced"):
        directories.save_directory_atomically(tmp_path / "x.ckpt", _write_marker("x"), is_rank_zero=False, agree=agree)
    assert calls == [None]  # this rank had nothing to do in that phase and stopped right after it


def test_remove_checkpoint_directory(tmp_path: Path) -> None:
    path = tmp_path / "step=2.ckpt"
    path.mkdir()
    (path / "x").write_text("x")
    path.with_name("step=2.ckpt.saving").mkdir()
    path.with_name("step=2.ckpt.replaced").mkdir()
    directories.remove_checkpoint_directory(path)
    assert list(tmp_path.iterdir()) == []


def test_strategy_rejects_unknown_optimizer_sharding() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(ValueError, match="'dp_reshardable' or 'fully_reshardable'"):
        MegatronCPStrategy(checkpoint_optimizer_sharding="zero")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- through Lightning
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
    resumed, resumed_trainer, messages = run(str(step2[0]))
    continued, continued_trainer, _ = run("last", max_steps=6)  # Lightning resolves "last" to the link
    return {
        "last_after_first": last_after_first,
        "continued": (continued_trainer.global_step, len(continued.seen)),
        "first_seen": first.seen,
        "resumed_seen": resumed.seen,
        "first_weight": first.weight.detach().clone(),
        "resumed_weight": resumed.weight.detach().clone(),
        "global_steps": (first_trainer.global_step, resumed_trainer.global_step),
        "checkpoints": sorted(p.name for p in Path(root, "ckpts").iterdir() if not p.is_symlink()),
        "messages": messages,
    }


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
        assert rank["last_after_first"] == 4  # save_last="link": last.ckpt points at the newest checkpoint
        assert rank["continued"] == (6, 2)  # fit(ckpt_path="last") went on from step 4 for two more steps
    assert set(results[0]["first_seen"][0]).isdisjoint(results[1]["first_seen"][0])  # two DP shards
    info = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=2.ckpt")
    assert info.global_step == 2 and info.world_size == 2


# ---------------------------------------------------------------------------------------------- llama-fp8 fit
def _config(ckpt_path: Path, arch: str = "llama_tiny", tp: int = 1) -> dict[str, Any]:
    return {
        "trainer": {
            "devices": 1,
            "max_steps": 1000,
            "strategy": {
                "class_path": "lightning_llama_fp8.MegatronCPStrategy",
                "init_args": {"tensor_model_parallel_size": tp},
            },
            "plugins": [{"class_path": "lightning_llama_fp8.MegatronPrecision"}],
        },
        "model": {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"arch": arch}},
        "data": {"init_args": {"global_batch_size": 4}},
        "ckpt_path": str(ckpt_path),
    }


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", r"Not training: Checkpoint .*nope\.ckpt does not exist"),
        ("other_arch", r"Not training: Checkpoint .* holds another architecture .*num_layers: checkpoint 2, model 32"),
        ("no_optimizer", r"Not training: Checkpoint .* has no optimizer state"),
    ],
)
def test_cli_refuses_a_bad_ckpt_path_before_building_anything(
    case: str, expected: str, tp2_checkpoint: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    path = tmp_path / "nope.ckpt" if case == "missing" else tp2_checkpoint[0]
    config = _config(path, arch="llama3_8b" if case == "other_arch" else "llama_tiny")
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert re.search(expected, capsys.readouterr().err)


def test_cli_lets_validate_load_weights_only_checkpoints(
    tp2_checkpoint: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    cli.check_checkpoint_from_config(_config(tp2_checkpoint[0]), ParallelLayout(), fitting=False)  # no exit
    cli.check_checkpoint_from_config({**_config(tp2_checkpoint[0]), "ckpt_path": "last"}, ParallelLayout(), True)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- trust, param sync
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


def test_weights_only_loading_is_refused_with_the_reason() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(CheckpointError, match=r"cannot be loaded with weights_only=True: they hold pickled data"):
        MegatronCPStrategy().load_checkpoint("any.ckpt", weights_only=True)


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


def test_resume_position_wraps_at_the_epoch_lightning_uses(tmp_path: Path) -> None:
    """With Trainer(limit_train_batches=2) an epoch is 2 batches however long the loader is: a checkpoint taken
    after 2 batches resumes at the start of the next epoch, one taken after 1 batch at batch 1."""
    from lightning_llama_fp8.data import ResumableDataLoader, ShardSampler

    data = list(range(16))
    sampler = ShardSampler(data, num_replicas=1, rank=0, batch_size=2)
    loader = ResumableDataLoader(
        data, batch_size=2, sampler=sampler, batches_done=lambda: 0, global_batch_size=2, epoch_length=lambda n: 2
    )
    loader.load_state_dict({"batches_done": 2, "global_batch_size": 2})
    assert [b.tolist() for b in loader][:2] == [[0, 1], [2, 3]]
    loader.load_state_dict({"batches_done": 1, "global_batch_size": 2})
    assert next(iter(loader)).tolist() == [2, 3]
    assert next(iter(loader)).tolist() == [0, 1]  # only the first pass after a resume starts part-way
    with pytest.raises(ValueError, match=r"trained with global_batch_size 8, this run has 2"):
        loader.load_state_dict({"batches_done": 1, "global_batch_size": 8})


def test_resumed_schedule_follows_this_runs_settings() -> None:
    """A run resumed with a longer schedule (decay over 8 steps instead of 4) keeps the step count and decays
    over 8 (Megatron-LM's --override-opt_param-scheduler), instead of silently keeping the checkpoint's schedule."""
    from types import SimpleNamespace

    from lightning_llama_fp8 import LlamaLightningModule, OptimizerSettings

    def scheduler(decay_steps: int) -> tuple[Any, dict[str, float]]:
        group = {"max_lr": 3e-4, "min_lr": 3e-5, "lr": 0.0, "weight_decay": 0.1, "wd_mult": 1.0, "lr_mult": 1.0}
        settings = OptimizerSettings(lr=3e-4, min_lr=3e-5, warmup_steps=1, decay_steps=decay_steps)
        module = LlamaLightningModule(_tiny(), settings)
        return module.lr_scheduler(SimpleNamespace(param_groups=[group])), group

    saved, _ = scheduler(4)
    for _ in range(3):
        saved.step(increment=1)
    resumed, group = scheduler(8)
    resumed.load_state_dict(saved.state_dict())
    reference, reference_group = scheduler(8)
    for _ in range(3):
        reference.step(increment=1)
    assert resumed.num_steps == 3 and resumed.lr_decay_steps == 8
    assert group["lr"] == pytest.approx(reference_group["lr"]) and group["lr"] > 3e-5


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


def test_cli_refuses_a_file_ckpt_path_without_loading_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI would torch.load a file ckpt_path (weights_only=True) right after parsing; a file holding
    anything but plain tensors then fails with an unpickling error. The CLI says what is wrong instead."""
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    file = tmp_path / "lightning.pt"
    torch.save({"hyper_parameters": {"arch": get_preset("llama_tiny")}}, file)  # what weights_only refuses
    config = tmp_path / "config.yaml"
    settings = {k: v for k, v in _config(file).items() if k not in ("ckpt_path", "data")}
    settings["model"] = {"arch": "llama_tiny"}
    settings["data"] = {"class_path": "lightning_llama_fp8.MockDataModule", "init_args": {"global_batch_size": 4}}
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit) as excinfo:
        llama_fp8(["fit", "--config", str(config), "--ckpt_path", str(file)])
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "is a file, but MegatronCPStrategy checkpoints are directories" in capsys.readouterr().err
