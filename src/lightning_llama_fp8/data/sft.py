"""Supervised fine-tuning on chat corpora: short conversations packed into samples, the loss on the answers only.

A chat corpus is what ``llama-fp8 preprocess --chat`` writes from conversations (``data/corpus.py``):

- ``<prefix>.bin`` / ``<prefix>.idx``: Megatron's indexed format, one document (of one sequence) per conversation;
- ``<prefix>.loss_mask.bin``: one byte per token of the ``.bin``, element for element: 1 marks a token the model learns
  to predict (the assistant's content and the end-of-turn token closing each assistant turn), 0 the rest;
- ``<prefix>.corpus.json``: the sidecar, with ``"kind": "chat"``, bound to the three files: a corpus without one that
  matches them is refused (whether a mask says what the model should learn is what the sidecar vouches for).

:class:`SFTDataModule` splits the conversations into training and validation (seeded, by conversation), packs each
split's conversations into samples of ``seq_length`` tokens (:func:`first_fit_packing`: no conversation is cut, and a
sample ends with padding where nothing else fits), and serves them in the batch layout of every data module here
(:class:`~lightning_llama_fp8.data.base.GPTDataModule`: data-parallel shards, micro batches, resumable position). In a
packed sample every conversation attends only to itself and its positions restart at 0 (document masking,
``data/packing.py``: always on, since packing without it would let conversations see each other); the padding is a
segment of its own. A conversation of ``n`` tokens fills ``n - 1`` positions: its tokens but the last as inputs, its
tokens but the first as labels, so no label crosses into the next conversation. The loss mask of a position is the
conversation's mask of its *label* (the token predicted there), so the loss, in training and validation, is over the
answer tokens only (the model's per-token loss, ``model.masked_token_loss``).

Training reads the packed samples epoch after epoch, in a new seeded order each epoch, until it has ``train_samples``
of them; a run's sample stream depends on the corpora, ``seq_length``, ``split`` and ``seed`` only, so a resumed run
(also one with a larger ``max_steps``) continues it, and a resume with other packed data is refused.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from lightning_llama_fp8._compat import lightning as compat
from lightning_llama_fp8.data.base import CU_SEQLENS_KEY, GPTDataModule, parse_split
from lightning_llama_fp8.data.corpus import CHAT_KIND, corpus_fingerprint, loss_mask_path, require_corpus_kind
from lightning_llama_fp8.data.indexed import CorpusInfo, check_corpus, check_token_ids, parse_data_path
from lightning_llama_fp8.data.tokenizer import resolve_tokenizer

__all__ = [
    "ChatCorpusInfo",
    "PackedSplit",
    "SFTDataModule",
    "check_chat_corpus",
    "first_fit_packing",
]

#: The token id of the padding after a sample's last conversation: a segment of its own with loss mask 0, so its
#: value never reaches a loss or another token; 0 is inside every vocabulary.
PAD_TOKEN_ID = 0
_MASK_CHUNK = 1 << 22  # mask bytes per numpy pass while counting each conversation's answer tokens
#: Random streams of one seed (numpy's legacy RandomState: its streams never change between numpy versions, so a
#: resumed run draws what the interrupted one drew).
_SPLIT_STREAM, _EPOCH_STREAM = 0, 1


@dataclass(frozen=True, eq=False)  # numpy arrays: no field-wise ==
class ChatCorpusInfo:
    """One chat corpus as :func:`check_chat_corpus` found it."""

    #: files, index and token ids (``data/indexed.py``)
    corpus: CorpusInfo
    #: token count of each conversation
    lengths: numpy.ndarray
    #: of each conversation, the tokens to learn among its labels (its tokens but the first)
    answer_tokens: numpy.ndarray

    @property
    def prefix(self) -> str:
        return self.corpus.prefix


def check_chat_corpus(prefix: str, vocab_size: int, tokenizer_sha256: str | None = None) -> ChatCorpusInfo:
    """Check a chat corpus and count the answer tokens of each conversation, reading only its index and mask.

    Refused: a corpus whose trusted sidecar does not say it is a chat corpus
    (:func:`~lightning_llama_fp8.data.corpus.require_corpus_kind`: a text corpus, or a sidecar missing or not matching
    the files, the loss mask included), a loss mask whose size is not the ``.bin``'s token count or that holds values
    other than 0 and 1, a document of several sequences, and whatever
    :func:`~lightning_llama_fp8.data.indexed.check_corpus` and :func:`~lightning_llama_fp8.data.indexed.check_token_ids`
    refuse.

    Raises:
        FileNotFoundError, ValueError: naming the corpus, what is wrong and how to fix it.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

    info = check_corpus(prefix)
    require_corpus_kind(prefix, CHAT_KIND)
    mask_file = loss_mask_path(prefix)
    remake = "Re-create the corpus with llama-fp8 preprocess --chat."
    if not mask_file.is_file():
        raise FileNotFoundError(f"Corpus {prefix!r}: its loss mask {mask_file} is missing. {remake}")
    dataset = IndexedDataset(prefix, mmap=True)
    index = dataset.index
    if not numpy.array_equal(index.document_indices, numpy.arange(len(index.document_indices))):
        raise ValueError(
            f"Corpus {prefix!r} has documents of several sequences; a chat corpus holds one sequence per conversation. "
            + remake
        )
    itemsize = numpy.dtype(index.dtype).itemsize
    bin_tokens = Path(get_bin_path(prefix)).stat().st_size // itemsize
    mask_bytes = mask_file.stat().st_size
    if mask_bytes != bin_tokens:
        raise ValueError(
            f"Corpus {prefix!r}: its loss mask {mask_file} has {mask_bytes:,} bytes but the .bin holds {bin_tokens:,} "
            f"tokens (one mask byte per token): the files are from different corpora or truncated. {remake}"
        )
    info = check_token_ids(info, vocab_size, tokenizer_sha256)  # the trusted sidecar's largest id: no scan
    lengths = numpy.asarray(index.sequence_lengths, dtype=numpy.int64)
    starts = numpy.asarray(index.sequence_pointers, dtype=numpy.int64) // itemsize
    answer_tokens = _answer_tokens(mask_file, starts, lengths)
    return ChatCorpusInfo(info, lengths, answer_tokens)


