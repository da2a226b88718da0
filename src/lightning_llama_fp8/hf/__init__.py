"""Hugging Face Llama 3 / 3.1 / 3.2 weights in and out.

- In: ``LlamaLightningModule(init_weights=HF_DIR)`` (YAML ``model.init_weights``) builds the architecture of
  ``HF_DIR/config.json`` and starts training from its safetensors weights, in any TP x CP x DP layout, with a fresh
  optimizer (:func:`load_hf_weights`); ``LlamaConfig.from_hf(HF_DIR)`` gives the architecture alone.
- Out: ``llama-fp8 convert CHECKPOINT OUT_DIR`` writes a training checkpoint as a directory that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads (:func:`export_to_hf`), streaming tensor by tensor.

``safetensors`` is the only dependency; ``transformers`` is used by the tests only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llama_fp8._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_llama_fp8.hf.arch import arch_for_hf, hf_config_from_llama, llama_config_from_hf
    from lightning_llama_fp8.hf.config import HFConfigError
    from lightning_llama_fp8.hf.export import export_to_hf
    from lightning_llama_fp8.hf.load import check_hf_weights, load_hf_weights

__all__ = [
    "HFConfigError",
    "arch_for_hf",
    "check_hf_weights",
    "export_to_hf",
    "hf_config_from_llama",
    "llama_config_from_hf",
    "load_hf_weights",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "HFConfigError": "lightning_llama_fp8.hf.config",
        "arch_for_hf": "lightning_llama_fp8.hf.arch",
        "check_hf_weights": "lightning_llama_fp8.hf.load",
        "export_to_hf": "lightning_llama_fp8.hf.export",
        "hf_config_from_llama": "lightning_llama_fp8.hf.arch",
        "llama_config_from_hf": "lightning_llama_fp8.hf.arch",
        "load_hf_weights": "lightning_llama_fp8.hf.load",
    },
)
