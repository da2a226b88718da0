"""Bad Hugging Face inputs and unusable checkpoints are refused before anything is built, naming the file or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.checkpoint.info import INFO_FILENAME, CheckpointError
from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf import HFConfigError, export_to_hf, llama_config_from_hf
from lightning_llama_fp8.hf.files import INDEX_FILE
from tests.helpers import run_distributed
from tests.test_hf import CPU_ARCH, LLAMA31_ROPE, make_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(directory, groups=2, max_shard_size="100KB")
    assert (directory / INDEX_FILE).is_file()
    return directory


def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    return copy


def _edit_config(directory: Path, **changes: Any) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def _module(directory: Path, **kwargs: Any) -> Any:
    from lightning_llama_fp8 import LlamaLightningModule

    return LlamaLightningModule(init_weights=str(directory), **kwargs)


def test_missing_shard(hf_dir: Path, tmp_path: Path) -> None:
    copy = _copy(hf_dir, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFConfigError, match=rf"shard\(s\) {shard.name} named by {INDEX_FILE} are missing"):
        _module(copy)


def test_truncated_shard(hf_dir: Path, tmp_path: Path) -> None:
    copy = _copy(hf_dir, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(HFConfigError, match=rf"{shard.name} is truncated: its header needs \d+ bytes"):
        _module(copy)


def test_no_weights_at_all(hf_dir: Path, tmp_path: Path) -> None:
    copy = _copy(hf_dir, tmp_path)
    (copy / INDEX_FILE).unlink()
    with pytest.raises(HFConfigError, match=rf"has neither model.safetensors nor {INDEX_FILE}"):
        _module(copy)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(HFConfigError, match=r"has no config.json|does not exist"):
        _module(tmp_path / "nope")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "mistral"}, "model_type is 'mistral', not 'llama'"),
        ({"attention_bias": True}, "attention_bias is true"),
        ({"mlp_bias": True}, "mlp_bias is true"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ({"num_local_experts": 8}, "num_local_experts is 8 .mixture-of-experts"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}}, "RoPE type is 'yarn'"),
        ({"rope_parameters": {**LLAMA31_ROPE, "high_freq_factor": 2.0, "rope_theta": 5e5}}, "high_freq_factor is 2.0"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type is 'linear'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.5}}, "rope_theta 1.5 is not an integer"),
        ({"num_hidden_layers": None}, "field 'num_hidden_layers' is missing"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_unrepresentable_config_names_the_field(
    hf_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    copy = _copy(hf_dir, tmp_path)
    _edit_config(copy, **changes)
    with pytest.raises(HFConfigError, match=message):
        llama_config_from_hf(copy)
    with pytest.raises(HFConfigError, match=message):
        _module(copy)


def test_config_that_disagrees_with_the_weights(hf_dir: Path, tmp_path: Path) -> None:
    copy = _copy(hf_dir, tmp_path)
    _edit_config(copy, intermediate_size=512)
    expected = r"model-\d+-of-\d+.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape \[256, 128\]"
    with pytest.raises(HFConfigError, match=expected + r", but config.json implies \[512, 128\]"):
        _module(copy)


def test_untied_config_without_lm_head(tmp_path: Path) -> None:
    make_hf_model(tmp_path, tie=True)
    _edit_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(HFConfigError, match=r"lm_head.weight are missing .* is it a tied model"):
        _module(tmp_path)


def test_unexpected_bias_tensor(tmp_path: Path) -> None:
    make_hf_model(tmp_path, attention_bias=True)
    _edit_config(tmp_path, attention_bias=False)  # a config that hides the biases the weights have
    with pytest.raises(HFConfigError, match=r"no place for: model.layers.0.self_attn.*bias"):
        _module(tmp_path)


def test_arch_that_disagrees_with_config_json(hf_dir: Path) -> None:
    with pytest.raises(HFConfigError, match=r"model.arch disagrees with .*config.json on num_layers: 32 vs 2"):
        _module(hf_dir, arch="llama3_8b")
    with pytest.raises(HFConfigError, match="cannot be overridden"):
        LlamaConfig.from_hf(hf_dir, num_layers=4)
    agreeing = LlamaConfig.from_hf(hf_dir, seq_length=512, **CPU_ARCH)
    assert _module(hf_dir, arch=agreeing).arch.seq_length == 512


def test_cli_preflight_refuses_a_bad_init_weights(hf_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from lightning_llama_fp8.cli.fit import preflight

    copy = _copy(hf_dir, tmp_path)
    _edit_config(copy, model_type="gpt2")
    config = {
        "trainer": {"strategy": {"class_path": "lightning_llama_fp8.MegatronCPStrategy"}, "devices": 1, "max_steps": 5},
        "model": {"init_args": {"init_weights": str(copy)}},
    }
    with pytest.raises(SystemExit) as exit_info:
        preflight(config)
    assert exit_info.value.code == 2 and "model_type is 'gpt2'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- export
def _save_worker(rank: int, world_size: int, hf_dir: str, ckpt: str) -> None:
    from tests.helpers import allow_dist_checkpointing_on_cpu
    from tests.test_hf import CPU_ARCH, module_from_hf

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_from_hf(hf_dir, world_size, CPU_ARCH)
    strategy.save_checkpoint({"global_step": 1, "state_dict": module.state_dict()}, ckpt)
    strategy.teardown()


@pytest.fixture(scope="module")
def checkpoint(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    path = root / "step=1.ckpt"
    run_distributed(_save_worker, 1, root / "workers", str(hf_dir), str(path))
    return path


def test_export_refuses_a_checkpoint_whose_record_disagrees(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(checkpoint, copy)
    info = json.loads((copy / INFO_FILENAME).read_text())
    info["arch"]["ffn_hidden_size"] = 512
    (copy / INFO_FILENAME).write_text(json.dumps(info))
    # Found by read_checkpoint_info (checkpoint.py) or, failing that, by the export's own shape check.
    with pytest.raises(CheckpointError, match=r"decoder.layers.mlp.linear_fc1.weight .*2, 512, 128"):
        export_to_hf(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_damaged_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(checkpoint, copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=rf"{shard.name} has 10 bytes"):
        export_to_hf(copy, tmp_path / "out")


def test_export_refuses_a_bad_tokenizer_before_writing(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(HFConfigError, match="is not a tokenizer the tokenizers library can load"):
        export_to_hf(checkpoint, tmp_path / "out", tokenizer=bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
