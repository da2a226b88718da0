"""``llama-fp8 plan`` (cli/plan.py): the plan of a config or of flags, with overrides, and its refusals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.cli import main
from lightning_llama_fp8.cli.config_file import EXIT_CANNOT_TRAIN
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.plan.estimate import GIB
from tests.helpers.paths import CONFIG_1GPU, CONFIG_8B, PARAMS_8B


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


def test_plan_command_recompute_and_offload_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    args = ["plan", "--config", str(CONFIG_1GPU), "--gpu-memory-gib", "140"]
    assert main(args) == 0
    shipped = capsys.readouterr().out
    assert "full (uniform, 1 layer per chunk)" in shipped and "Host memory per GPU" in shipped
    assert "Fits 140 GiB per GPU" in shipped and "yes, " in shipped
    # The shipped one-GPU 8B plan is 89.28 GiB; measured runs needed up to 13% more (11.61 GiB here).
    assert main([*args[:-1], "100"]) == 0
    assert "tight: 10.72 GiB left, less than the up to 13% above the plan (11.61 GiB)" in capsys.readouterr().out
    assert main([*args, "--optimizer-offload-fraction", "0"]) == 1  # "no": scripts read it from the exit status
    no_offload = capsys.readouterr().out
    assert re.search(r"Optimizer offload +off", no_offload) and "no, " in no_offload
    assert main([*args, "--recompute", "selective", "--recompute-modules", "core_attn", "mlp"]) == 0
    assert "selective (core_attn, mlp)" in capsys.readouterr().out
    assert main([*args, "--recompute", "off"]) == 0
    assert re.search(r"Recompute +off", capsys.readouterr().out)
    assert main([*args, "--recompute", "full", "--recompute-num-layers", "99"]) == 2
    assert "num_layers (99, layers per chunk)" in capsys.readouterr().err


def test_plan_pipeline_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    assert main(["plan", "--arch", "llama3_8b", "--gpus", "4", "--pp", "4", "--global-batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "1F1B, one chunk per stage; layers per stage 8, 8, 8, 8; bubble 27.3% of each step (8 micro batches)" in out
    assert main(["plan", "--arch", "llama3_8b", "--gpus", "4", "--pp", "4", "--vpp", "3"]) != 0
    assert "do not split into virtual_pipeline_model_parallel_size 3" in capsys.readouterr().err
    assert main(["plan", "--arch", "llama3_8b", "--gpus", "2", "--pp", "2", "--first-stage-layers", "15"]) == 0
    assert "layers per stage 15, 17" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpu-memory-gib", "-5"], "argument --gpu-memory-gib: the value must be a finite number > 0; got '-5'"),
        (["--gpu-memory-gib", "nan"], "argument --gpu-memory-gib: the value must be a finite number > 0; got 'nan'"),
        (["--gpus", "0"], "argument --gpus: the value must be a whole number >= 1; got '0'"),
        (["--tp", "2.5"], "argument --tp: the value must be a whole number >= 1; got '2.5', which has a fractional"),
        (["--vpp", "-1"], "argument --vpp: the value must be a whole number >= 0; got '-1'"),
        (["--micro-batch-size", "0"], "argument --micro-batch-size: the value must be a whole number >= 1; got '0'"),
        (
            ["--optimizer-offload-fraction", "1.5"],
            "argument --optimizer-offload-fraction: the value must be a finite number >= 0 and <= 1; got '1.5'",
        ),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_plan_flags_take_only_the_numbers_they_mean(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        run_plan(["--config", str(CONFIG_8B), *flags], capsys)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("data", "seq_length", -1, r"data\.seq_length must be a whole number >= 1; got -1\."),
        ("data", "micro_batch_size", 1.5, r"data\.micro_batch_size must be a whole number >= 1; got 1\.5, which has"),
        ("data", "seed", 2**32, r"data\.seed must be a whole number >= 0 and <= 4,294,967,295; got 4294967296\."),
        (
            "strategy",
            "context_parallel_size",
            2.5,
            r"init_args\.context_parallel_size must be a whole number; got 2\.5",
        ),
        ("strategy", "sequence_parallel", "false", r"init_args\.sequence_parallel must be true or false; got 'false'"),
        ("trainer", "num_nodes", 0, r"trainer\.num_nodes must be a whole number >= 1; got 0\."),
        ("trainer", "devices", 2.5, r"trainer\.devices must be >= 1, a list of GPU ids, -1 or 'auto'; got 2\.5\."),
        ("arch", "hidden_size", 256.7, r"LlamaConfig: hidden_size must be a whole number >= 1; got 256\.7, which has"),
    ],
)
def test_plan_refuses_config_numbers_that_training_would_refuse_or_misread(
    section: str, key: str, value: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative data.seq_length was ignored by the plan, 2.5 cut to 2, "false" read as true."""
    import yaml

    config = yaml.safe_load(CONFIG_8B.read_text())
    where = {
        "data": config["data"]["init_args"],
        "strategy": config["trainer"]["strategy"]["init_args"],
        "trainer": config["trainer"],
        "arch": config["model"]["arch"],
    }[section]
    where[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_plan(["--config", str(path)], capsys)
    assert (code, out) == (EXIT_CANNOT_TRAIN, "")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["data"]["init_args"].update(seq_length=4096),
            r"data\.seq_length \(4096\) differs from model\.arch\.seq_length \(8192\)",
        ),
        (
            lambda c: c["trainer"]["strategy"]["init_args"].update(use_distributed_optimizer=False),
            r"overlap_param_gather=True needs use_distributed_optimizer=True .* leave overlap_param_gather unset",
        ),
        (
            lambda c: c["trainer"]["strategy"]["init_args"].update(checkpoint_optimizer_sharding="bogus"),
            r"checkpoint_optimizer_sharding must be 'dp_reshardable' .* got 'bogus'",
        ),
        (
            lambda c: c["trainer"].update(strategy="lightning_llama_fp8.MegatronCPStrategy"),
            r"read by Lightning as a registered strategy name, not a class path: write it as a mapping",
        ),
        (
            lambda c: c["model"]["arch"].update(num_layer=4),
            r"model\.arch has no field 'num_layer'; LlamaConfig's fields are num_layers, ",
        ),
        (  # --tp and the like were dropped for another strategy's config
            lambda c: c["trainer"].update(strategy="ddp"),
            r"trainer\.strategy is 'ddp'; the plan covers MegatronCPStrategy runs",
        ),
    ],
    ids=["seq-length", "overlap-without-distributed-optimizer", "sharding", "strategy-class-path", "arch-typo", "ddp"],
)
def test_plan_refuses_settings_that_training_would_refuse(
    change: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these was planned with exit status 0 while ``fit`` refused it (or failed after starting)."""
    import yaml

    config = yaml.safe_load(CONFIG_8B.read_text())
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_plan(["--config", str(path)], capsys)
    assert (code, out) == (EXIT_CANNOT_TRAIN, "")
    assert re.search(message, err), err


def test_plan_reads_a_plugin_given_as_a_bare_class_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``plugins: [lightning_llama_fp8.TEFP8Precision]`` trains in FP8; the plan said bf16 and counted bf16 memory."""
    import yaml

    config = yaml.safe_load(CONFIG_8B.read_text())
    config["trainer"]["plugins"] = ["lightning_llama_fp8.TEFP8Precision"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, _ = run_plan(["--config", str(path)], capsys)
    assert code == 0
    assert re.search(r"Precision +fp8", out), out
