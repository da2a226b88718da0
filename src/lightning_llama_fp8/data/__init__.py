"""Data modules for Llama 3 pretraining on megatron-core datasets."""

from lightning_llama_fp8.data.base import GPTDataModule, ResumableDataLoader, ShardSampler, check_split_sizes
from lightning_llama_fp8.data.indexed import IndexedDataModule, check_corpus, check_token_ids, parse_data_path
from lightning_llama_fp8.data.mock import MockDataModule

# The function preprocess() stays in its module: exported here, it would shadow the module of the same name.
from lightning_llama_fp8.data.preprocess import CorpusInputError, PreprocessSummary, read_sidecar
from lightning_llama_fp8.data.tokenizer import TokenizerSpec, resolve_tokenizer

__all__ = [
    "CorpusInputError",
    "GPTDataModule",
    "IndexedDataModule",
    "MockDataModule",
    "PreprocessSummary",
    "ResumableDataLoader",
    "ShardSampler",
    "TokenizerSpec",
    "check_corpus",
    "check_split_sizes",
    "check_token_ids",
    "parse_data_path",
    "read_sidecar",
    "resolve_tokenizer",
]
