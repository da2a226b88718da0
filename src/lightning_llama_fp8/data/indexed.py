"""Tokenized corpora in Megatron's indexed format behind a Lightning ``LightningDataModule``.

A corpus is a pair ``<prefix>.bin`` (token ids) + ``<prefix>.idx`` (where each document starts), what Megatron-LM's
``tools/preprocess_data.py`` writes. Several corpora blend with weights and split into train/validation/test by
documents exactly as Megatron-LM's ``--data-path`` / ``--split`` do (``GPTDataset`` through
``BlendedMegatronDatasetBuilder``), so a run sees the samples Megatron-LM would. Every corpus is checked before
anything is built (:func:`check_corpus`): both files there, a valid index, a ``.bin`` as long as the index says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.tokenizers import MegatronTokenizer
from torch.utils.data import Dataset

from lightning_llama_fp8.data.base import GPTDataModule, check_split_sizes

__all__ = ["CorpusInfo", "IndexedDataModule", "check_corpus", "parse_data_path"]

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # the first bytes of every Megatron .idx file


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`check_corpus` found in one ``<prefix>.bin`` / ``<prefix>.idx`` pair."""

    prefix: str
    documents: int
    tokens: int
    dtype: str


def parse_data_path(data_path: str | list[str | float]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path``: prefixes, or ``weight prefix weight prefix ...`` (a string or a list)."""
    words = data_path.split() if isinstance(data_path, str) else [str(word) for word in data_path]
    if not words:
        raise ValueError("data.data_path is empty: give one or more corpus prefixes (<prefix>.bin + <prefix>.idx).")
    if len(words) % 2 == 0:
        try:
            [float(word) for word in words[0::2]]
        except ValueError:
            # An even number of plain prefixes: not a weighted list.
            return words, None
    blend = get_blend_from_list(words)
    assert blend is not None
    prefixes, weights = blend
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(
            f"data.data_path weights must be positive, got {weights}; leave a corpus out instead of weighting it 0."
        )
    return list(prefixes), (list(weights) if weights is not None else None)


def check_corpus(prefix: str) -> CorpusInfo:
    """Check one corpus without reading its tokens: files present, a Megatron index, a ``.bin`` long enough.

    Raises:
        FileNotFoundError: a file is missing (the message says which, and how such files are made).
        ValueError: the index is not a Megatron index, or the ``.bin`` is shorter than the index says.
    """
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [path for path in (bin_path, idx_path) if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"Corpus {prefix!r}: {' and '.join(missing)} not found. A corpus is <prefix>.bin + <prefix>.idx as "
            "Megatron-LM's tools/preprocess_data.py writes them; data.data_path takes the prefix (no extension)."
        )
    with open(idx_path, "rb") as fh:
        header = fh.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:
        raise ValueError(
            f"Corpus {prefix!r}: {idx_path} is not a Megatron index file (it starts with {header!r}, expected "
            f"{_INDEX_HEADER!r}). Re-create it with tools/preprocess_data.py."
        )
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = dataset.index.sequence_lengths
        pointers = dataset.index.sequence_pointers
        itemsize = numpy.dtype(dataset.index.dtype).itemsize
        documents = len(dataset.document_indices) - 1
    except Exception as err:  # a truncated or garbled index fails inside numpy/struct in many ways
        raise ValueError(f"Corpus {prefix!r}: {idx_path} cannot be read ({type(err).__name__}: {err}).") from err
    needed = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    size = Path(bin_path).stat().st_size
    if size < needed:
        raise ValueError(
            f"Corpus {prefix!r}: {bin_path} has {size} bytes but its index needs {needed} (truncated copy?). "
            "Copy or re-create the corpus."
        )
    tokens = int(lengths.sum())
    if tokens == 0:  # megatron-core's GPTDataset would loop forever looking for tokens
        raise ValueError(f"Corpus {prefix!r} holds no tokens ({documents} empty documents); re-create it.")
    return CorpusInfo(prefix, documents, tokens, numpy.dtype(dataset.index.dtype).name)


class IndexedDataModule(GPTDataModule):
    """Llama 3 pretraining on tokenized corpora (Megatron's ``.bin``/``.idx``), blended and split as Megatron-LM does.

    Args:
        data_path: Megatron-LM's ``--data-path``: one or more corpus prefixes, or ``weight prefix weight prefix``
            (a list, or one string with spaces). Weights need not sum to 1.
        path_to_cache: Megatron-LM's ``--data-cache-path``: where the sample indices are cached, so later runs
            start at once; global rank 0 builds them, the other ranks wait and read them. ``None``: build in memory
            on every rank.
        split: Megatron split string (train,validation,test weights of each corpus's documents).

    The other arguments (``seq_length``, ``vocab_size``, batch sizes, sample counts, ``seed``, ``num_workers``) and
    the batch layout are :class:`~lightning_llama_fp8.data.base.GPTDataModule`'s. Documents are concatenated as
    Megatron-LM does (``reset_position_ids``, ``reset_attention_mask`` and ``eod_mask_loss`` off, as in the
    reference recipe), so the end-of-document token needs no configuration.
    """

    def __init__(
        self,
        data_path: list[str | float] | str,
        path_to_cache: str | None = None,
        split: str = "969,30,1",
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`~lightning_llama_fp8.data.base.GPTDataModule`'s arguments (LightningCLI lists them)."""
        super().__init__(split=split, **kwargs)
        self.save_hyperparameters()
        self.data_path = data_path
        if path_to_cache is not None and Path(path_to_cache).exists() and not Path(path_to_cache).is_dir():
            raise ValueError(f"data.path_to_cache {path_to_cache} is a file; give a directory (created if missing).")
        self.path_to_cache = path_to_cache
        self.prefixes, self.weights = parse_data_path(data_path)

    def check_files(self) -> list[CorpusInfo]:
        """:func:`check_corpus` for every corpus of ``data_path`` (cheap: no token is read)."""
        return [check_corpus(prefix) for prefix in self.prefixes]

    def build_datasets(self, sizes: list[int]) -> tuple[Dataset, Dataset, GPTDatasetConfig, str]:
        """Check every corpus and split, then build Megatron's (blended) ``GPTDataset`` splits."""
        corpora = self.check_files()
        config = GPTDatasetConfig(
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=(self.prefixes, self.weights),
            split=self.split,
            path_to_cache=self.path_to_cache,
            tokenizer=MegatronTokenizer.from_pretrained(
                metadata_path={"library": "null-text"}, vocab_size=self.vocab_size
            ),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        # Megatron splits each corpus by its documents; a split with no document would hang its builder.
        wanted = [1 if n > 0 else 0 for n in sizes]
        for corpus in corpora:
            try:
                check_split_sizes(corpus.documents, config.split, wanted)
            except ValueError as err:
                raise ValueError(f"Corpus {corpus.prefix!r} ({corpus.documents} documents): {err}") from err
        train_ds, val_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        weights = self.weights or [1.0] * len(self.prefixes)
        total = sum(weights)
        blend = ", ".join(
            f"{c.prefix} ({w / total:.0%}, {c.documents} docs, {c.tokens:,} tokens)"
            for c, w in zip(corpora, weights, strict=True)
        )
        return train_ds, val_ds, config, f"corpora {blend}, split {self.split!r}, seed {self.seed}"
