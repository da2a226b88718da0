"""``llama-fp8 fit`` / ``validate`` (cli/fit.py): the pre-flight that refuses, before anything is built, what cannot
train here or cannot work at all."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

import lightning_llama_fp8.cli.fit as cli
from lightning_llama_fp8.callbacks import StepProgressBar
from lightning_llama_fp8.cli import main
from lightning_llama_fp8.cli import main as cli_main
from lightning_llama_fp8.cli.config_file import EXIT_CANNOT_TRAIN, plan_from_config
from lightning_llama_fp8.cli.fit import LlamaCLI
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.data.preprocess import preprocess
from lightning_llama_fp8.parallel.layout import ParallelLayout
from lightning_llama_fp8.plan.estimate import GIB
from tests.helpers import REPO_ROOT
from tests.helpers.checkpoints import (
    fake_resumable_checkpoint,
)
from tests.helpers.corpora import LLAMA3_VOCAB, megatron_corpus
from tests.helpers.fits import GBS
from tests.helpers.gpus import no_gpu
from tests.helpers.hf_models import copy_hf_dir, edit_hf_config
from tests.helpers.paths import CONFIG_8B, CONFIGS, PARAMS_8B


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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
def test_cli_lets_validate_load_weights_only_checkpoints(
    tp2_checkpoint: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    cli.check_checkpoint_from_config(_config(tp2_checkpoint[0]), ParallelLayout(), fitting=False)  # no exit
    cli.check_checkpoint_from_config({**_config(tp2_checkpoint[0]), "ckpt_path": "last"}, ParallelLayout(), True)
    assert capsys.readouterr().err == ""


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


def _cli_config(arch: str = "llama_tiny", ckpt_path: Path | None = None) -> dict[str, Any]:
    return {
        "trainer": {
            "devices": 1,
            "max_steps": 1000,
            "strategy": {"class_path": "lightning_llama_fp8.MegatronCPStrategy", "init_args": {}},
            "plugins": [{"class_path": "lightning_llama_fp8.MegatronPrecision"}],
        },
        "model": {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"arch": arch}},
        "data": {"class_path": "lightning_llama_fp8.MockDataModule", "init_args": {"global_batch_size": GBS}},
        "ckpt_path": None if ckpt_path is None else str(ckpt_path),
    }


def test_cli_refuses_bf16_layers_that_cover_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config(arch="llama_tiny")  # 2 layers
    config["trainer"]["plugins"] = [
        {"class_path": "lightning_llama_fp8.TEFP8Precision", "init_args": {"recipe": "current", "bf16_last_layers": 2}}
    ]
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "no layer would train in FP8" in capsys.readouterr().err


def test_cli_refuses_changed_batch_size_and_learning_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    path = fake_resumable_checkpoint(tmp_path)
    config = _cli_config(ckpt_path=path)
    config["data"]["init_args"]["global_batch_size"] = 8
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "trained with global_batch_size 4, this run has 8" in capsys.readouterr().err
    config = _cli_config(ckpt_path=path)
    config["model"]["init_args"]["optimizer"] = {"lr": 1e-3, "min_lr": 3e-5}
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "lr: checkpoint 0.0003, this run 0.001" in capsys.readouterr().err
    from lightning_llama_fp8.parallel.layout import ParallelLayout

    cli.check_checkpoint_from_config(_cli_config(ckpt_path=path), ParallelLayout(), fitting=True)  # same: passes
    assert capsys.readouterr().err == ""


def test_cli_refuses_a_resume_into_other_optimizer_state_dtypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint holds Megatron's default optimizer state (an older record: no optimizer_state); the config asks
    for bf16 moments. Refused before building, naming both; the checkpoint's setting (none) passes."""
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.parallel.layout import ParallelLayout

    path = fake_resumable_checkpoint(tmp_path)
    config = _cli_config(ckpt_path=path)
    config["trainer"]["strategy"]["init_args"]["optimizer_precision"] = {"exp_avg_dtype": "bf16"}
    with pytest.raises(SystemExit) as excinfo:
        cli.check_checkpoint_from_config(config, ParallelLayout(), fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err
    assert "holds optimizer state as Megatron's default (fp32 main weights and moments)" in err
    assert "Resume with the checkpoint's optimizer_precision (null)" in err
    cli.check_checkpoint_from_config(config, ParallelLayout(), fitting=False)  # validation loads weights only
    config["trainer"]["strategy"]["init_args"]["optimizer_precision"] = None
    cli.check_checkpoint_from_config(config, ParallelLayout(), fitting=True)
    # "auto" (also when not set) resumes the checkpoint's own optimizer state: nothing to refuse here.
    for auto in ({"optimizer_precision": "auto"}, {}):
        config["trainer"]["strategy"]["init_args"] = auto
        cli.check_checkpoint_from_config(config, ParallelLayout(), fitting=True)
    assert capsys.readouterr().err == ""


def test_cli_auto_resume_keeps_the_checkpoints_optimizer_state_in_the_plan_and_checks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint with main-weight remainders: "auto" plans with its state, and a run that cannot keep it
    (fully_reshardable saves) is refused before building, saying what to do."""
    from lightning_llama_fp8 import OptimizerPrecisionSettings
    from lightning_llama_fp8.checkpoint import info as ckpt
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli.config_file import plan_from_config
    from lightning_llama_fp8.parallel.layout import ParallelLayout

    path = fake_resumable_checkpoint(tmp_path)
    settings = OptimizerPrecisionSettings()  # bf16 moments, as an explicit setting wrote them
    info = dataclasses.replace(ckpt.read_checkpoint_info(path), optimizer_state=settings.checkpoint_record())
    (path / ckpt.INFO_FILENAME).write_text(info.to_json())
    config = _cli_config(ckpt_path=path)
    assert plan_from_config(config, gpus=1).optimizer_precision == settings  # a new run would plan fp32 moments
    config["trainer"]["strategy"]["init_args"]["checkpoint_optimizer_sharding"] = "fully_reshardable"
    with pytest.raises(SystemExit) as excinfo:
        cli.check_checkpoint_from_config(config, ParallelLayout(), fitting=True)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "Resume with 'dp_reshardable'; to change the layout, start a new run from its weights" in (
        capsys.readouterr().err
    )


def test_cli_refuses_a_val_check_interval_larger_than_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config()
    config["trainer"].update(max_steps=500, val_check_interval=1000)
    with pytest.raises(SystemExit):
        cli.preflight(config, fitting=True)
    assert "val_check_interval (1000) is larger than an epoch (500 training batches)" in capsys.readouterr().err
    config["trainer"]["check_val_every_n_epoch"] = None  # the example configs: counted over the run
    cli.check_model_against_config(config, fitting=True)


def test_cli_refuses_odd_data_paths_before_building(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = _cli_config()
    config["data"] = {
        "class_path": "lightning_llama_fp8.IndexedDataModule",
        "init_args": {"data_path": [0.5, "a", "b"]},
    }
    with pytest.raises(SystemExit) as excinfo:
        cli.check_data_from_config(config)  # the pre-flight's data check (on a machine that can train)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "mixes weights and prefixes" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_cli_resolves_last_past_a_dangling_link(
    llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``llama-fp8 fit --ckpt_path last`` through LightningCLI: the newest complete checkpoint is handed to the
    pre-flight (which then refuses this one for having no optimizer state: it was saved without)."""
    import yaml

    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    directory = tmp_path / "ckpts"
    directory.mkdir()
    shutil.copytree(llama_checkpoint, directory / "epoch=0-step=7.ckpt")
    (directory / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")  # deleted by save_top_k before the relink
    config = {k: v for k, v in _cli_config().items() if k != "ckpt_path"}
    config["model"] = {"arch": "llama_tiny"}  # LightningCLI takes the model's arguments directly
    config["data"]["init_args"].update(seq_length=256, vocab_size=1000)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(directory)}}
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as excinfo:
        llama_fp8(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    out, err = capsys.readouterr()
    assert f"ckpt_path 'last': resuming from {directory / 'epoch=0-step=7.ckpt'} (step 7)" in out
    assert re.search(r"Not training: Checkpoint .*epoch=0-step=7\.ckpt", err), err


def print_config(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``llama-fp8 fit --config path --print_config``: the printed YAML (LightningCLI exits 0 after printing)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(path), "--print_config"])
    assert excinfo.value.code in (0, None)
    return capsys.readouterr().out