def _answer_tokens(mask_file: Path, starts: numpy.ndarray, lengths: numpy.ndarray) -> numpy.ndarray:
    """Per conversation, the sum of its mask over its tokens but the first (its labels), in one pass over the mask.

    Raises:
        ValueError: the mask holds a value other than 0 and 1.
    """
    mask = numpy.memmap(mask_file, dtype=numpy.uint8, mode="r")  # check_corpus refused an empty corpus
    # prefix[p] = sum(mask[:p]), wanted only where a conversation's labels start and end.
    positions = numpy.concatenate([starts + numpy.minimum(lengths, 1), starts + lengths])
    order = numpy.argsort(positions, kind="stable")
    sorted_positions = positions[order]
    prefix = numpy.zeros(len(positions), dtype=numpy.int64)
    carry = 0
    for begin in range(0, len(mask), _MASK_CHUNK):
        chunk = numpy.asarray(mask[begin : begin + _MASK_CHUNK])
        if int(chunk.max()) > 1:
            bad = begin + int(numpy.flatnonzero(chunk > 1)[0])
            raise ValueError(
                f"Loss mask {mask_file} holds {int(mask[bad])} at token {bad:,}: a loss mask holds 0 (context) and 1 "
                "(a token to learn) only. Re-create the corpus with llama-fp8 preprocess --chat."
            )
        sums = numpy.concatenate([[0], numpy.cumsum(chunk, dtype=numpy.int64)])
        # positions in [begin, begin + len(chunk)] (one at the end is counted again by the next chunk, equally)
        low = numpy.searchsorted(sorted_positions, begin, side="left")
        high = numpy.searchsorted(sorted_positions, begin + len(chunk), side="right")
        prefix[order[low:high]] = carry + sums[sorted_positions[low:high] - begin]
        carry += int(sums[-1])
    del mask
    half = len(starts)
    return prefix[half:] - prefix[:half]


