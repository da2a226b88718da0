"""The corpus files (data/corpus.py): the token dtypes and their codes in Megatron's index."""

from __future__ import annotations

from megatron.core.datasets.indexed_dataset import DType

from lightning_llama_fp8.data import corpus


def test_dtype_codes_match_megatron() -> None:
    for dtype, code in corpus.DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    for vocab in (1000, 65499, 65500, 128257):
        assert corpus.token_dtype(vocab) == DType.optimal_dtype(vocab)
