"""The names of ``lightning_llama_fp8`` the benchmarks need that its public API does not export.

Imported from here only, so that a module moved inside the package is fixed in this one file.
"""

from lightning_llama_fp8.checkpoint.info import INFO_FILENAME, LIGHTNING_FILENAME
from lightning_llama_fp8.checkpoint.state_io import save_megatron_state
from lightning_llama_fp8.data.corpus import corpus_binding, loss_mask_path
from lightning_llama_fp8.hf.files import ShardedSafetensorsWriter
from lightning_llama_fp8.hf.mapping import expected_hf_shapes
from lightning_llama_fp8.plan import plan_training

__all__ = [
    "INFO_FILENAME",
    "LIGHTNING_FILENAME",
    "ShardedSafetensorsWriter",
    "corpus_binding",
    "expected_hf_shapes",
    "loss_mask_path",
    "plan_training",
    "save_megatron_state",
]
