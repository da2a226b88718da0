"""Hugging Face ``config.json`` read into the fields of :class:`~lightning_llama_fp8.config.LlamaConfig`.

Only what Megatron-Core's GPTModel computes exactly like ``transformers.LlamaForCausalLM`` is accepted: RMSNorm,
SwiGLU (``silu``), RoPE without or with Llama 3.1's ``llama3`` frequency scaling (low 1, high 4, original context
8192: the constants Megatron-Core hard-codes), grouped-query attention, no biases. Anything else is refused with
the field that is unsupported, so a model is never trained (or exported) as a different function.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CONFIG_FILENAME = "config.json"

#: LlamaConfig fields that ``config.json`` decides; every other field is a training choice.
HF_DEFINED_FIELDS: tuple[str, ...] = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "rotary_base",
    "rope_scaling",
    "rope_scaling_factor",
    "tie_embeddings",
    "norm_epsilon",
)

#: Megatron-Core's ``RotaryEmbedding._apply_scaling`` constants (megatron-core 0.19.2); Llama 3.1 and 3.2 use them.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: ``max_position_embeddings`` of Meta's releases: 8192 (Llama 3), 131072 (3.1 and 3.2, with ``llama3`` scaling).
LLAMA3_CONTEXT, LLAMA3_1_CONTEXT = 8192, 131072


class HFConfigError(ValueError):
    """A Hugging Face checkpoint (config or weights) this package cannot represent or read; the message says why."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory (or the file itself)."""
    path = Path(path)
    file = path / CONFIG_FILENAME if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {CONFIG_FILENAME}" if path.is_dir() else f"{path} does not exist"
        raise HFConfigError(f"Not a Hugging Face model directory: {where}.")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFConfigError(f"{file} is not readable JSON ({err}).") from err
    if not isinstance(config, dict):
        raise HFConfigError(f"{file} does not hold a JSON object.")
    return config


def rope_settings(config: dict[str, Any], source: str = CONFIG_FILENAME) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling parameters or None)``, from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` fields."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else {**params, "rope_type": rope_type}
        return float(theta), scaling
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise HFConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}.")
    if scaling is not None:
        scaling = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
        if scaling["rope_type"] == "default":
            scaling = None
    return float(config.get("rope_theta", 10000.0)), scaling


def hf_architecture(path_or_config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The :class:`~lightning_llama_fp8.config.LlamaConfig` fields that a Hugging Face Llama 3 / 3.1 / 3.2
    ``config.json`` (a model directory, the file, or its parsed contents) decides, and where they came from.

    ``seq_length`` is 8192, or ``max_position_embeddings`` if that is smaller.

    Raises:
        HFConfigError: naming the field, for anything GPTModel would compute differently from
            ``transformers.LlamaForCausalLM`` (another model type, biases, activation, RoPE type, MoE, ...).
    """
    if isinstance(path_or_config, dict):
        config, source = path_or_config, CONFIG_FILENAME
    else:
        config, source = read_hf_config(path_or_config), str(_config_file(Path(path_or_config)))
    _refuse_unsupported(config, source)

    def required(name: str) -> Any:
        if config.get(name) is None:
            raise HFConfigError(f"{source}: field {name!r} is missing; a Llama config.json has it.")
        return config[name]

    hidden, heads = int(required("hidden_size")), int(required("num_attention_heads"))
    head_dim = config.get("head_dim")
    theta, scaling = rope_settings(config, source)
    if theta != int(theta):
        raise HFConfigError(f"{source}: rope_theta {theta} is not an integer; Megatron's rotary_base is one.")
    fields: dict[str, Any] = dict(
        num_layers=int(required("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(required("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim) if head_dim is not None else hidden // heads,
        vocab_size=int(required("vocab_size")),
        rotary_base=int(theta),
        rope_scaling=scaling is not None,
        rope_scaling_factor=float(scaling["factor"]) if scaling is not None else 8.0,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
    )
    max_positions = config.get("max_position_embeddings")
    fields["seq_length"] = min(LLAMA3_CONTEXT, int(max_positions)) if max_positions else LLAMA3_CONTEXT
    return fields, source


def _config_file(path: Path) -> Path:
    return path / CONFIG_FILENAME if path.is_dir() else path


def _refuse_unsupported(config: dict[str, Any], source: str) -> None:
    """Raise for every config.json setting that GPTModel cannot compute as transformers' Llama does."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise HFConfigError(
            f"{source}: model_type is {model_type!r}, not 'llama'. Only Llama (Llama 3 / 3.1 / 3.2 and the same "
            "architecture) converts; other architectures need their own mapping."
        )
    problems = []
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag} is true (this model's linear layers have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config['hidden_act']!r} (only 'silu', i.e. SwiGLU)")
    for moe in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
        if config.get(moe):
            problems.append(f"{moe} is {config[moe]!r} (mixture-of-experts layers are not supported)")
    if int(config.get("pretraining_tp", 1) or 1) != 1:
        problems.append(f"pretraining_tp is {config['pretraining_tp']} (only 1)")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("head_dim") is None and heads and hidden and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and head_dim is unset")
    _, scaling = rope_settings(config, source)
    if scaling is not None:
        if scaling["rope_type"] != "llama3":
            problems.append(
                f"RoPE type is {scaling['rope_type']!r} (rope_parameters / rope_scaling); only default RoPE and "
                "Llama 3.1's 'llama3' frequency scaling are supported"
            )
        else:
            for name, expected in MEGATRON_LLAMA3_ROPE.items():
                value = scaling.get(name, expected)
                if not math.isclose(float(value), expected):
                    problems.append(
                        f"RoPE scaling {name} is {value} (Megatron-Core's llama3 RoPE scaling fixes it at {expected:g})"
                    )
            if not scaling.get("factor") or float(scaling["factor"]) <= 0:
                problems.append(f"RoPE scaling factor is {scaling.get('factor')!r} (must be > 0)")
    if problems:
        raise HFConfigError(f"{source} describes a model this package cannot represent: " + "; ".join(problems) + ".")
