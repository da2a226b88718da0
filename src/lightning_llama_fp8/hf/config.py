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

from lightning_llama_fp8.validate import SettingError, as_bool, as_float, as_int

CONFIG_FILENAME = "config.json"
#: The info file of this package's training checkpoints (``checkpoint.info.INFO_FILENAME``; that layer is above this).
TRAINING_CHECKPOINT_INFO = "lightning_llama_fp8.json"

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


#: How errors name the RoPE scaling factor (``rope_parameters.factor``; ``rope_scaling.factor`` before transformers 5).
ROPE_FACTOR = "RoPE scaling factor"


class HFConfigError(ValueError):
    """A Hugging Face checkpoint (config or weights) this package cannot represent or read; the message says why."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory (or the file itself)."""
    path = Path(path)
    file = path / CONFIG_FILENAME if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        _refuse_training_checkpoints(path)
    if path.is_file() and ".safetensors" in path.name:
        raise HFConfigError(
            f"{path} is a weights file; give the Hugging Face model directory holding {CONFIG_FILENAME} and the "
            f"safetensors ({path.parent})."
        )
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


def _refuse_training_checkpoints(path: Path) -> None:
    """Say so where a directory without ``config.json`` is a training checkpoint of this package or holds some."""
    convert = (
        "To start a new run from its weights, export them first (llama-fp8 convert CHECKPOINT HF_DIR) and give "
        "HF_DIR; to continue the run that saved it, pass the checkpoint as ckpt_path instead."
    )
    if (path / TRAINING_CHECKPOINT_INFO).is_file():
        raise HFConfigError(
            f"{path} is a training checkpoint of lightning_llama_fp8 (it has {TRAINING_CHECKPOINT_INFO}, no "
            f"{CONFIG_FILENAME}), not a Hugging Face model directory. {convert}"
        )
    checkpoints = sorted(entry.name for entry in path.glob("*.ckpt") if (entry / TRAINING_CHECKPOINT_INFO).is_file())
    if checkpoints:
        raise HFConfigError(
            f"{path} holds training checkpoints of lightning_llama_fp8 ({', '.join(checkpoints[:5])}"
            f"{' ...' if len(checkpoints) > 5 else ''}), not a Hugging Face model ({CONFIG_FILENAME}). {convert}"
        )


def _number(
    config: dict[str, Any], name: str, source: str, parse: Any, default: Any = None, label: str = "", **limits: Any
) -> Any:
    """``config[name]`` checked by ``parse`` (``validate.as_int`` / ``as_float``) within ``limits``; ``default``
    where it is missing or null (a missing field without a default is an error). ``label`` names the field in errors
    (default: ``name``)."""
    value = config.get(name)
    if value is None:
        if default is None:
            raise HFConfigError(f"{source}: field {label or name!r} is missing; a Llama config.json has it.")
        return default
    try:
        return parse(value, f"{source}: {label or name}", **limits)
    except SettingError as err:
        raise HFConfigError(str(err)) from None


def _switch(config: dict[str, Any], name: str, source: str, default: bool) -> bool:
    """``config[name]`` as a JSON true/false (``default`` where missing or null): ``"false"`` is refused rather than
    read as true."""
    value = config.get(name)
    if value is None:
        return default
    try:
        return as_bool(value, f"{source}: {name}")
    except SettingError as err:
        raise HFConfigError(str(err)) from None