@pytest.fixture
def no_preflight(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record pre-flight calls instead of running them."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli, "preflight", lambda config, **kwargs: calls.append(config))
    return calls


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_print_config_round_trip(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_preflight: list[dict[str, Any]]
) -> None:
    first = print_config(path, capsys)
    printed = yaml.safe_load(first)
    assert isinstance(printed, dict) and "trainer" in printed
    copy = tmp_path / "printed.yaml"
    copy.write_text(first)
    second = print_config(copy, capsys)
    assert second == first
    assert no_preflight == []  # --print_config exits while parsing, before before_instantiate_classes

    # The values the config set survived the trip (and the defaults were filled in).
    raw = yaml.safe_load(path.read_text())
    for config in (printed, yaml.safe_load(second)):
        trainer = config["trainer"]
        strategy, raw_strategy = trainer["strategy"], raw["trainer"]["strategy"]
        assert strategy["class_path"] == "lightning_llama_fp8.MegatronCPStrategy"
        for key, value in raw_strategy["init_args"].items():
            assert strategy["init_args"][key] == value, key
        assert strategy["init_args"]["context_parallel_size"] == raw_strategy["init_args"]["context_parallel_size"]

        (plugin,) = trainer["plugins"]
        (raw_plugin,) = raw["trainer"]["plugins"]
        assert plugin["class_path"] == raw_plugin["class_path"] == "lightning_llama_fp8.TEFP8Precision"
        assert plugin["init_args"] == {
            "recipe": "delayed",
            "fp8_format": "hybrid",
            "margin": 0,
            "amax_history_len": 1024,
            "amax_compute_algo": "max",
            "fp8_param_gather": False,
            "fallback": None,
            "fast_weight_refresh": True,
            **raw_plugin["init_args"],
        }

        for key, value in raw["model"]["arch"].items():
            assert config["model"]["arch"][key] == value, key
        for key, value in raw["model"]["optimizer"].items():
            assert config["model"]["optimizer"][key] == pytest.approx(value), key

        assert config["data"]["class_path"] == raw["data"]["class_path"]
        for key in ("global_batch_size", "micro_batch_size", "seq_length", "vocab_size"):
            assert config["data"]["init_args"][key] == raw["data"]["init_args"][key], key
        assert trainer["devices"] == raw["trainer"]["devices"]
        assert config["seed_everything"] == raw["seed_everything"]

    # `llama-fp8 plan` reads the printed (fully expanded) config the way it reads the hand-written one.
    assert plan_from_config(printed) == plan_from_config(raw)


def test_print_config_8b_values(capsys: pytest.CaptureFixture[str], no_preflight: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(print_config(CONFIG_8B, capsys))
    strategy = config["trainer"]["strategy"]["init_args"]
    assert strategy["context_parallel_size"] == 2
    assert strategy["tensor_model_parallel_size"] == 1
    assert config["trainer"]["plugins"][0]["init_args"]["fp8_param_gather"] is True
    assert config["model"]["arch"]["num_layers"] == 32
    assert config["model"]["arch"]["rotary_base"] == 1_000_000
    assert config["data"]["init_args"]["global_batch_size"] == 128


@no_gpu
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_fit_preflight_refuses_on_cpu(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    instantiated: list[Any] = []
    monkeypatch.setattr(LlamaCLI, "instantiate_classes", lambda self: instantiated.append(self))
    corpus = []
    if "IndexedDataModule" in path.read_text():  # a text config: its corpus is checked first, on any machine
        (tmp_path / "text.jsonl").write_text('{"text": "a few words of text"}\n' * 8)
        preprocess([tmp_path / "text.jsonl"], tmp_path / "text", progress=False)
        corpus = ["--data.data_path", f"[{tmp_path / 'text'}]", "--data.path_to_cache", str(tmp_path / "cache")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(path), *corpus])
    assert excinfo.value.code == EXIT_CANNOT_TRAIN == 2
    assert instantiated == []  # no Trainer, strategy, model or data module was built

    out, err = capsys.readouterr()
    expected = plan_from_config(yaml.safe_load(path.read_text()))
    assert f"{expected.total_parameters:,} total" in out
    assert "Memory per GPU" in out
    assert f"{expected.memory.total / GIB:,.2f} GiB" in out
    assert "Not training: no CUDA GPU is visible" in err
    assert "FP8 training needs NVIDIA GPUs" in err
    assert "compute capability >= 8.9" in err
    assert "run the same command on a machine that has them" in err


@no_gpu
def test_fit_preflight_8b_plan(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LlamaCLI, "instantiate_classes", lambda self: pytest.fail("classes were instantiated"))
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(CONFIG_8B)])
    assert excinfo.value.code == 2
    out = capsys.readouterr().out
    assert f"{PARAMS_8B} total" in out
    assert "TP 1 x CP 2 x DP 4 = 8 GPUs" in out
    assert "32 micro batches per step" in out
    assert "fp8, FP8 param gather on" in out


