"""Data modules for Llama 3 pretraining on megatron-core datasets."""

from lightning_llama_fp8.data.base import GPTDataModule, ResumableDataLoader, ShardSampler, check_split_sizes
from lightning_llama_fp8.data.indexed import IndexedDataModule, check_corpus, parse_data_path
from lightning_llama_fp8.data.mock import MockDataModule

__all__ = [
    "GPTDataModule",
    "IndexedDataModule",
    "MockDataModule",
    "ResumableDataLoader",
    "ShardSampler",
    "check_corpus",
    "check_split_sizes",
    "parse_data_path",
]
