"""Text to a training corpus: ``llama-fp8 preprocess`` writes Megatron's ``<prefix>.bin`` / ``<prefix>.idx``.

The output is what Megatron-LM's ``tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --append-eod``
writes for the same documents and tokenizer, byte for byte: each document is tokenized with the tokenizer's own
special tokens (the Llama 3 tokenizer puts ``<|begin_of_text|>`` first, as ``transformers`` does), the
end-of-document token is appended (Llama 3: ``<|end_of_text|>``), one sequence per document, the smallest integer
type that holds the vocabulary. Beside the corpus, ``<prefix>.corpus.json`` records the tokenizer (its SHA-256),
the counts and the largest token id, bound to the files by a digest (``data/corpus.py``), so that training can
refuse a corpus made for another vocabulary without reading it.

One difference, on purpose: special-token strings inside the text (``<|eot_id|>``, ``<|start_header_id|>``,
``<|image|>``) are encoded as the characters they are. Megatron-LM's ``HuggingFaceTokenizer`` calls the
``transformers`` tokenizer, which turns them into the control tokens they name (transformers 5.17 with the bundled
tokenizer: ``"a <|image|> b"`` gives id 128256, past a Llama 3 model's 128,256 ids). Text without such strings gives
the same bytes as Megatron-LM; ``parse_special_tokens=True`` (``--parse-special-tokens``, recorded in the sidecar)
gives Megatron-LM's ids for all text.

Documents stream: a reader thread parses the input while ``workers`` threads tokenize batches in Rust (the
``tokenizers`` library releases the GIL), and the main thread writes in input order. The corpus appears only when
complete: everything is written under ``.tmp`` names and renamed at the end, the index last.

Inputs: JSON Lines (one object per line, the text under ``json_key``), Parquet (a string column ``json_key``;
needs ``pyarrow``) and plain text (a whole file, each paragraph, or each line a document), each optionally
gzip-compressed (``.gz``); the format comes from the file name unless ``input_format`` says it.

Conversations (:func:`preprocess_chat`, ``llama-fp8 preprocess --chat``) become a fine-tuning corpus: one document
per conversation, rendered with the tokenizer's chat template (``data/chat.py``; no end-of-document token appended:
the template closes every turn), and ``<prefix>.loss_mask.bin`` beside the ``.bin``, one byte per token, 1 where the
model learns (the answers and the end-of-turn token after each). The reader thread also renders (Jinja is Python);
the workers tokenize. Conversations longer than ``max_seq_length`` tokens are dropped or truncated (``too_long``),
and counted in the summary and the sidecar (``"kind": "chat"``, the template's source and SHA-256).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy

from lightning_llama_fp8.data.chat import ChatTemplate, ChatTokenizer, ConversationError, RenderedChat
from lightning_llama_fp8.data.corpus import (
    CHAT_KIND,
    LOSS_MASK_DTYPE,
    LOSS_MASK_SUFFIX,
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    SIDECAR_VERSION,
    TEXT_KIND,
    TMP_SUFFIX,
    CorpusInputError,
    bin_path,
    check_output_prefix,
    corpus_binding,
    idx_path,
    loss_mask_path,
    output_prefix_path,
    publish_corpus,
    read_sidecar,
    remove_partial_corpus,
    token_dtype,
    write_index,
)
from lightning_llama_fp8.data.documents import (
    BadLines,
    Conversation,
    InputFormat,
    ReadProgress,
    TextSplit,
    check_chat_input,
    check_input,
    expand_inputs,
    input_format_of,
    read_conversations,
    read_documents,
)
from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER, TokenizerSpec, resolve_tokenizer
from lightning_llama_fp8.storage.output_lock import OutputBusyError, OutputLock
from lightning_llama_fp8.validate import SettingError, as_int, usable_cpus

__all__ = [
    "SIDECAR_SUFFIX",
    "ChatPreprocessSummary",
    "CorpusInputError",
    "PreprocessSummary",
    "TooLong",
    "preprocess",
    "preprocess_chat",
    "read_sidecar",
]

#: What happens to a conversation longer than ``max_seq_length`` tokens: left out, or cut to its first tokens.
TooLong = Literal["drop", "truncate"]
TOO_LONG_POLICIES: tuple[str, ...] = ("drop", "truncate")


# A batch handed to one tokenizer call: large enough that the Rust side dominates, small enough to stream.
_BATCH_CHARS = 1 << 20
_BATCH_DOCUMENTS = 1024


@dataclass
class PreprocessSummary:
    """What one :func:`preprocess` call wrote."""

    prefix: str
    documents: int
    tokens: int
    max_token_id: int
    dtype: str
    seconds: float
    input_bytes: int
    skipped_lines: int = 0
    tokenizer: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        skipped = f", {self.skipped_lines:,} bad lines skipped" if self.skipped_lines else ""
        return (
            f"Wrote {self.prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens, max token id "
            f"{self.max_token_id:,}, {self.dtype}{skipped}; {self.seconds:.1f} s "
            f"({self.documents / max(self.seconds, 1e-9):,.0f} docs/s, {self.tokens_per_s:,.0f} tokens/s)."
        )


@dataclass
class ChatPreprocessSummary(PreprocessSummary):
    """What one :func:`preprocess_chat` call wrote: ``documents`` are the conversations written.

    Attributes:
        answer_tokens: tokens of the loss mask (answers and their end-of-turn tokens).
        max_seq_length: the longest conversation allowed, in tokens.
        too_long_policy: ``drop`` or ``truncate``.
        too_long: conversations longer than ``max_seq_length``.
        too_long_dropped: of those, left out (with ``truncate``: those whose first tokens hold no answer).
        too_long_truncated: of those, cut to ``max_seq_length`` tokens.
        chat_template: the template's source, SHA-256 and text.
    """

    answer_tokens: int = 0
    max_seq_length: int = 0
    too_long_policy: str = "drop"
    too_long: int = 0
    too_long_dropped: int = 0
    too_long_truncated: int = 0
    chat_template: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        share = self.answer_tokens / max(self.tokens, 1)
        skipped = f", {self.skipped_lines:,} bad lines skipped" if self.skipped_lines else ""
        if self.too_long:
            cut = f"{self.too_long_truncated:,} truncated, " if self.too_long_policy == "truncate" else ""
            long = (
                f"; {self.too_long:,} longer than {self.max_seq_length:,} tokens (--too-long {self.too_long_policy}): "
                f"{cut}{self.too_long_dropped:,} dropped"
            )
        else:
            long = f"; none longer than {self.max_seq_length:,} tokens"
        return (
            f"Wrote {self.prefix}.bin/.idx/{LOSS_MASK_SUFFIX}: {self.documents:,} conversations, "
            f"{self.tokens:,} tokens, {self.answer_tokens:,} answer tokens ({share:.1%}), max token id "
            f"{self.max_token_id:,}, {self.dtype}{long}{skipped}; {self.seconds:.1f} s "
            f"({self.documents / max(self.seconds, 1e-9):,.0f} conversations/s, {self.tokens_per_s:,.0f} tokens/s)."
        )


# ---------------------------------------------------------------------------------------------------- inputs
def _batches(items: Iterator[Any], size: Callable[[Any], int] = len) -> Iterator[list[Any]]:
    """``items`` in batches of about ``_BATCH_CHARS`` characters (``size``) or ``_BATCH_DOCUMENTS`` items."""
    batch: list[Any] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _rendered(conversations: Iterator[Conversation], chat: ChatTokenizer, bad: BadLines) -> Iterator[RenderedChat]:
    """Each conversation rendered with the chat template (in the reader thread: in input order, so that a bad one
    is named before any later one)."""
    for conversation in conversations:
        try:
            rendered = chat.render(conversation.messages)
        except ConversationError as err:
            bad(conversation.where, str(err))
            continue
        if not rendered.answer_spans:
            bad(conversation.where, "the chat template writes none of its assistant messages, so there is no answer")
            continue
        yield rendered


_END = object()


def _read_ahead(batches: Iterator[list[Any]], depth: int) -> Iterator[list[Any]]:
    """Run ``batches`` (parsing and decoding: Python, holds the GIL) in a thread, ``depth`` batches ahead."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        buffer.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            buffer.put(err)

    reader = threading.Thread(target=produce, name="preprocess-reader", daemon=True)
    reader.start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


