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
