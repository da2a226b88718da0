"""Reading a Hugging Face config.json (hf/config.py): what a Llama of this package cannot represent is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.hf import HFConfigError, llama_config_from_hf
from tests.helpers.hf_models import LLAMA31_ROPE, copy_hf_dir, edit_hf_config, hf_module


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(HFConfigError, match=r"has no config.json|does not exist"):
        hf_module(tmp_path / "nope")


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
    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, **changes)
    with pytest.raises(HFConfigError, match=message):
        llama_config_from_hf(copy)
    with pytest.raises(HFConfigError, match=message):
        hf_module(copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 128.5}, r"config.json: hidden_size must be a whole number >= 1; got 128\.5, which has a frac"),
        ({"num_hidden_layers": "two"}, r"num_hidden_layers must be a whole number >= 1; got 'two', which is not a"),
        ({"num_hidden_layers": True}, r"num_hidden_layers must be a whole number >= 1; got True \(bool\)"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be a whole number >= 1; got 0\."),
        ({"intermediate_size": -256}, r"intermediate_size must be a whole number >= 1; got -256\."),
        ({"max_position_embeddings": -1}, r"max_position_embeddings must be a whole number >= 1; got -1\."),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a finite number > 0; got nan\."),
        ({"tie_word_embeddings": "false"}, r"tie_word_embeddings must be true or false; got 'false' \(str\)"),
        ({"attention_bias": "no"}, r"attention_bias must be true or false; got 'no' \(str\)"),
        ({"pretraining_tp": 1.5}, r"pretraining_tp must be a whole number; got 1\.5, which has a fractional part"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, r"rope_theta must be a finite number > 0"),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "factor": float("inf"), "rope_theta": 5e5}},
            r"RoPE scaling factor must be a finite number > 0; got inf\.",
        ),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "low_freq_factor": "one", "rope_theta": 5e5}},
            r"RoPE scaling low_freq_factor must be a finite number; got 'one', which is not a number",
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_config_json_numbers_that_are_not_what_they_look_like(
    hf_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, **changes)
    with pytest.raises(HFConfigError, match=message):
        llama_config_from_hf(copy)


def test_config_json_whole_numbers_written_as_floats_are_read(hf_dir: Path, tmp_path: Path) -> None:
    copy = copy_hf_dir(hf_dir, tmp_path)
    edit_hf_config(copy, num_hidden_layers=2.0, hidden_size=128.0, vocab_size=1e3)
    arch = llama_config_from_hf(copy)
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (2, 128, 1000)
    assert arch == llama_config_from_hf(hf_dir)
    hf_module(copy)  # and the weights load checks accept it


def test_init_weights_given_a_training_checkpoint_points_to_convert_and_ckpt_path(tmp_path: Path) -> None:
    """Found by an audit: a training checkpoint given as init_weights was "Not a Hugging Face model directory"."""
    run = tmp_path / "run"
    (run / "step=7.ckpt").mkdir(parents=True)
    (run / "step=7.ckpt" / "lightning_llama_fp8.json").write_text("{}")
    with pytest.raises(
        HFConfigError,
        match=r"step=7\.ckpt is a training checkpoint of lightning_llama_fp8 \(it has lightning_llama_fp8\.json, no "
        r"config\.json\).*llama-fp8 convert CHECKPOINT HF_DIR.*ckpt_path",
    ):
        hf_module(run / "step=7.ckpt")
    with pytest.raises(HFConfigError, match=r"run holds training checkpoints of lightning_llama_fp8 \(step=7\.ckpt\)"):
        hf_module(run)


def test_init_weights_given_a_safetensors_file_asks_for_its_directory(hf_dir: Path) -> None:
    """Found by an audit: the weights file was read as a config.json."""
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    with pytest.raises(HFConfigError, match=rf"{shard} is a weights file; give the Hugging Face model directory .*"):
        hf_module(shard)
