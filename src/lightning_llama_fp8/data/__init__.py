"""Data modules for Llama 3 pretraining and fine-tuning on megatron-core datasets, and the corpus tools behind them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llama_fp8._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_llama_fp8.data.base import GPTDataModule, ResumableDataLoader, ShardSampler, check_split_sizes
    from lightning_llama_fp8.data.corpus import CorpusInputError, read_sidecar
    from lightning_llama_fp8.data.indexed import IndexedDataModule, check_corpus, check_token_ids, parse_data_path
    from lightning_llama_fp8.data.mock import MockDataModule
    from lightning_llama_fp8.data.preprocess import PreprocessSummary
    from lightning_llama_fp8.data.sft import SFTDataModule, check_chat_corpus
    from lightning_llama_fp8.data.tokenizer import TokenizerSpec, resolve_tokenizer

__all__ = [
    "CorpusInputError",
    "GPTDataModule",
    "IndexedDataModule",
    "MockDataModule",
    "PreprocessSummary",
    "ResumableDataLoader",
    "SFTDataModule",
    "ShardSampler",
    "TokenizerSpec",
    "check_chat_corpus",
    "check_corpus",
    "check_split_sizes",
    "check_token_ids",
    "parse_data_path",
    "read_sidecar",
    "resolve_tokenizer",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CorpusInputError": "lightning_llama_fp8.data.corpus",
        "GPTDataModule": "lightning_llama_fp8.data.base",
        "IndexedDataModule": "lightning_llama_fp8.data.indexed",
        "MockDataModule": "lightning_llama_fp8.data.mock",
        "PreprocessSummary": "lightning_llama_fp8.data.preprocess",
        "ResumableDataLoader": "lightning_llama_fp8.data.base",
        "SFTDataModule": "lightning_llama_fp8.data.sft",
        "ShardSampler": "lightning_llama_fp8.data.base",
        "TokenizerSpec": "lightning_llama_fp8.data.tokenizer",
        "check_chat_corpus": "lightning_llama_fp8.data.sft",
        "check_corpus": "lightning_llama_fp8.data.indexed",
        "check_split_sizes": "lightning_llama_fp8.data.base",
        "check_token_ids": "lightning_llama_fp8.data.indexed",
        "parse_data_path": "lightning_llama_fp8.data.indexed",
        "read_sidecar": "lightning_llama_fp8.data.corpus",
        "resolve_tokenizer": "lightning_llama_fp8.data.tokenizer",
    },
)