# ---------------------------------------------------------------------------------------------------- tokens
class _Encoder:
    """One batch of texts to token ids (a flat array) and per-document lengths, end-of-document appended."""

    def __init__(
        self,
        spec: TokenizerSpec,
        dtype: type[numpy.integer],
        add_special_tokens: bool,
        eod: int | None,
        parse_special_tokens: bool = False,
    ):
        self.tokenizer = spec.load(parse_special_tokens)
        self.dtype, self.add_special_tokens, self.eod = dtype, add_special_tokens, eod

    def __call__(self, texts: list[str]) -> tuple[numpy.ndarray, numpy.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens)
        ids = [encoding.ids for encoding in encodings]
        extra = 0 if self.eod is None else 1
        # Megatron-LM appends the end-of-document token to non-empty documents only.
        lengths = numpy.fromiter((len(x) + extra if x else 0 for x in ids), dtype=numpy.int64, count=len(ids))
        flat = numpy.empty(int(lengths.sum()), dtype=self.dtype)
        position = 0
        for doc in ids:
            if doc:
                flat[position : position + len(doc)] = doc
                position += len(doc)
                if extra:
                    flat[position] = self.eod
                    position += 1
        return flat, lengths


#: The counts a chat batch returns besides its tokens, summed over the run (``_ChatEncoder``).
_CHAT_COUNTS = ("answer_tokens", "too_long", "too_long_dropped", "too_long_truncated")


