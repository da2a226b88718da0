"""Reading a ``llama-fp8`` config file (cli/config_file.py): one sentence for a file that is not a config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_llama_fp8.cli import config_file
from lightning_llama_fp8.cli.config_file import plan_from_config
from lightning_llama_fp8.config import LlamaConfig, get_preset
from tests.helpers.gpus import no_gpu
from tests.helpers.hf_models import make_hf_model
from tests.helpers.paths import CONFIG_1B, CONFIG_8B


@pytest.mark.parametrize("subcommand", ["fit", "validate", "plan"])
@pytest.mark.parametrize(
    "content,expected",
    [
        ("- a\n- b\n", r"is a list, not a mapping of sections"),
        ("trainer: [unclosed\n", r"is not valid YAML at line 2, column 1"),
        ("", r"is empty"),
        (None, r"does not exist"),
    ],
    ids=["list", "unparsable", "empty", "missing"],
)
def test_malformed_config_files_get_one_sentence(
    subcommand: str, content: str | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert llama_fp8([subcommand, "--config", str(path)]) == cli.EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err.strip()
    assert re.search(rf"^llama-fp8 {subcommand}: config file .*config\.yaml {expected}", err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


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


@pytest.mark.parametrize(
    "devices,expected", [(2, 2), ("2", 2), ("0,1", 2), ("3,", 1), ([0, 1, 2], 3), ("-1", None), ("auto", None)]
)
@no_gpu
def test_gpu_count_read_like_lightning(devices: Any, expected: int | None) -> None:
    assert config_file.gpus_from({"devices": devices, "num_nodes": 2}) == (None if expected is None else 2 * expected)


def test_yaml_init_weights_reaches_the_module(tmp_path: Path) -> None:
    """``model.init_weights`` in a LightningCLI config: the CLI's pre-flight and the module see the HF architecture."""
    from lightning_llama_fp8.cli.config_file import arch_from as _arch_from

    make_hf_model(tmp_path, groups=2)
    model = {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"init_weights": str(tmp_path)}}
    arch = _arch_from(model)
    assert (arch.num_layers, arch.num_query_groups, arch.vocab_size) == (2, 2, 1000)
    assert _arch_from({}).num_layers == 32  # no init_weights: still the 8B default


def test_field_overrides_change_the_named_architecture_not_llama3_8b(tmp_path: Path) -> None:
    """jsonargparse applies ``--model.arch.num_layers 4`` to a fresh LlamaConfig (8B defaults) when model.arch is a
    preset name: the preset is written out before the first such override, so only the field changes."""
    import json

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"arch": "llama3_2_1b"}}))
    words = ["fit", "--config", str(config), "--model.arch.num_layers", "4", "--trainer.max_steps", "5"]
    expanded = config_file.expand_arch_before_field_overrides(words)
    assert expanded[:3] == words[:3] and expanded[4:] == words[3:]
    flag, fields = expanded[3].split("=", 1)
    assert flag == "--model.arch" and json.loads(fields)["hidden_size"] == 2048  # llama3_2_1b's, not the 8B's 4096
    # A name on the command line counts from where it stands; a mapping in the config needs nothing.
    words = ["fit", "-c", str(config), "--model.arch", "llama_tiny", "--model.arch.num_layers=1"]
    assert config_file.expand_arch_before_field_overrides(words)[5] == (
        "--model.arch=" + json.dumps(dataclasses.asdict(get_preset("llama_tiny")))
    )
    config.write_text(yaml.safe_dump({"model": {"arch": {"num_layers": 2}}}))
    words = ["fit", "--config", str(config), "--model.arch.num_layers", "4"]
    assert config_file.expand_arch_before_field_overrides(words) == words


def test_fields_from_a_later_file_or_inline_change_the_named_architecture(tmp_path: Path) -> None:
    """The same for a later config file's arch mapping, inline JSON, ``--model FILE`` (its own preset counts), and a
    model.init_weights directory when no arch is named."""
    import json

    named, fields, model = tmp_path / "named.yaml", tmp_path / "fields.yaml", tmp_path / "model.yaml"
    named.write_text(yaml.safe_dump({"model": {"arch": "llama3_2_1b"}}))
    fields.write_text(yaml.safe_dump({"model": {"arch": {"num_layers": 4}}}))
    model.write_text(yaml.safe_dump({"arch": "llama3_2_3b"}))

    def inserted(words: list[str]) -> list[int]:
        expanded = config_file.expand_arch_before_field_overrides(words)
        return [json.loads(w.split("=", 1)[1])["hidden_size"] for w in expanded if w.startswith("--model.arch={")]

    assert inserted(["fit", "--config", str(named), "--config", str(fields)]) == [2048]
    assert inserted(["fit", "--config", str(named), "--model.arch", '{"num_layers": 2}']) == [2048]
    assert inserted(["fit", "--config", str(named), "--model", str(model), "--model.arch.num_layers", "4"]) == [3072]
    assert inserted(["fit", "--config", str(named), "--config", "model: {arch: {num_layers: 2}}"]) == [2048]
    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir)
    assert inserted(["fit", "--model.init_weights", str(hf_dir), "--model.arch.seq_length", "512"]) == [
        LlamaConfig.from_hf(hf_dir).hidden_size
    ]


def test_field_override_of_a_preset_reaches_the_parsed_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end through LightningCLI's parser: the 1B preset with 4 layers, not the 8B with 4 layers."""
    from lightning_llama_fp8.cli import main

    config = yaml.safe_load(CONFIG_1B.read_text())
    config["model"]["arch"] = "llama3_2_1b"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(path), "--model.arch.num_layers", "4", "--print_config"])
    assert stop.value.code in (0, None)
    arch = yaml.safe_load(capsys.readouterr().out)["model"]["arch"]
    assert (arch["num_layers"], arch["hidden_size"], arch["tie_embeddings"]) == (4, 2048, True)
