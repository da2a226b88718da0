"""Data modules for Llama 3 pretraining on megatron-core datasets."""

from lightning_llama_fp8.data.mock import MockDataModule, check_split_sizes

__all__ = ["MockDataModule", "check_split_sizes"]