class _ChatEncoder:
    """One batch of rendered conversations to token ids (flat), lengths, the loss mask (flat) and
    ``_CHAT_COUNTS``, with the too-long policy applied."""

    def __init__(self, chat: ChatTokenizer, dtype: type[numpy.integer], max_seq_length: int, too_long: TooLong) -> None:
        self.chat, self.dtype, self.max_seq_length, self.too_long = chat, dtype, max_seq_length, too_long

    def __call__(self, batch: list[RenderedChat]) -> tuple[numpy.ndarray, ...]:
        ids: list[numpy.ndarray] = []
        masks: list[numpy.ndarray] = []
        too_long = dropped = truncated = 0
        for encoding in self.chat.tokenize(batch):
            tokens, mask = encoding.ids, encoding.loss_mask
            if len(tokens) > self.max_seq_length:
                too_long += 1
                if self.too_long == "drop":
                    dropped += 1
                    continue
                tokens, mask = tokens[: self.max_seq_length], mask[: self.max_seq_length]
                if not mask.any():  # the answers all lay past the cut: nothing left to learn
                    dropped += 1
                    continue
                truncated += 1
            ids.append(tokens)
            masks.append(mask)
        lengths = numpy.fromiter(map(len, ids), dtype=numpy.int64, count=len(ids))
        flat = numpy.concatenate(ids).astype(self.dtype) if ids else numpy.empty(0, dtype=self.dtype)
        flat_mask = numpy.concatenate(masks) if masks else numpy.empty(0, dtype=LOSS_MASK_DTYPE)
        counts = numpy.array([int(flat_mask.sum()), too_long, dropped, truncated], dtype=numpy.int64)
        return flat, lengths, flat_mask.astype(LOSS_MASK_DTYPE), counts


@contextlib.contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """Each ``encode_batch`` call sequential in Rust: parallelism is exactly the ``workers`` threads."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _encoded(batches: Iterator[list[Any]], encode: Callable, workers: int) -> Iterator[tuple[numpy.ndarray, ...]]:
    """``encode`` each batch on ``workers`` threads, yielding results in input order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess-tokenize") as pool:
        pending: list[Future] = []
        for batch in batches:
            pending.append(pool.submit(encode, batch))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _tokenizer_threads(workers: Any) -> int:
    """``workers`` as a whole number >= 1, cut to the CPUs this process may use (with a note on stderr when it is).

    Each thread tokenizes on a core of its own (the tokenizer runs in Rust, without the GIL), so more threads than
    cores tokenize no faster, while each keeps its own batches of text and tokens in flight: host memory grows with
    ``workers`` until the whole input is in memory at once (README, ``llama-fp8 preprocess``).
    """
    try:
        requested = as_int(workers, "workers", at_least=1)
    except SettingError as err:
        raise CorpusInputError(str(err)) from None
    cpus = usable_cpus()
    if requested <= cpus:
        return requested
    print(
        f"llama-fp8 preprocess: workers (--workers) {requested} is more than the {cpus} CPU(s) this process may use; "
        f"tokenizing with {cpus} thread(s): more would not be faster, and each keeps its own batches of text and "
        "tokens in memory.",
        file=sys.stderr,
    )
    return cpus


