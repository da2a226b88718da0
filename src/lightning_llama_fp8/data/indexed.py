"""Tokenized corpora in Megatron's indexed format behind a Lightning ``LightningDataModule``.

A corpus is a pair ``<prefix>.bin`` (token ids) + ``<prefix>.idx`` (where each document starts), what Megatron-LM's
``tools/preprocess_data.py`` writes. Several corpora blend with weights and split into train/validation/test by
sequences (one per document, or per sentence of a ``--split-sentences`` corpus; an empty document has none) exactly
as Megatron-LM's ``--data-path`` / ``--split`` do (``GPTDataset`` through ``BlendedMegatronDatasetBuilder``), so a
run sees the samples Megatron-LM would. Every corpus is checked before
anything is built (:func:`check_corpus`): both files there, a valid index, a ``.bin`` as long as the index says,
and every token id inside the model's vocabulary (:func:`check_token_ids`: from the ``<prefix>.corpus.json`` that
``llama-fp8 preprocess`` writes while its binding matches the files, else by reading the ``.bin``). A token id
past the vocabulary (or a negative one) would fail at the first step with TP1 and, with TP > 1, train on silent
all-zero embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import Dataset

from lightning_llama_fp8.data.base import GPTDataModule, check_split_sizes
from lightning_llama_fp8.data.corpus import (
    TEXT_KIND,
    check_sidecar,
    corpus_fingerprint,
    require_corpus_kind,
    sidecar_path,
)
from lightning_llama_fp8.data.tokenizer import resolve_tokenizer

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

__all__ = ["CorpusInfo", "IndexedDataModule", "check_corpus", "check_token_ids", "parse_data_path"]

#: Corpora without a sidecar are scanned for their largest token id up to this size (GiB) by default.
DEFAULT_TOKEN_SCAN_LIMIT_GIB = 16.0
_SCAN_CHUNK = 1 << 24  # tokens per numpy max() while scanning
_SCAN_PROGRESS_AFTER_S = 2.0  # a scan that takes longer shows a progress bar (rank zero)

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # the first bytes of every Megatron .idx file


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`check_corpus` found in one ``<prefix>.bin`` / ``<prefix>.idx`` pair."""

    prefix: str
    documents: int
    tokens: int
    dtype: str
    #: the largest token id (None: not known; see ``max_token_id_from``)
    max_token_id: int | None = None
    #: "sidecar" (<prefix>.corpus.json, bound to the files), "scan" (read from the .bin) or "unchecked" (too large
    #: to scan, no sidecar)
    max_token_id_from: Literal["sidecar", "scan", "unchecked"] = "unchecked"
    #: the smallest token id (scans only; llama-fp8 preprocess writes tokenizer ids, never negative)
    min_token_id: int | None = None
    #: SHA-256 of the tokenizer.json it was made with (None: no trusted sidecar)
    tokenizer_sha256: str | None = None
    tokenizer_name: str | None = None
    #: whether special-token strings in the text were read as those tokens (None: no trusted sidecar)
    parse_special_tokens: bool | None = None