def first_fit_packing(sizes: numpy.ndarray, capacity: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Pack items of ``sizes`` (each at most ``capacity``) into bins of ``capacity``: every item, in the given order,
    into the first bin with room for it (first fit), a new bin when none has.

    Returns ``(items, offsets)``: bin ``b`` holds the items ``items[offsets[b]:offsets[b + 1]]`` (indices into
    ``sizes``, in the order they were placed); bins are numbered in the order they were opened.

    First fit over a shuffled order mixes conversations of all lengths in a sample (first fit *decreasing* would
    gather the long ones in the first samples and the short ones in the last), and fills well: no two of its bins
    could have been one (so at most one is half empty or less), and a million conversations of lognormal lengths
    (mean ~600 tokens) filled 4096-token samples to 99.7%. A segment tree over the bins' free room finds the first
    bin that fits in O(log bins): those million conversations packed in 1.6 to 2.0 s on one CPU core.
    """
    sizes = numpy.asarray(sizes, dtype=numpy.int64)
    count = len(sizes)
    if count == 0:
        return numpy.zeros(0, dtype=numpy.int64), numpy.zeros(1, dtype=numpy.int64)
    if int(sizes.min()) < 1 or int(sizes.max()) > capacity:
        raise ValueError(f"first_fit_packing: every size must be in [1, {capacity}]; got {sizes.min()}..{sizes.max()}.")
    # First fit never leaves two bins that together hold at most one capacity, so it opens at most 2 * total / capacity
    # + 1 bins. Bins not yet opened count as empty: the first fitting bin is an open one or the next new one.
    bound = min(count, 2 * -(-int(sizes.sum()) // capacity) + 1)
    leaves = 1 << max(bound - 1, 0).bit_length()
    room = [capacity] * (2 * leaves)  # room[1] is the most free room of any bin; node k's children are 2k and 2k + 1
    bins = numpy.empty(count, dtype=numpy.int64)
    for item, size in enumerate(sizes.tolist()):
        node = 1
        while node < leaves:
            node *= 2
            if room[node] < size:
                node += 1
        bins[item] = node - leaves
        room[node] -= size
        node //= 2
        while node:
            left, right = room[2 * node], room[2 * node + 1]
            most = left if left > right else right
            if room[node] == most:
                break  # nothing above changes either
            room[node] = most
            node //= 2
    items = numpy.argsort(bins, kind="stable")
    offsets = numpy.zeros(int(bins.max()) + 2, dtype=numpy.int64)
    numpy.cumsum(numpy.bincount(bins), out=offsets[1:])
    return items, offsets


@dataclass(frozen=True, eq=False)  # numpy arrays: no field-wise ==
class PackedSplit:
    """One split's conversations packed into samples of ``seq_length`` positions."""

    #: conversation ids (into all corpora, in order), sample after sample
    conversations: numpy.ndarray
    #: sample ``i`` holds ``conversations[offsets[i]:offsets[i + 1]]``
    offsets: numpy.ndarray
    seq_length: int
    #: positions the conversations fill (a conversation of n tokens fills n - 1)
    positions: int
    #: labels the loss is computed on (answer tokens)
    answer_tokens: int

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def fill_ratio(self) -> float:
        """Positions holding conversations / all positions of the packed samples (the rest is padding)."""
        return self.positions / (self.samples * self.seq_length) if self.samples else 0.0

    def describe(self, name: str) -> str:
        return (
            f"{name}: {len(self.conversations):,} conversations in {self.samples:,} samples, fill ratio "
            f"{self.fill_ratio:.1%}, {self.answer_tokens:,} answer tokens"
        )


class _ChatCorpora:
    """Reads conversations (tokens and loss mask) from the corpora, by conversation id over all of them in order.

    Files are opened on first use in each process, so the object pickles small (DataLoader workers)."""

    def __init__(self, prefixes: Sequence[str], counts: Sequence[int]) -> None:
        self.prefixes = list(prefixes)
        self.first_ids = numpy.concatenate([[0], numpy.cumsum(counts)]).astype(numpy.int64)
        self._files: list[tuple[Any, numpy.ndarray, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}

    def _open(self) -> list[tuple[Any, numpy.ndarray, int]]:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if self._files is None:
            files = []
            for prefix in self.prefixes:
                dataset = IndexedDataset(prefix, mmap=True)
                mask = numpy.memmap(loss_mask_path(prefix), dtype=numpy.uint8, mode="r")
                files.append((dataset, mask, numpy.dtype(dataset.index.dtype).itemsize))
            self._files = files
        return self._files

    def conversation(self, conversation_id: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The token ids and the loss mask of one conversation."""
        corpus = int(numpy.searchsorted(self.first_ids, conversation_id, side="right")) - 1
        document = int(conversation_id - self.first_ids[corpus])
        dataset, mask, itemsize = self._open()[corpus]
        tokens = dataset.get(document)
        start = int(dataset.index.sequence_pointers[document]) // itemsize
        return tokens, mask[start : start + len(tokens)]


class PackedConversations(Dataset):
    """The samples of a :class:`PackedSplit`, as the model takes them, then ``padding_samples`` samples of padding only
    (loss mask 0: the validation split filled up to whole global batches; they add no token to any loss).

    A sample is ``tokens``, ``labels`` (the next token within the conversation), ``loss_mask`` (the mask of the label:
    1 on answer tokens, 0 on prompts and padding), ``position_ids`` (restarting at 0 per conversation and for the
    padding) and :data:`~lightning_llama_fp8.data.base.CU_SEQLENS_KEY` (where conversations and the padding start,
    then ``seq_length``), all ``seq_length`` long but the boundaries.
    """

    def __init__(self, corpora: _ChatCorpora, packed: PackedSplit, padding_samples: int = 0) -> None:
        self.corpora = corpora
        self.packed = packed
        self.padding_samples = padding_samples

    def __len__(self) -> int:
        return self.packed.samples + self.padding_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        seq_length = self.packed.seq_length
        tokens = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
        labels = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
        loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
        positions = numpy.empty(seq_length, dtype=numpy.int64)
        boundaries = [0]
        if index < self.packed.samples:
            begin, end = self.packed.offsets[index], self.packed.offsets[index + 1]
            for conversation in self.packed.conversations[begin:end].tolist():
                ids, mask = self.corpora.conversation(conversation)
                start, length = boundaries[-1], len(ids) - 1
                tokens[start : start + length] = ids[:-1]
                labels[start : start + length] = ids[1:]
                loss_mask[start : start + length] = mask[1:]
                positions[start : start + length] = numpy.arange(length)
                boundaries.append(start + length)
        if boundaries[-1] < seq_length:  # the padding: a segment of its own
            positions[boundaries[-1] :] = numpy.arange(seq_length - boundaries[-1])
            boundaries.append(seq_length)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(positions),
            CU_SEQLENS_KEY: torch.tensor(boundaries, dtype=torch.int32),
        }


class ShuffledEpochs(Dataset):
    """``length`` samples: the samples of ``dataset`` epoch after epoch, each epoch in its own order drawn from
    ``(seed, epoch)``; sample ``k`` is the same whatever ``length`` is (a longer run continues a shorter one)."""

    def __init__(self, dataset: Dataset, length: int, seed: int) -> None:
        self.dataset = dataset
        self.length = length
        self.seed = seed
        self._orders: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def epoch_order(self, epoch: int) -> numpy.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            random = numpy.random.RandomState([self.seed, _EPOCH_STREAM, epoch])
            self._orders[epoch] = random.permutation(len(self.dataset))  # type: ignore[arg-type]
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} of {self.length}")
        epoch, within = divmod(index, len(self.dataset))  # type: ignore[arg-type]
        return self.dataset[int(self.epoch_order(epoch)[within])]


@dataclass(frozen=True, eq=False)  # numpy arrays: no field-wise ==
class _Packing:
    """Both splits of the conversations of all corpora, packed."""

    corpora: list[ChatCorpusInfo]
    reader: _ChatCorpora
    train: PackedSplit
    validation: PackedSplit
    #: conversations left out: without a token to learn
    without_answers: int
    #: how long reading the corpora's indices and masks, and packing, took
    seconds: float
    #: what a resumed run must find unchanged (recorded in checkpoints)
    record: dict[str, Any]


class SFTDataModule(GPTDataModule):
    """Supervised fine-tuning (chat / instruction data) on chat corpora from ``llama-fp8 preprocess``.

    Conversations are split into training and validation by ``split`` (shuffled with ``seed`` first), packed into
    samples of ``seq_length`` tokens without cutting any, and attended conversation by conversation (document masking,
    always on); the loss, in training and validation, covers the answer tokens only. See the module docstring.

    Args:
        data_path: one or more chat corpus prefixes (``<prefix>.bin``, ``.idx``, ``.loss_mask.bin``,
            ``.corpus.json``), a list or one string with spaces; their conversations are pooled.
        split: train,validation,test weights of the conversations (``"98,2,0"``: 2% held out for validation;
            test conversations are left out). Validation covers its whole split by default (``val_samples: null``),
            filled up to whole global batches with padding samples that add nothing to the loss.
        tokenizer: the tokenizer the corpora must have been made with (``"llama3"``, a ``tokenizer.json`` or a
            Hugging Face directory), compared with each sidecar; ``None``: not compared.

    The other arguments (``seq_length``, ``vocab_size``, batch sizes, ``train_samples``, ``val_samples``, ``seed``,
    ``num_workers``) and the batch layout are :class:`~lightning_llama_fp8.data.base.GPTDataModule`'s;
    ``train_samples`` counts packed samples (``None``: ``trainer.max_steps * global_batch_size``), read epoch after
    epoch. A conversation longer than ``seq_length + 1`` tokens is refused (``llama-fp8 preprocess`` drops or cuts
    them at the length it is given). After :meth:`setup`, :attr:`train_packing` and :attr:`val_packing` describe the
    packing and :attr:`fill_ratio` is the training split's (also in the log).
    """

    document_masking_optional = False  # packing without it would let conversations see each other

    def __init__(
        self,
        data_path: list[str] | str,
        split: str = "98,2,0",
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`~lightning_llama_fp8.data.base.GPTDataModule`'s arguments (LightningCLI lists them)."""
        if kwargs.pop("document_masking", True) is not True:
            raise ValueError(
                "SFTDataModule always masks documents: its samples pack several conversations, and without the mask "
                "each would attend to the ones before it. Leave data.document_masking out (or true)."
            )
        super().__init__(split=split, document_masking=True, **kwargs)
        self.save_hyperparameters()
        prefixes, weights = parse_data_path(data_path)
        if weights is not None:
            raise ValueError(
                f"data.data_path {data_path!r} gives weights: SFTDataModule pools the conversations of its corpora "
                "(each is read whole, once an epoch). Give the prefixes only."
            )
        self.data_path = data_path
        self.prefixes = prefixes
        self.tokenizer = tokenizer
        #: the packed training and validation splits (after :meth:`setup`)
        self.train_packing: PackedSplit | None = None
        self.val_packing: PackedSplit | None = None
        self._packing: _Packing | None = None

    @property
    def fill_ratio(self) -> float | None:
        """The training samples' fill ratio: conversation tokens / (samples x seq_length); None before :meth:`setup`."""
        return None if self.train_packing is None else self.train_packing.fill_ratio

    def check_files(self) -> list[ChatCorpusInfo]:
        """:func:`check_chat_corpus` for every corpus of ``data_path`` (reads their indices and loss masks)."""
        expected = resolve_tokenizer(self.tokenizer).sha256 if self.tokenizer is not None else None
        return [check_chat_corpus(prefix, self.vocab_size, expected) for prefix in self.prefixes]

    # ------------------------------------------------------------------ packing

    def _packed(self) -> _Packing:
        """Check the corpora, split their conversations and pack both splits (once per data module)."""
        if self._packing is not None:
            return self._packing
        started = time.perf_counter()
        corpora = self.check_files()
        lengths = numpy.concatenate([c.lengths for c in corpora])
        answers = numpy.concatenate([c.answer_tokens for c in corpora])
        too_long = numpy.flatnonzero(lengths - 1 > self.seq_length)
        if len(too_long):
            longest = int(lengths.max())
            raise ValueError(
                f"{len(too_long):,} conversations of {', '.join(self.prefixes)} are longer than data.seq_length + 1 = "
                f"{self.seq_length + 1} tokens (the longest has {longest:,}); SFTDataModule never cuts a conversation. "
                f"Re-create the corpus with llama-fp8 preprocess --chat --max-seq-length {self.seq_length}, or set "
                f"data.seq_length (and model.arch.seq_length) to at least {longest - 1}."
            )
        kept = numpy.flatnonzero(answers > 0)
        if not len(kept):
            raise ValueError(
                f"No conversation of {', '.join(self.prefixes)} has an answer token (every loss mask is 0): there is "
                "nothing to learn. Re-create the corpus with llama-fp8 preprocess --chat from conversations with "
                "assistant turns."
            )
        train_ids, val_ids = self._split(kept)
        packed = {}
        for name, ids in (("train", train_ids), ("validation", val_ids)):
            items, offsets = first_fit_packing(lengths[ids] - 1, self.seq_length)
            conversations = ids[items]
            packed[name] = PackedSplit(
                conversations=conversations,
                offsets=offsets,
                seq_length=self.seq_length,
                positions=int((lengths[ids] - 1).sum()),
                answer_tokens=int(answers[ids].sum()),
            )
        reader = _ChatCorpora(self.prefixes, [len(c.lengths) for c in corpora])
        self._packing = _Packing(
            corpora=corpora,
            reader=reader,
            train=packed["train"],
            validation=packed["validation"],
            without_answers=len(lengths) - len(kept),
            seconds=time.perf_counter() - started,
            record=self._packing_record(corpora, packed["train"]),
        )
        self.train_packing, self.val_packing = packed["train"], packed["validation"]
        return self._packing

    def _split(self, conversations: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The training and validation conversations: ``conversations`` in a seeded order, cut by ``split``'s weights.

        Raises:
            ValueError: a split with positive weight that gets no conversation.
        """
        weights = parse_split(self.split) + [0.0] * 3
        total = sum(weights[:3])
        count = len(conversations)
        order = numpy.random.RandomState([self.seed, _SPLIT_STREAM]).permutation(count)
        train_end = round(weights[0] / total * count)
        val_end = round((weights[0] + weights[1]) / total * count)
        for name, weight, size in (("train", weights[0], train_end), ("validation", weights[1], val_end - train_end)):
            if weight > 0 and size == 0:
                raise ValueError(
                    f"Split {self.split!r} of {count:,} conversations gives the {name} split none. Give it a larger "
                    f"weight in data.split (or 0 to have none), or use more conversations."
                )
        return conversations[order[:train_end]], conversations[order[train_end:val_end]]

    def _packing_record(self, corpora: list[ChatCorpusInfo], train: PackedSplit) -> dict[str, Any]:
        """What a resumed run must find unchanged: the corpora's contents and the training split's packed samples."""
        digest = hashlib.sha256()
        for corpus in corpora:
            digest.update(corpus_fingerprint(corpus.prefix).encode())
        digest.update(train.conversations.astype("<i8").tobytes())
        digest.update(train.offsets.astype("<i8").tobytes())
        return {
            "seq_length": self.seq_length,
            "split": self.split,
            "train_conversations": len(train.conversations),
            "train_samples_per_epoch": train.samples,
            "digest": digest.hexdigest()[:32],
        }

    # ------------------------------------------------------------------ GPTDataModule hooks

    def setup(self, stage: str | None = None) -> None:
        """:meth:`GPTDataModule.setup`; then, for a new fit of a model with random weights, a warning: fine-tuning
        starts from a pretrained model's weights (``model.init_weights``)."""
        super().setup(stage)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        arguments = compat.checkpoint_arguments(self.trainer) if self.trainer is not None else None
        resuming = arguments is not None and arguments.resolved is not None
        if stage in (None, "fit") and getattr(module, "init_weights", "") is None and not resuming:
            rank_zero_warn(
                f"{type(self).__name__}: the model starts from random weights (model.init_weights is not set). "
                "Fine-tuning usually starts from a pretrained model: set model.init_weights to its Hugging Face "
                "directory."
            )

    def _check_document_masking(self) -> None:
        """:meth:`GPTDataModule._check_document_masking`, said as what packed fine-tuning cannot run with (its
        refusals offer no turning masking off: ``document_masking_optional``)."""
        try:
            super()._check_document_masking()
        except ValueError as err:
            raise ValueError(
                "SFTDataModule packs conversations, each attending only to itself (document masking), which cannot run "
                "with these settings: " + str(err)
            ) from None

    def _resolve_val_samples(self) -> int:
        """Validation samples: the whole validation split by default, filled up to whole global batches (none when
        ``trainer.limit_val_batches`` is 0)."""
        packed = self._packed().validation
        available = math.ceil(packed.samples / self.global_batch_size) * self.global_batch_size
        if self.val_samples is None:
            return 0 if self._validation_off() else available
        if self.val_samples < 0:
            raise ValueError(f"data.val_samples must be >= 0, got {self.val_samples}.")
        if self.val_samples > available:
            raise ValueError(
                f"data.val_samples ({self.val_samples}) is more than the validation split holds: {packed.samples} "
                f"packed samples ({available} filled up to whole global batches of {self.global_batch_size}). Leave "
                "data.val_samples unset to validate on the whole split, or give validation a larger share of "
                "data.split."
            )
        return self.val_samples

    def build_datasets(self, sizes: list[int]) -> tuple[Dataset | None, Dataset, None, str]:
        """The training samples (``sizes[0]``, epoch after epoch) and the validation samples (``sizes[1]``, padded)."""
        packing = self._packed()
        train_samples, val_samples = sizes[0], sizes[1]
        if train_samples > 0 and packing.train.samples == 0:
            raise ValueError(f"data.split {self.split!r} leaves no conversation for training.")
        train = None
        if packing.train.samples:
            train = ShuffledEpochs(PackedConversations(packing.reader, packing.train), train_samples, self.seed)
        padding = max(val_samples - packing.validation.samples, 0)
        validation = PackedConversations(packing.reader, packing.validation, padding)
        epochs = train_samples / packing.train.samples if packing.train.samples else 0.0
        corpora = ", ".join(f"{c.prefix} ({len(c.lengths):,} conversations)" for c in packing.corpora)
        dropped = f", {packing.without_answers:,} without an answer token left out" if packing.without_answers else ""
        description = (
            f"chat corpora {corpora}{dropped}, split {self.split!r}, seed {self.seed}; "
            f"{packing.train.describe('train')} ({epochs:.2f} epochs); "
            f"{packing.validation.describe('validation')}"
            + (f" + {padding} padding samples" if padding else "")
            + f"; loss on answer tokens only; read and packed in {packing.seconds:.1f} s"
        )
        return train, validation, None, description

    def _extended_train_dataset(self, first: Dataset, index: list[dict[str, int]], train_samples: int) -> Dataset:
        """The training samples of the whole run: the sample stream does not depend on the run's length, so a
        resumed run with more samples reads on in it; the index records the added samples with the same seed."""
        recorded = sum(part["samples"] for part in index)
        if recorded < train_samples:
            index = [*index, {"samples": train_samples - recorded, "seed": self.seed}]
        self.train_index = list(index)
        return ShuffledEpochs(first.dataset, max(recorded, train_samples), self.seed)  # type: ignore[attr-defined]

    def _check_recorded_data(self, path: Path, recorded: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint whose run was trained on other packed samples (or not by this module)."""
        mine = self._packed().record
        theirs = recorded.get("sft_packing")
        if theirs is None:
            raise ValueError(
                f"Checkpoint {path} was not trained with SFTDataModule, so its data position means nothing here. To "
                "fine-tune its weights, export them (llama-fp8 convert) and start a new run with model.init_weights."
            )
        changed = [f"{key} {theirs.get(key)!r} -> {value!r}" for key, value in mine.items() if theirs.get(key) != value]
        if changed:
            raise ValueError(
                f"Checkpoint {path} was trained on other packed samples than this run builds ({'; '.join(changed)}): "
                "resuming would repeat or skip conversations. Resume with the checkpoint's corpora, data.seq_length "
                "and data.split, or start a new run."
            )

    def checkpoint_info(self) -> dict[str, Any]:
        """:meth:`GPTDataModule.checkpoint_info` and the packing a resumed run must rebuild (``sft_packing``)."""
        info = super().checkpoint_info()
        if self._packing is not None:
            info["sft_packing"] = dict(self._packing.record)
        return info
