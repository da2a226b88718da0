"""Which architecture to train: a preset, a ready :class:`LlamaConfig` or a Hugging Face model directory, and the
translation of a :class:`LlamaConfig` into Hugging Face's ``config.json``."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_llama_fp8.config import PRESETS, LlamaConfig, get_preset
from lightning_llama_fp8.hf.config import (
    HF_DEFINED_FIELDS,
    LLAMA3_1_CONTEXT,
    LLAMA3_CONTEXT,
    MEGATRON_LLAMA3_ROPE,
    HFConfigError,
)

#: A Hugging Face layer tensor's name and its layer number (``model.layers.{i}.``, hf/mapping.py's names).
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def llama_config_from_hf(path_or_config: str | Path | dict[str, Any], **overrides: Any) -> LlamaConfig:
    """:meth:`LlamaConfig.from_hf` (also for a parsed ``config.json``)."""
    return LlamaConfig.from_hf(path_or_config, **overrides)


def resolve_arch(arch: str | LlamaConfig | None, init_weights: str | os.PathLike[str] | None = None) -> LlamaConfig:
    """Accept a preset name, a ready config or a Hugging Face model directory (what the CLI and Python users pass).

    With ``init_weights`` (a Hugging Face directory) the architecture is that of its ``config.json``: ``arch`` may
    be left out (None) and must otherwise agree with it. None without ``init_weights`` is Llama 3 8B.
    """
    is_hf_dir = isinstance(arch, (str, os.PathLike)) and str(arch) not in PRESETS and os.path.isdir(arch)
    if init_weights is not None or is_hf_dir:
        return arch_for_hf(arch, init_weights)
    if arch is None:
        return get_preset("llama3_8b")
    return get_preset(arch) if isinstance(arch, str) else arch


def arch_for_hf(arch: str | LlamaConfig | None, init_weights: str | os.PathLike[str] | None) -> LlamaConfig:
    """The architecture to train when weights come from the Hugging Face directory ``init_weights``.

    ``arch`` None (or the same directory): the one ``config.json`` describes. A preset name, a LlamaConfig or
    another Hugging Face directory must agree with it on every field config.json decides, else HFConfigError.
    """
    hf_dir = init_weights if init_weights is not None else arch
    assert isinstance(hf_dir, (str, os.PathLike))
    from_file = llama_config_from_hf(hf_dir)
    if arch is None or (isinstance(arch, (str, os.PathLike)) and _same_path(arch, hf_dir)):
        return from_file
    if isinstance(arch, LlamaConfig):
        given = arch
    elif Path(arch, "config.json").is_file():
        given = llama_config_from_hf(arch)
    else:
        given = get_preset(str(arch))
    differences = hf_defined_differences(given, from_file)
    if differences:
        raise HFConfigError(
            f"model.arch disagrees with {Path(hf_dir) / 'config.json'} on {'; '.join(differences)} (arch vs "
            "config.json). Leave model.arch out to take the architecture from config.json, or make it agree."
        )
    return given


def check_weights_hold_the_layers(arch: LlamaConfig, tensor_names: Iterable[str], path: str | os.PathLike[str]) -> None:
    """Refuse a ``config.json`` (read into ``arch``) that has more layers than the Hugging Face weights of ``path``,
    whose tensors are ``tensor_names`` (from the safetensors headers; no tensor data is read).

    Call it before anything is sized from ``config.json``: the tables of tensor names and shapes built to check and
    load the weights grow with its layer count, so a config of 1e9 layers would otherwise exhaust host memory with no
    message. (Its other sizes only enter shapes, which the weight check compares with the files tensor by tensor.)

    Raises:
        HFConfigError: with both counts.
    """
    layers = {int(found.group(1)) for name in tensor_names if (found := _HF_LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if arch.num_layers > held:
        what = f"layers 0 to {held - 1}" if held else "no layers"
        raise HFConfigError(
            f"{Path(path) / 'config.json'} says num_hidden_layers is {arch.num_layers:,}, but the safetensors files of "
            f"{path} hold {what}: config.json does not describe these weights (from another model, or edited?). Put "
            "the config.json of these weights beside them; nothing was built."
        )


def _same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


#: The oldest transformers that reads every field :func:`hf_config_from_llama` writes (Llama 3.1's ``llama3`` RoPE
#: scaling came in 4.43). Written as ``transformers_version``: transformers 5 warns that a local tokenizer whose
#: config.json has none may carry Mistral's faulty pre-tokenizer regex ("incorrect regex pattern"), which a Llama 3
#: tokenizer does not.
CONFIG_TRANSFORMERS_VERSION = "4.43.0"


def hf_config_from_llama(
    arch: LlamaConfig, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None
) -> dict[str, Any]:
    """The ``config.json`` of ``arch`` for ``transformers.LlamaForCausalLM`` (BF16 weights).

    RoPE is written both as transformers 5's ``rope_parameters`` and as the older ``rope_theta`` / ``rope_scaling``
    fields, so transformers 4.x and tools that read those (vLLM) get the same model. ``max_position_embeddings`` is
    Meta's published context (8192, or 131072 with ``llama3`` scaling), or the training ``seq_length`` if longer.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(arch.rotary_base)}
    scaling = None
    if arch.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": float(arch.rope_scaling_factor), **MEGATRON_LLAMA3_ROPE}
        rope = {**scaling, "rope_theta": float(arch.rotary_base)}
    context = LLAMA3_1_CONTEXT if arch.rope_scaling else LLAMA3_CONTEXT
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "transformers_version": CONFIG_TRANSFORMERS_VERSION,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": arch.kv_channels,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": arch.init_method_std,
        "intermediate_size": arch.ffn_hidden_size,
        "max_position_embeddings": max(context, arch.seq_length),
        "mlp_bias": False,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_query_groups,
        "pretraining_tp": 1,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_parameters": rope,
        "rope_theta": float(arch.rotary_base),
        "rope_scaling": scaling,
        "tie_word_embeddings": arch.tie_embeddings,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": arch.vocab_size,
    }


def hf_defined_differences(arch: LlamaConfig, other: LlamaConfig) -> list[str]:
    """``field: a vs b`` for every field that config.json decides and the two configs disagree on."""
    return [
        f"{name}: {getattr(arch, name)!r} vs {getattr(other, name)!r}"
        for name in HF_DEFINED_FIELDS
        if getattr(arch, name) != getattr(other, name) and not (name == "rope_scaling_factor" and not arch.rope_scaling)
    ]
