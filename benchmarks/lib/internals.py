"""The names of ``lightning_llama_fp8`` the benchmarks need that its public API does not export.

Imported from here only, so that a module moved inside the package is fixed in this one file.
"""

from lightning_llama_fp8.checkpoint.info import INFO_FILENAME, LIGHTNING_FILENAME
from lightning_llama_fp8.checkpoint.state_io import save_megatron_state
from lightning_llama_fp8.hf.files import ShardedSafetensorsWriter
from lightning_llama_fp8.hf.mapping import expected_hf_shapes
from lightning_llama_fp8.plan import plan_training

__all__ = [
    "INFO_FILENAME",
    "LIGHTNING_FILENAME",
    "ShardedSafetensorsWriter",
    "expected_hf_shapes",
    "plan_training",
    "save_megatron_state",
]