# ---------------------------------------------------------------------------------------------------- output
def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: str | Path = DEFAULT_TOKENIZER,
    *,
    json_key: str = "text",
    input_format: InputFormat | None = None,
    text_split: TextSplit = "file",
    eod_token: str | None = None,
    append_eod: bool = True,
    add_special_tokens: bool = True,
    parse_special_tokens: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into the corpus ``<output_prefix>.bin`` / ``.idx`` (+ ``.corpus.json``).

    Args:
        inputs: files or globs; JSON Lines, Parquet or plain text, each optionally ``.gz``.
        output_prefix: the corpus prefix (``IndexedDataModule``'s ``data_path`` entry); its directory must exist.
        tokenizer: ``"llama3"`` (bundled), a ``tokenizer.json`` file, or a Hugging Face tokenizer directory.
        json_key: the text field of JSON Lines records / the Parquet column.
        input_format: ``jsonl`` | ``parquet`` | ``text``; ``None``: from each file name.
        text_split: plain text only: one document per ``file``, per ``paragraph`` (blank-line separated) or per
            ``line``.
        eod_token: end-of-document token; ``None``: the tokenizer's ``eos_token`` (Llama 3: ``<|end_of_text|>``).
        append_eod: append it to every document (Megatron-LM's ``--append-eod``).
        add_special_tokens: let the tokenizer add its special tokens (Llama 3: ``<|begin_of_text|>`` first), as
            Megatron-LM's ``HuggingFaceTokenizer`` does.
        parse_special_tokens: read special-token strings in the text (``<|eot_id|>``) as those tokens, as
            Megatron-LM does; off: encode them as text (module docstring).
        workers: tokenizer threads, at most the CPUs this process may use (more are cut to those, with a note on
            stderr: they would tokenize no faster and hold more text in memory).
        skip_bad_lines: count and skip undecodable, invalid or key-less records instead of stopping.
        overwrite: replace an existing corpus of that prefix (only once the new one is complete).
        progress: show a progress bar on stderr.

    Raises:
        CorpusInputError: bad input or output (named with file and line), found before tokenizing where possible.
        FileNotFoundError, ValueError: the tokenizer cannot be found or used.
    """
    start = time.perf_counter()
    workers = _tokenizer_threads(workers)
    if text_split not in ("file", "paragraph", "line"):
        raise CorpusInputError(f"text_split must be file, paragraph or line; got {text_split!r}.")
    files = expand_inputs(inputs)
    formats = [input_format_of(path, input_format) for path in files]
    prefix = output_prefix_path(output_prefix)
    spec = resolve_tokenizer(tokenizer, eod_token)
    reads = [*files, spec.path]
    check_output_prefix(prefix, overwrite, reads=reads)
    if append_eod and spec.eod_id is None:
        raise CorpusInputError(
            f"The tokenizer {spec.path} names no end-of-document token (no eos_token in a tokenizer_config.json "
            "beside it): pass --eod-token TOKEN, or --no-append-eod."
        )
    for path, fmt in zip(files, formats, strict=True):
        check_input(path, fmt, json_key)

    dtype = token_dtype(spec.vocab_size)
    encode = _Encoder(spec, dtype, add_special_tokens, spec.eod_id if append_eod else None, parse_special_tokens)
    input_bytes = sum(path.stat().st_size for path in files)

    def summarize(written: _Written) -> tuple[PreprocessSummary, dict[str, Any]]:
        summary = PreprocessSummary(**_written_fields(prefix, written, dtype, start, input_bytes, spec))
        sidecar = _sidecar(summary, files, append_eod, add_special_tokens, encode.tokenizer)
        sidecar.update(kind=TEXT_KIND, json_key=json_key, text_split=text_split)
        return summary, sidecar

    def nothing(written: _Written) -> str:
        skipped = f", {written.skipped_lines} bad lines skipped" if written.skipped_lines else ""
        return (
            f"The input ({', '.join(map(str, files))}) gave no tokens ({written.documents} documents{skipped}); "
            "nothing was written."
        )

    return _write_corpus(
        prefix,
        reads,
        overwrite,
        skip_bad_lines,
        progress,
        input_bytes,
        workers,
        dtype,
        lambda bad, read: _batches(read_documents(files, formats, json_key, text_split, bad, read)),
        encode,
        summarize,
        nothing,
        with_loss_mask=False,
    )


def preprocess_chat(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: str | Path = DEFAULT_TOKENIZER,
    *,
    max_seq_length: int,
    too_long: TooLong = "drop",
    chat_template: str | Path | None = None,
    input_format: InputFormat | None = None,
    workers: int = 1,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ChatPreprocessSummary:
    """Render and tokenize conversations into the chat corpus ``<output_prefix>.bin`` / ``.idx`` /
    ``.loss_mask.bin`` (+ ``.corpus.json``, ``"kind": "chat"``): one document per conversation.

    A conversation is a JSON Lines record (or Parquet row) with ``messages`` (``{"role": "system"|"user"|"assistant",
    "content": TEXT}`` dicts, several turns) or ``prompt`` and ``response`` (and optionally ``system``).

    Args:
        inputs: files or globs; JSON Lines or Parquet, each optionally ``.gz``.
        output_prefix: the corpus prefix; its directory must exist.
        tokenizer: ``"llama3"`` (bundled), a ``tokenizer.json`` file, or a Hugging Face tokenizer directory.
        max_seq_length: the most tokens a conversation may have: the training sequence length.
        too_long: a longer conversation is left out (``drop``) or cut to its first ``max_seq_length`` tokens
            (``truncate``; one with no answer token left is left out); counted either way.
        chat_template: ``None``: the tokenizer's own, else Llama 3's; ``"llama3"``; or a Jinja file
            (``ChatTemplate.for_tokenizer``).
        input_format: ``jsonl`` | ``parquet``; ``None``: from each file name.
        workers: tokenizer threads (as :func:`preprocess`).
        skip_bad_lines: count and skip bad records (invalid JSON, another shape, tool messages, a conversation the
            template refuses) instead of stopping.
        overwrite: replace an existing corpus of that prefix (only once the new one is complete).
        progress: show a progress bar on stderr.

    Raises:
        CorpusInputError: bad input, output or template (named with file and line), found before tokenizing where
            possible.
        FileNotFoundError, ValueError: the tokenizer cannot be found or used.
    """
    start = time.perf_counter()
    workers = _tokenizer_threads(workers)
    try:
        max_seq_length = as_int(max_seq_length, "max_seq_length (--max-seq-length)", at_least=1)
    except SettingError as err:
        raise CorpusInputError(
            f"{err} A chat corpus needs the training sequence length, e.g. 8192 for Llama 3 8B."
        ) from None
    if too_long not in TOO_LONG_POLICIES:
        raise CorpusInputError(f"too_long (--too-long) must be drop or truncate; got {too_long!r}.")
    if input_format == "text":
        raise CorpusInputError("Conversations come as JSON Lines or Parquet, not plain text (input_format 'text').")
    files = expand_inputs(inputs)
    formats = [input_format_of(path, input_format) for path in files]
    prefix = output_prefix_path(output_prefix)
    spec = resolve_tokenizer(tokenizer)
    template = ChatTemplate.for_tokenizer(spec, chat_template)
    template_file = None if template.builtin else Path(template.source)
    reads = [*files, spec.path, *([template_file] if template_file else [])]
    check_output_prefix(prefix, overwrite, reads=reads)
    for path, fmt in zip(files, formats, strict=True):
        check_chat_input(path, fmt)
    chat = ChatTokenizer(spec, template)

    dtype = token_dtype(spec.vocab_size)
    encode = _ChatEncoder(chat, dtype, max_seq_length, too_long)
    input_bytes = sum(path.stat().st_size for path in files)

    def summarize(written: _Written) -> tuple[PreprocessSummary, dict[str, Any]]:
        counts = dict(zip(_CHAT_COUNTS, map(int, written.counts), strict=True))
        summary = ChatPreprocessSummary(
            **_written_fields(prefix, written, dtype, start, input_bytes, spec),
            max_seq_length=max_seq_length,
            too_long_policy=too_long,
            chat_template=template.identity(),
            **counts,
        )
        sidecar = _sidecar(summary, files, False, False, chat.tokenizer)
        for name in ("too_long_policy", "too_long", "too_long_dropped", "too_long_truncated"):
            sidecar.pop(name)
        sidecar.update(
            kind=CHAT_KIND,
            conversations=written.documents,
            too_long={
                "policy": too_long,
                "max_seq_length": max_seq_length,
                "conversations": counts["too_long"],
                "dropped": counts["too_long_dropped"],
                "truncated": counts["too_long_truncated"],
            },
            loss_mask={"suffix": LOSS_MASK_SUFFIX, "dtype": numpy.dtype(LOSS_MASK_DTYPE).name},
        )
        return summary, sidecar

    def nothing(written: _Written) -> str:
        counts = dict(zip(_CHAT_COUNTS, map(int, written.counts), strict=True))
        dropped = (
            f", {counts['too_long_dropped']} longer than {max_seq_length} tokens dropped"
            if counts["too_long_dropped"]
            else ""
        )
        skipped = f", {written.skipped_lines} bad lines skipped" if written.skipped_lines else ""
        return (
            f"The input ({', '.join(map(str, files))}) gave no conversation to write (0 written{dropped}{skipped}); "
            "nothing was written."
        )

    summary = _write_corpus(  # a ChatPreprocessSummary: summarize above makes it
        prefix,
        reads,
        overwrite,
        skip_bad_lines,
        progress,
        input_bytes,
        workers,
        dtype,
        lambda bad, read: _batches(
            _rendered(read_conversations(files, formats, bad, read), chat, bad), lambda rendered: len(rendered.text)
        ),
        encode,
        summarize,
        nothing,
        with_loss_mask=True,
    )
    return cast(ChatPreprocessSummary, summary)


@dataclass
class _Written:
    """What the writer has written so far (``counts``: a chat corpus's ``_CHAT_COUNTS``, summed)."""

    documents: int = 0
    tokens: int = 0
    max_token_id: int = -1
    skipped_lines: int = 0
    counts: numpy.ndarray = field(default_factory=lambda: numpy.zeros(len(_CHAT_COUNTS), dtype=numpy.int64))


def _write_corpus(
    prefix: Path,
    reads: Sequence[Path],
    overwrite: bool,
    skip_bad_lines: bool,
    progress: bool,
    input_bytes: int,
    workers: int,
    dtype: type[numpy.integer],
    batches: Callable[[BadLines, ReadProgress], Iterator[list[Any]]],
    encode: Callable[[list[Any]], tuple[numpy.ndarray, ...]],
    summarize: Callable[[_Written], tuple[PreprocessSummary, dict[str, Any]]],
    nothing: Callable[[_Written], str],
    *,
    with_loss_mask: bool,
) -> PreprocessSummary:
    """Hold the prefix's lock, write the corpus under temporary names (``encode`` of each of ``batches`` on
    ``workers`` threads, in input order), then publish it with the sidecar that ``summarize`` gives; on any failure
    remove what was written and leave an existing corpus as it was."""
    bad, read = BadLines(skip_bad_lines), ReadProgress()
    written = _Written()
    all_lengths: list[numpy.ndarray] = []
    try:
        lock = OutputLock(prefix, "llama-fp8 preprocess").acquire()
    except OutputBusyError as err:  # another run writes this prefix: refused at once, its files untouched
        raise CorpusInputError(str(err)) from err
    bar = _progress_bar(input_bytes, enabled=progress)
    start = time.perf_counter()
    mask_file = Path(f"{loss_mask_path(prefix)}{TMP_SUFFIX}")
    try:
        check_output_prefix(prefix, overwrite, reads=reads)  # again, now that no one else writes it
        with contextlib.ExitStack() as opened:
            out = opened.enter_context(open(f"{bin_path(prefix)}{TMP_SUFFIX}", "wb"))
            mask_out = opened.enter_context(open(mask_file, "wb")) if with_loss_mask else None
            opened.enter_context(_tokenizers_single_threaded())
            for flat, lengths, *extra in _encoded(_read_ahead(batches(bad, read), 2 * workers + 2), encode, workers):
                out.write(flat.tobytes(order="C"))
                if mask_out is not None:
                    mask_out.write(extra[0].tobytes(order="C"))
                    written.counts += extra[1]
                all_lengths.append(lengths)
                written.documents += len(lengths)
                written.tokens += len(flat)
                if len(flat):
                    written.max_token_id = max(written.max_token_id, int(flat.max()))
                bar.update(read.bytes_done - bar.n)
                elapsed = max(time.perf_counter() - start, 1e-9)
                rate = f"{written.documents / elapsed:,.0f} docs/s, {written.tokens / elapsed:,.0f} tokens/s"
                bar.set_postfix_str(rate, False)
            for fh in (out, mask_out):
                if fh is not None:
                    fh.flush()
                    os.fsync(fh.fileno())
        written.skipped_lines = bad.count
        if written.tokens == 0:
            raise CorpusInputError(nothing(written))
        lengths = numpy.concatenate(all_lengths)
        # One sequence per non-empty document; an empty document adds a document boundary only (as Megatron-LM).
        document_starts = numpy.concatenate([[0], numpy.cumsum(lengths > 0)])
        written_idx = Path(f"{idx_path(prefix)}{TMP_SUFFIX}")
        write_index(written_idx, dtype, lengths[lengths > 0], document_starts)
        summary, sidecar = summarize(written)
        sidecar["binding"] = corpus_binding(sidecar, Path(out.name), written_idx, mask_file if with_loss_mask else None)
        publish_corpus(prefix, sidecar)
    except OSError as err:
        remove_partial_corpus(prefix)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(prefix.parent).free
            per_token = numpy.dtype(dtype).itemsize + (1 if with_loss_mask else 0)
            raise CorpusInputError(
                f"The disk holding {prefix.parent} is full ({free / 2**30:.2f} GiB free after removing this run's "
                f"partial files; the corpus needs about {written.tokens * per_token / 2**30:.2f} GiB for "
                f"the {written.tokens:,} tokens written so far, and more for the rest). Free space or choose an "
                "--output-prefix on another disk; nothing was written and an existing corpus is untouched."
            ) from err
        raise
    except BaseException:
        remove_partial_corpus(prefix)
        raise
    finally:
        bar.close()
        lock.release()
    return summary


def _written_fields(
    prefix: Path, written: _Written, dtype: Any, start: float, input_bytes: int, spec: TokenizerSpec
) -> dict[str, Any]:
    """The :class:`PreprocessSummary` fields every kind of corpus has, from what was written."""
    return {
        "prefix": str(prefix),
        "documents": written.documents,
        "tokens": written.tokens,
        "max_token_id": written.max_token_id,
        "dtype": numpy.dtype(dtype).name,
        "seconds": time.perf_counter() - start,
        "input_bytes": input_bytes,
        "skipped_lines": written.skipped_lines,
        "tokenizer": spec.identity(),
    }


def _sidecar(
    summary: PreprocessSummary,
    files: Sequence[Path],
    append_eod: bool,
    add_special_tokens: bool,
    tokenizer: Any,
) -> dict[str, Any]:
    record = asdict(summary)
    record.pop("prefix")
    leading = tokenizer.encode("", add_special_tokens=add_special_tokens).tokens
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        **record,
        "append_eod": append_eod,
        "special_tokens_added": leading,  # what the tokenizer adds to every document (Llama 3: the BOS)
        "parse_special_tokens": not tokenizer.encode_special_tokens,  # special-token strings in text
        "inputs": [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in files],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- command line