def rope_settings(config: dict[str, Any], source: str = CONFIG_FILENAME) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling parameters or None)``, from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` fields. ``rope_theta`` must be a finite number > 0."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta_from = params if params.get("rope_theta") is not None else config
        theta = _number(theta_from, "rope_theta", source, as_float, default=10000.0, above=0)
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else {**params, "rope_type": rope_type}
        return theta, scaling
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise HFConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}.")
    if scaling is not None:
        scaling = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
        if scaling["rope_type"] == "default":
            scaling = None
    return _number(config, "rope_theta", source, as_float, default=10000.0, above=0), scaling


def hf_architecture(path_or_config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The :class:`~lightning_llama_fp8.config.LlamaConfig` fields that a Hugging Face Llama 3 / 3.1 / 3.2
    ``config.json`` (a model directory, the file, or its parsed contents) decides, and where they came from.

    ``seq_length`` is 8192, or ``max_position_embeddings`` if that is smaller. Every size must be a whole number
    >= 1 (``validate.as_int``: ``4096.0`` is 4096, ``4096.5`` is refused, not cut), ``rms_norm_eps`` and the RoPE
    numbers finite and > 0, ``tie_word_embeddings`` true or false; the error names the ``config.json`` field.

    Raises:
        HFConfigError: naming the field, for anything GPTModel would compute differently from
            ``transformers.LlamaForCausalLM`` (another model type, biases, activation, RoPE type, MoE, ...) and for
            a value that is not a number of the kind and range the field needs.
    """
    if isinstance(path_or_config, dict):
        config, source = path_or_config, CONFIG_FILENAME
    else:
        config, source = read_hf_config(path_or_config), str(_config_file(Path(path_or_config)))

    def size(name: str, default: int | None = None) -> int:
        return _number(config, name, source, as_int, default=default, at_least=1)

    _refuse_unsupported(config, source)
    hidden, heads = size("hidden_size"), size("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is None and hidden % heads:
        raise HFConfigError(
            f"{source} describes a model this package cannot represent: hidden_size {hidden} is not a multiple of "
            f"num_attention_heads {heads} and head_dim is unset."
        )
    theta, scaling = rope_settings(config, source)
    if not theta.is_integer():
        raise HFConfigError(f"{source}: rope_theta {theta} is not an integer; Megatron's rotary_base is one.")
    factor = 8.0 if scaling is None else _number(scaling, "factor", source, as_float, label=ROPE_FACTOR, above=0)
    fields: dict[str, Any] = dict(
        num_layers=size("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=size("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=size("num_key_value_heads", default=heads),
        kv_channels=size("head_dim", default=hidden // heads),
        vocab_size=size("vocab_size"),
        rotary_base=int(theta),
        rope_scaling=scaling is not None,
        rope_scaling_factor=factor,
        tie_embeddings=_switch(config, "tie_word_embeddings", source, default=False),
        norm_epsilon=_number(config, "rms_norm_eps", source, as_float, default=1e-6, above=0),
    )
    fields["seq_length"] = min(LLAMA3_CONTEXT, size("max_position_embeddings", default=LLAMA3_CONTEXT))
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
        if _switch(config, flag, source, default=False):
            problems.append(f"{flag} is true (this model's linear layers have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config['hidden_act']!r} (only 'silu', i.e. SwiGLU)")
    for moe in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
        if config.get(moe):
            problems.append(f"{moe} is {config[moe]!r} (mixture-of-experts layers are not supported)")
    if _number(config, "pretraining_tp", source, as_int, default=1) != 1:
        problems.append(f"pretraining_tp is {config['pretraining_tp']} (only 1)")
    _, scaling = rope_settings(config, source)
    if scaling is not None:
        if scaling["rope_type"] != "llama3":
            problems.append(
                f"RoPE type is {scaling['rope_type']!r} (rope_parameters / rope_scaling); only default RoPE and "
                "Llama 3.1's 'llama3' frequency scaling are supported"
            )
        else:
            for name, expected in MEGATRON_LLAMA3_ROPE.items():
                value = _number(scaling, name, source, as_float, default=expected, label=f"RoPE scaling {name}")
                if not math.isclose(value, expected):
                    problems.append(
                        f"RoPE scaling {name} is {value} (Megatron-Core's llama3 RoPE scaling fixes it at {expected:g})"
                    )
    if problems:
        raise HFConfigError(f"{source} describes a model this package cannot represent: " + "; ".join(problems) + ".")