def test_preflight_ignores_other_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "fp8_support", lambda recipe="delayed": pytest.fail("checked the GPU"))
    cli.preflight({"trainer": {"strategy": "ddp", "devices": 2}})
    cli.preflight({"trainer": {}})


@no_gpu
def test_preflight_bf16_also_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"]["plugins"] = [{"class_path": "lightning_llama_fp8.MegatronPrecision"}]
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config)
    assert excinfo.value.code == 2
    out, err = capsys.readouterr()
    assert "bf16, FP8 param gather off" in out
    assert "Training needs NVIDIA GPUs" in err


def test_preflight_bf16_on_gpus_without_transformer_engine(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a machine with 8 GPUs but no TE: the default TE layer spec would fail inside Megatron's model build."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(cli, "te_importable", lambda: False)
    monkeypatch.setattr(cli, "fp8_support", lambda *args, **kwargs: (False, "Transformer Engine is not importable."))
    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"]["plugins"] = [{"class_path": "lightning_llama_fp8.MegatronPrecision"}]
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    assert "Transformer Engine does not import here" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    "change,message",
    [
        (("data", "seq_length", 4096), r"data.seq_length \(4096\) differs from model.arch.seq_length \(8192\)"),
        (("optimizer", "decay_steps", 100), r"warmup_steps \(30518\) must be smaller than decay_steps \(100\)"),
        (("trainer", "devices", 0), r"trainer.devices must be >= 1"),
        (("trainer", "accumulate_grad_batches", 4), r"accumulate_grad_batches=4 does not apply .* global_batch_size"),
        (("trainer", "gradient_clip_val", 1.0), r"gradient_clip_val=1.0 does not apply .*\(model.optimizer.clip_grad"),
    ],
)
def test_fit_preflight_refuses_configs_that_cannot_work(
    change: tuple[str, str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    config = yaml.safe_load(CONFIG_8B.read_text())
    section, key, value = change
    target = {"data": config["data"]["init_args"], "optimizer": config["model"]["optimizer"]}.get(section)
    target = config[section] if target is None else target
    target[key] = value
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    assert re.search(message, capsys.readouterr().err)


def test_fit_preflight_refuses_offload_beyond_the_host_memory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offloaded optimizer state of every GPU process of the host, against the host's available memory."""
    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"]["strategy"]["init_args"]["optimizer_offload"] = {"fraction": 1.0}
    config["trainer"]["plugins"] = [{"class_path": "lightning_llama_fp8.MegatronPrecision"}]
    plan = plan_from_config(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine that could train it otherwise
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(cli, "te_importable", lambda: True)
    monkeypatch.setattr(cli, "fp8_support", lambda *args, **kwargs: (True, None))
    monkeypatch.setattr(cli, "available_host_memory", lambda: 8 * plan.memory.host)
    cli.preflight(config, fitting=True)  # just enough: goes on to build
    monkeypatch.setattr(cli, "available_host_memory", lambda: 8 * plan.memory.host - 1)
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    err = " ".join(capsys.readouterr().err.split())
    assert "Not training: the offloaded optimizer state needs" in err and "for the 8 processes of this host" in err


@no_gpu
def test_text_config_names_a_missing_corpus_before_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(REPO_ROOT / "examples" / "configs" / "llama3_1b_text.yaml")])
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err
    assert "Not training: Corpus 'data/my_text': data/my_text.bin and data/my_text.idx not found" in err


def test_cli_refuses_a_missing_corpus_before_building(
    corpora: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli

    config = {
        "data": {
            "class_path": "lightning_llama_fp8.IndexedDataModule",
            "init_args": {"data_path": [str(tmp_path / "gone")]},
        }
    }
    with pytest.raises(SystemExit) as excinfo:
        cli.check_data_from_config(config)
    assert excinfo.value.code == cli.EXIT_CANNOT_TRAIN
    assert "Not training: Corpus" in capsys.readouterr().err
    ok = {"data": {"class_path": "lightning_llama_fp8.IndexedDataModule", "init_args": {"data_path": [corpora["low"]]}}}
    cli.check_data_from_config(ok)  # no exit


def test_fit_preflight_refuses_out_of_vocabulary_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = megatron_corpus(tmp_path / "m", [[1, 2, 3] * 50, [LLAMA3_VOCAB + 3] * 40] * 4)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  max_steps: 200\n  devices: 1\n"
        "  strategy:\n    class_path: lightning_llama_fp8.MegatronCPStrategy\n"
        "model:\n  arch: llama3_2_1b\n"
        "data:\n  class_path: lightning_llama_fp8.IndexedDataModule\n  init_args:\n"
        f"    data_path: [{prefix}]\n    seq_length: 8192\n    global_batch_size: 2\n    micro_batch_size: 1\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"Not training: Corpus '{prefix}' holds token id {LLAMA3_VOCAB + 3}" in err


def test_cli_preflight_refuses_a_bad_init_weights(hf_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from lightning_llama_fp8.cli.fit import preflight

    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, model_type="gpt2")
    config = {
        "trainer": {"strategy": {"class_path": "lightning_llama_fp8.MegatronCPStrategy"}, "devices": 1, "max_steps": 5},
        "model": {"init_args": {"init_weights": str(copy)}},
    }
    with pytest.raises(SystemExit) as exit_info:
        preflight(config)
    assert exit_info.value.code == 2 and "model_type is 'gpt2'" in capsys.readouterr().err


CLI_ARGS = ["--trainer.accelerator=cpu", "--trainer.max_steps=5", "--data=lightning_llama_fp8.MockDataModule"]


@pytest.mark.parametrize(
    "extra,expected",
    [
        ([], StepProgressBar),
        (["--trainer.enable_progress_bar=false"], type(None)),
        (["--trainer.callbacks=lightning.pytorch.callbacks.TQDMProgressBar"], TQDMProgressBar),
    ],
)
def test_cli_makes_the_step_bar_the_default(extra: list[str], expected: type) -> None:
    from lightning_llama_fp8.cli.fit import LlamaCLI
    from lightning_llama_fp8.data import GPTDataModule
    from lightning_llama_fp8.model import LlamaLightningModule

    cli = LlamaCLI(LlamaLightningModule, GPTDataModule, subclass_mode_data=True, run=False, args=CLI_ARGS + extra)
    assert type(cli.trainer.progress_bar_callback) is expected


def test_document_masking_is_a_command_line_switch(
    capsys: pytest.CaptureFixture[str], no_preflight: list[dict[str, Any]]
) -> None:
    text_config = REPO_ROOT / "examples" / "configs" / "llama3_1b_text.yaml"
    for extra, expected in (([], False), (["--data.document_masking", "true"], True)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as excinfo:
            main(["fit", "--config", str(text_config), *extra, "--print_config"])
        assert excinfo.value.code in (0, None)
        assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["document_masking"] is expected
    mock_config = yaml.safe_load(print_config(REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml", capsys))
    assert mock_config["data"]["init_args"]["document_masking"] is False  # MockDataModule has it too


@pytest.mark.parametrize(
    "edit,message",
    [
        ({}, r"document_masking with context_parallel_size 2: .*Set the strategy's context_parallel_size: 1"),
        ({"context_parallel_size": 1, "fp8_attention": True}, r"FP8 attention .*Set fp8_attention: false"),
    ],
)
def test_fit_preflight_refuses_document_masking_that_cannot_run(
    edit: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(CONFIG_8B.read_text())  # CP2
    config["data"]["init_args"]["document_masking"] = True
    if "context_parallel_size" in edit:
        config["trainer"]["strategy"]["init_args"]["context_parallel_size"] = edit["context_parallel_size"]
    if edit.get("fp8_attention"):
        config["trainer"]["plugins"][0]["init_args"]["fp8_attention"] = True
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=True)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    assert re.search(message, capsys.readouterr().err)


def test_validate_without_weights_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``llama-fp8 validate --config X`` without ckpt_path or init_weights validated random weights without a word."""
    config = yaml.safe_load(CONFIG_8B.read_text())
    with pytest.raises(SystemExit) as excinfo:
        cli.preflight(config, fitting=False)
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    assert "Not validating: validate needs weights: --ckpt_path CHECKPOINT" in capsys.readouterr().err


def test_fit_offers_no_torch_optimizer_options(capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI's --optimizer/--lr_scheduler would replace Megatron's optimizer (and fail on the unbuilt model)."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.optimizer" in out and "--optimizer " not in out and "--lr_scheduler" not in out
