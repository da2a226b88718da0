"""The corpus files (data/corpus.py): the token dtypes and their codes in Megatron's index, the content fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron.core.datasets.indexed_dataset import DType

from lightning_llama_fp8.data import corpus
from tests.helpers.corpora import megatron_corpus


def test_dtype_codes_match_megatron() -> None:
    for dtype, code in corpus.DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    for vocab in (1000, 65499, 65500, 128257):
        assert corpus.token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_fingerprint_follows_the_contents_not_the_path_or_file_times(tmp_path: Path) -> None:
    megatron_corpus(tmp_path / "a", [[1, 2, 3], [4, 5]])
    for ext in (".bin", ".idx"):
        shutil.copyfile(tmp_path / f"a{ext}", tmp_path / f"copy{ext}")
    assert corpus.corpus_fingerprint(tmp_path / "a") == corpus.corpus_fingerprint(tmp_path / "copy")
    megatron_corpus(tmp_path / "copy", [[1, 2, 3], [4, 6]])  # the same sizes and index, one token changed
    assert corpus.corpus_fingerprint(tmp_path / "a") != corpus.corpus_fingerprint(tmp_path / "copy")
