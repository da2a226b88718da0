"""The ``llama-fp8`` command on the CPU: config round trips, the pre-flight that refuses to train here, ``plan``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightning_llama_fp8.cli.fit as cli
from lightning_llama_fp8.cli import config_file, main
from lightning_llama_fp8.cli.config_file import EXIT_CANNOT_TRAIN, plan_from_config
from lightning_llama_fp8.cli.fit import LlamaCLI
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.data.preprocess import preprocess
from lightning_llama_fp8.plan.estimate import GIB

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
CONFIG_8B = ROOT / "examples" / "configs" / "llama3_8b_h100_fp8.yaml"
PARAMS_8B = "8,030,261,248"

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


def test_example_configs_found() -> None:
    assert CONFIG_8B in CONFIGS
    assert len(CONFIGS) >= 2


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


# ---------------------------------------------------------------------------------------------- print_config
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


def test_only_fit_and_validate(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(LlamaCLI.subcommands()) == {"fit", "validate"}
    assert main(["test", "--config", str(CONFIG_8B)]) == 2
    assert "llama-fp8: unknown command 'test'" in capsys.readouterr().err


def test_help_names_the_plan_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "llama-fp8 plan --config" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------- pre-flight
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


# ---------------------------------------------------------------------------------------------- plan
def run_plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def line(out: str, label: str) -> str:
    (found,) = [row for row in out.splitlines() if row.strip().startswith(label)]
    return found


def test_plan_8b(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_plan(["--config", str(CONFIG_8B)], capsys)
    assert code == 0
    assert err == ""
    assert f"{PARAMS_8B} total" in out
    assert "TP 1 x CP 2 x DP 4 = 8 GPUs" in out
    assert "global 128, micro 1, 32 micro batches per step, 1,048,576 tokens per step" in out
    assert "fp8, FP8 param gather on" in out
    assert "Memory per GPU" in out


def test_plan_gpus_6_is_a_layout_error(capsys: pytest.CaptureFixture[str]) -> None:
    # 6 GPUs divide into TP 1 x CP 2, but DP 3 does not divide the global batch of 128.
    code, out, err = run_plan(["--config", str(CONFIG_8B), "--gpus", "6"], capsys)
    assert code == EXIT_CANNOT_TRAIN
    assert out == ""
    assert err.startswith("llama-fp8 plan: Invalid parallel layout")
    assert "global batch size 128 is not divisible by micro batch size 1 x data-parallel size 3" in err


def test_plan_gpus_not_divisible_by_model_parallel(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_plan(["--config", str(CONFIG_8B), "--gpus", "5"], capsys)
    assert code == 2
    assert out == ""
    assert "world size 5 is not divisible by TP 1 x CP 2" in err


def test_plan_70b_tp8(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_plan(["--arch", "llama3_70b", "--gpus", "8", "--tp", "8"], capsys)
    assert code == 0, err
    assert "80 layers, hidden 8,192" in out
    assert "TP 8 x CP 1 x DP 1 = 8 GPUs" in out
    assert f"{get_preset('llama3_70b').num_parameters(8):,} total" in out  # vocab padded to 1024 x TP 8
    assert "bf16, FP8 param gather off" in out  # no config, no FP8 plugin


def test_plan_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_plan(
        ["--config", str(CONFIG_8B), "--tp", "2", "--cp", "1", "--sequence-parallel", "--global-batch-size", "64"],
        capsys,
    )
    assert code == 0
    assert "TP 2 x CP 1 x DP 4 = 8 GPUs, sequence parallel on" in out
    assert "global 64, micro 1, 16 micro batches per step" in out


def test_plan_precision_changes_weights(capsys: pytest.CaptureFixture[str]) -> None:
    _, fp8_out, _ = run_plan(["--config", str(CONFIG_8B)], capsys)
    code, bf16_out, _ = run_plan(["--config", str(CONFIG_8B), "--precision", "bf16"], capsys)
    assert code == 0
    assert "fp8, FP8 param gather on" in fp8_out
    assert "bf16, FP8 param gather off" in bf16_out
    fp8_weights, bf16_weights = line(fp8_out, "weights"), line(bf16_out, "weights")
    assert fp8_weights != bf16_weights
    assert bf16_weights.endswith(f"{2 * 8_030_261_248 / GIB:,.2f} GiB")  # every weight in bf16

    def gib(row: str) -> float:
        return float(row.split()[-2].replace(",", ""))

    assert gib(fp8_weights) < gib(bf16_weights)
    # --precision fp8 keeps the config's FP8 plugin (and its param gather).
    _, again, _ = run_plan(["--config", str(CONFIG_8B), "--precision", "fp8"], capsys)
    assert again == fp8_out


def test_plan_missing_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["plan", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"llama-fp8 plan: config file {missing} does not exist."  # one sentence, no usage dump


def test_plan_without_gpu_count(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_plan(["--arch", "llama3_8b"], capsys)
    assert code == 2
    assert out == ""
    assert "--gpus" in err


def test_plan_from_config_needs_gpus_when_devices_is_auto() -> None:
    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"]["devices"] = "auto"
    with pytest.raises(ValueError, match=r"trainer\.devices is 'auto'.*--gpus"):
        plan_from_config(config)
    del config["trainer"]["devices"]
    with pytest.raises(ValueError, match="--gpus"):
        plan_from_config(config)
    plan = plan_from_config(config, gpus=8)
    assert plan.world_size == 8
    assert plan.data_parallel_size == 4


def test_plan_from_config_reads_devices_and_nodes() -> None:
    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"].update(devices="4", num_nodes=2)
    assert plan_from_config(config).world_size == 8
    config["trainer"].update(devices=[0, 1], num_nodes=4)
    assert plan_from_config(config).world_size == 8


# ---------------------------------------------------------------------------------------------- packaging
def test_console_script_entry_point() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llama-fp8"] == "lightning_llama_fp8.cli:main"
    module_name, attr = scripts["llama-fp8"].split(":")
    entry = getattr(importlib.import_module(module_name), attr)
    assert callable(entry)
    assert entry is main


def test_example_script_parses_its_arguments() -> None:
    """The plain-Python example imports the public API and parses its flags on any machine."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(repo / "examples" / "train_llama3_8b_h100_fp8.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--context-parallel-size" in result.stdout and "--global-batch-size" in result.stdout
    assert "--resume" in result.stdout and "--save-interval" in result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_validation_schedule_allows_a_short_run(path: Path) -> None:
    """``--trainer.max_steps 5`` on an example config must not trip Lightning's check that ``val_check_interval`` fits
    in one epoch (raised after the model is built): the configs count the interval over the run, as Megatron-LM's
    ``--eval-interval`` does. Runs Lightning's loop with the configs' validation settings on a toy module."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer_config = yaml.safe_load(path.read_text())["trainer"]
    schedule = {key: trainer_config[key] for key in ("val_check_interval", "check_val_every_n_epoch")}
    assert isinstance(schedule["val_check_interval"], int) and schedule["val_check_interval"] > 5
    trainer = Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=5, **schedule,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.global_step == 5


@pytest.mark.parametrize(
    "devices,expected", [(2, 2), ("2", 2), ("0,1", 2), ("3,", 1), ([0, 1, 2], 3), ("-1", None), ("auto", None)]
)
@no_gpu
def test_gpu_count_read_like_lightning(devices: Any, expected: int | None) -> None:
    assert config_file.gpus_from({"devices": devices, "num_nodes": 2}) == (None if expected is None else 2 * expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (("data", "seq_length", 4096), r"data.seq_length \(4096\) differs from model.arch.seq_length \(8192\)"),
        (("optimizer", "decay_steps", 100), r"warmup_steps \(30518\) must be smaller than decay_steps \(100\)"),
        (("trainer", "devices", 0), r"trainer.devices must be >= 1"),
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


@no_gpu
def test_text_config_names_a_missing_corpus_before_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(ROOT / "examples" / "configs" / "llama3_1b_text.yaml")])
    assert excinfo.value.code == EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err
    assert "Not training: Corpus 'data/my_text': data/my_text.bin and data/my_text.idx not found" in err