def parse_data_path(data_path: str | list[str | float]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path``: prefixes, or ``weight prefix weight prefix ...`` (a string or a list)."""
    from megatron.core.datasets.utils import get_blend_from_list

    if not isinstance(data_path, (str, list, tuple)):
        raise ValueError(f"data.data_path must be a list or a string of corpus prefixes, got {data_path!r}.")
    words = data_path.split() if isinstance(data_path, str) else [str(word) for word in data_path]
    if not words or any(not word.strip() for word in words):
        raise ValueError(
            f"data.data_path is empty or has an empty entry ({data_path!r}): give one or more corpus prefixes "
            "(<prefix>.bin + <prefix>.idx), or `weight prefix` pairs."
        )
    numbers = [_number(word) is not None for word in words]
    if not any(numbers):
        return words, None  # plain prefixes
    if len(words) % 2 or numbers[0::2] != [True] * (len(words) // 2) or any(numbers[1::2]):
        raise ValueError(
            f"data.data_path {data_path!r} mixes weights and prefixes: give `weight prefix weight prefix ...` (a "
            "number before every prefix) or prefixes only."
        )
    blend = get_blend_from_list(words)
    assert blend is not None
    prefixes, weights = blend
    if weights is not None and not all(numpy.isfinite(w) and w > 0 for w in weights):
        raise ValueError(
            f"data.data_path weights must be positive and finite, got {weights}; leave a corpus out instead of "
            "weighting it 0."
        )
    return list(prefixes), (list(weights) if weights is not None else None)


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def check_corpus(prefix: str) -> CorpusInfo:
    """Check one corpus without reading its tokens: files present, a Megatron index, a ``.bin`` long enough.

    Raises:
        FileNotFoundError: a file is missing (the message says which, and how such files are made).
        ValueError: the index is not a Megatron index, or the ``.bin`` is shorter than the index says.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

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


_scanned: dict[tuple[str, int, int], tuple[int, int]] = {}  # (bin path, size, mtime_ns) -> (min, max), per process


def _scan_token_range(prefix: str, dtype: str) -> tuple[int, int]:
    """The smallest and largest token id in ``<prefix>.bin``, read in chunks (memory-mapped; cached per file
    version). A scan that takes more than a few seconds shows a progress bar on rank zero."""
    from megatron.core.datasets.indexed_dataset import get_bin_path
    from tqdm import tqdm

    path = get_bin_path(prefix)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _scanned:
        tokens = numpy.memmap(path, dtype=numpy.dtype(dtype), mode="r")
        smallest, largest = int(tokens[0]), -1
        with tqdm(
            total=stat.st_size,
            unit="B",
            unit_scale=True,
            desc=f"token ids of {os.path.basename(prefix)}",
            delay=_SCAN_PROGRESS_AFTER_S,
            disable=rank_zero_only.rank != 0,
            file=sys.stderr,
        ) as bar:
            for start in range(0, len(tokens), _SCAN_CHUNK):
                chunk = tokens[start : start + _SCAN_CHUNK]
                largest = max(largest, int(chunk.max()))
                smallest = min(smallest, int(chunk.min()))  # a negative id (int32 .bin) is as bad as a large one
                bar.update(chunk.nbytes)
        del tokens
        _scanned[key] = (smallest, largest)
    return _scanned[key]


def check_token_ids(
    info: CorpusInfo,
    vocab_size: int,
    tokenizer_sha256: str | None = None,
    scan_limit_gib: float | None = DEFAULT_TOKEN_SCAN_LIMIT_GIB,
) -> CorpusInfo:
    """Refuse a corpus with a token id outside ``[0, vocab_size)`` or made with another tokenizer than
    ``tokenizer_sha256``.

    The largest id comes from the corpus's sidecar (written by ``llama-fp8 preprocess``), trusted only while its
    binding matches the files (:func:`~lightning_llama_fp8.data.corpus.check_sidecar`: the whole ``.idx``, a
    sample of the ``.bin`` and the sidecar's own claims). Otherwise the ``.bin`` is scanned if it is at most
    ``scan_limit_gib`` (``None``: any size). Past the limit, a corpus without a sidecar (e.g. from Megatron-LM's
    preprocess_data.py) is left unchecked (``max_token_id_from``); one whose sidecar does not match is refused, since
    something replaced its files or edited the sidecar.

    Returns:
        ``info`` with ``max_token_id``, ``max_token_id_from`` and the sidecar's tokenizer filled in.

    Raises:
        ValueError: a token id outside the vocabulary, a tokenizer mismatch (the message names both sides), or a
            sidecar that does not match a corpus too large to scan.
    """
    from megatron.core.datasets.indexed_dataset import get_bin_path

    found = check_sidecar(info.prefix)
    bin_bytes = Path(get_bin_path(info.prefix)).stat().st_size
    if found.sidecar is not None:
        sidecar = found.sidecar
        tokenizer = sidecar.get("tokenizer") or {}
        info = dataclasses.replace(
            info,
            max_token_id=int(sidecar["max_token_id"]),
            max_token_id_from="sidecar",
            tokenizer_sha256=tokenizer.get("sha256"),
            tokenizer_name=tokenizer.get("name"),
            parse_special_tokens=sidecar.get("parse_special_tokens"),
        )
    elif scan_limit_gib is None or bin_bytes <= scan_limit_gib * 2**30:
        if found.problem is not None:
            rank_zero_warn(
                f"Corpus {info.prefix!r}: ignoring its sidecar: {found.problem}. Its token ids are read from the "
                ".bin instead; re-create the corpus with llama-fp8 preprocess to have a sidecar again."
            )
        smallest, largest = _scan_token_range(info.prefix, info.dtype)
        info = dataclasses.replace(info, max_token_id=largest, min_token_id=smallest, max_token_id_from="scan")
    elif found.problem is not None:
        raise ValueError(
            f"Corpus {info.prefix!r}: {found.problem}, so its token ids are unknown, and its .bin "
            f"({bin_bytes / 2**30:.1f} GiB) is past data.token_scan_limit_gib ({scan_limit_gib} GiB). Re-create the "
            "corpus with llama-fp8 preprocess, set data.token_scan_limit_gib: null to read its ids (once per run), "
            f"or delete {sidecar_path(info.prefix)} to train with them unchecked."
        )
    if info.min_token_id is not None and info.min_token_id < 0:
        raise ValueError(
            f"Corpus {info.prefix!r} holds token id {info.min_token_id}: token ids cannot be negative, so its .bin is "
            "damaged or was not written by a tokenizer. Re-create it."
        )
    if info.max_token_id is not None and info.max_token_id >= vocab_size:
        made_with = f" (made with tokenizer {info.tokenizer_name!r})" if info.tokenizer_name else ""
        parsed = (
            " It was made with --parse-special-tokens: special-token strings in its text (e.g. <|image|>) became "
            "control tokens; re-create it without that option."
            if info.parse_special_tokens
            else ""
        )
        raise ValueError(
            f"Corpus {info.prefix!r}{made_with} holds token id {info.max_token_id}, but the vocabulary has "
            f"{vocab_size} ids (data.vocab_size, at most model.arch.vocab_size): it was tokenized for another "
            "vocabulary. Re-create it with the model's tokenizer (llama-fp8 preprocess --tokenizer ...), or train a "
            f"model whose vocab_size covers it.{parsed}"
        )
    if tokenizer_sha256 is not None and info.tokenizer_sha256 is not None and info.tokenizer_sha256 != tokenizer_sha256:
        raise ValueError(
            f"Corpus {info.prefix!r} was made with tokenizer {info.tokenizer_name!r} (sha256 "
            f"{info.tokenizer_sha256[:12]}...), not the one data.tokenizer names (sha256 {tokenizer_sha256[:12]}...). "
            "Re-create it with that tokenizer, or set data.tokenizer to the one it was made with."
        )
    return info


def _sequences_of(corpus: CorpusInfo, sequences: int) -> str:
    """``N sequences in M documents``, for a message about splitting (megatron-core splits the sequences)."""
    empty = " (an empty document has none)" if sequences < corpus.documents else ""
    return f"{sequences} sequences in {corpus.documents} documents{empty}; megatron-core splits by sequence"


class IndexedDataModule(GPTDataModule):
    """Llama 3 pretraining on tokenized corpora (Megatron's ``.bin``/``.idx``), blended and split as Megatron-LM does.

    Args:
        data_path: Megatron-LM's ``--data-path``: one or more corpus prefixes, or ``weight prefix weight prefix``
            (a list, or one string with spaces). Weights need not sum to 1.
        path_to_cache: Megatron-LM's ``--data-cache-path``: where the sample indices are cached, so later runs
            start at once; global rank 0 builds them, the other ranks wait and read them. ``None``: build in memory
            on every rank.
        split: Megatron split string (train,validation,test weights of each corpus's sequences: its documents, or
            their sentences in a ``--split-sentences`` corpus; empty documents have none).
        tokenizer: the tokenizer the corpora must have been made with (``"llama3"``, a ``tokenizer.json`` or a
            Hugging Face tokenizer directory), compared with each corpus's ``<prefix>.corpus.json``; corpora without
            that sidecar cannot be compared (a log line says so). ``None``: not compared.
        token_scan_limit_gib: a corpus without a sidecar is read once to find its largest token id if its ``.bin``
            is at most this size (``None``: always; ``0``: never, logged as unchecked).

    Every token id must be below ``vocab_size``: checked before anything is built.

    The other arguments (``seq_length``, ``vocab_size``, batch sizes, sample counts, ``seed``, ``num_workers``) and
    the batch layout are :class:`~lightning_llama_fp8.data.base.GPTDataModule`'s. Documents are concatenated as
    Megatron-LM does (``reset_position_ids``, ``reset_attention_mask`` and ``eod_mask_loss`` off, as in the
    reference recipe), so the end-of-document token needs no configuration. With ``document_masking`` each
    document of a sample attends only to itself (the corpus index says where documents start: no end-of-document
    token is looked for).
    """

    def __init__(
        self,
        data_path: list[str | float] | str,
        path_to_cache: str | None = None,
        split: str = "969,30,1",
        tokenizer: str | None = None,
        token_scan_limit_gib: float | None = DEFAULT_TOKEN_SCAN_LIMIT_GIB,
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
        if token_scan_limit_gib is not None and not token_scan_limit_gib >= 0:
            raise ValueError(f"data.token_scan_limit_gib must be >= 0 or null, got {token_scan_limit_gib}.")
        self.tokenizer = tokenizer
        self.token_scan_limit_gib = token_scan_limit_gib

    def check_files(self) -> list[CorpusInfo]:
        """:func:`check_corpus` and :func:`check_token_ids` for every corpus of ``data_path``.

        Raises:
            FileNotFoundError, ValueError: as those two do, naming the corpus and the fix.
        """
        expected = resolve_tokenizer(self.tokenizer).sha256 if self.tokenizer is not None else None
        corpora = [
            check_token_ids(check_corpus(prefix), self.vocab_size, expected, self.token_scan_limit_gib)
            for prefix in self.prefixes
        ]
        for corpus in corpora:  # a chat corpus here would train on its prompts too: SFTDataModule's
            require_corpus_kind(corpus.prefix, TEXT_KIND)
        unchecked = [c.prefix for c in corpora if c.max_token_id_from == "unchecked"]
        if unchecked:
            rank_zero_warn(
                f"Token ids of {', '.join(unchecked)} are unchecked against vocab_size {self.vocab_size}: no "
                f"<prefix>.corpus.json and larger than data.token_scan_limit_gib ({self.token_scan_limit_gib} GiB). "
                "Raise the limit (null: always read) or re-create the corpus with llama-fp8 preprocess."
            )
        if expected is not None and any(c.tokenizer_sha256 is None for c in corpora):
            rank_zero_info(
                "data.tokenizer cannot be compared for corpora without a <prefix>.corpus.json: "
                + ", ".join(c.prefix for c in corpora if c.tokenizer_sha256 is None)
            )
        return corpora

    def _cache_directory(self) -> str | None:
        """``path_to_cache`` plus a folder named by the corpora's contents.

        megatron-core names its cached sample indices by the corpus path and the dataset settings only: a corpus
        re-created under the same prefix would reuse the old corpus's indices (an IndexError at the first batch, or
        samples cut at the wrong places). Keyed by the contents, a changed corpus gets indices of its own.
        """
        if self.path_to_cache is None:
            return None
        contents = hashlib.sha256("".join(corpus_fingerprint(prefix) for prefix in self.prefixes).encode())
        return os.path.join(self.path_to_cache, f"corpora-{contents.hexdigest()[:16]}")

    def build_datasets(self, sizes: list[int]) -> tuple[Dataset, Dataset, GPTDatasetConfig, str]:
        """Check every corpus and split, then build Megatron's (blended) ``GPTDataset`` splits."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.tokenizers import MegatronTokenizer

        corpora = self.check_files()
        config = GPTDatasetConfig(
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=(self.prefixes, self.weights),
            split=self.split,
            path_to_cache=self._cache_directory(),
            tokenizer=MegatronTokenizer.from_pretrained(
                metadata_path={"library": "null-text"}, vocab_size=self.vocab_size
            ),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            inter_document_masking=self.document_masking,
        )
        # Megatron splits each corpus by its sequences (GPTDataset.numel_low_level_dataset), not its documents: a
        # split whose sequences hold no token would hang its builder.
        for corpus in corpora:
            dataset = IndexedDataset(corpus.prefix, mmap=True)  # held: its lengths are a view of its memory map
            lengths = dataset.index.sequence_lengths
            try:
                check_split_sizes(len(lengths), config.split, sizes, lengths)
            except ValueError as err:
                raise ValueError(f"Corpus {corpus.prefix!r} ({_sequences_of(corpus, len(lengths))}): {err}") from err
        train_ds, val_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        weights = self.weights or [1.0] * len(self.prefixes)
        total = sum(weights)
        blend = ", ".join(
            f"{c.prefix} ({w / total:.0%}, {c.documents} docs, {c.tokens:,} tokens)"
            for c, w in zip(corpora, weights, strict=True)
        )
        return train_ds, val_ds, config, f"corpora {blend}, split {self.split!r}, seed {self.seed}"
