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
from typing import Any

import numpy

from lightning_llama_fp8.data.corpus import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    SIDECAR_VERSION,
    TMP_SUFFIX,
    CorpusInputError,
    bin_path,
    check_output_prefix,
    corpus_binding,
    idx_path,
    publish_corpus,
    read_sidecar,
    remove_partial_corpus,
    token_dtype,
    write_index,
)
from lightning_llama_fp8.data.documents import (
    BadLines,
    InputFormat,
    ReadProgress,
    TextSplit,
    check_input,
    expand_inputs,
    input_format_of,
    read_documents,
)
from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER, TokenizerSpec, resolve_tokenizer
from lightning_llama_fp8.storage.output_lock import OutputBusyError, OutputLock
from lightning_llama_fp8.validate import SettingError, as_int, usable_cpus

__all__ = [
    "SIDECAR_SUFFIX",
    "CorpusInputError",
    "PreprocessSummary",
    "preprocess",
    "read_sidecar",
]


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


# ---------------------------------------------------------------------------------------------------- inputs
def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_END = object()


def _read_ahead(batches: Iterator[list[str]], depth: int) -> Iterator[list[str]]:
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


def _encoded(batches: Iterator[list[str]], encode: Callable, workers: int) -> Iterator[tuple[numpy.ndarray, ...]]:
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
    prefix = Path(output_prefix).expanduser()
    spec = resolve_tokenizer(tokenizer, eod_token)
    check_output_prefix(prefix, overwrite, reads=[*files, spec.path])
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
    bad, read = BadLines(skip_bad_lines), ReadProgress()
    documents = tokens = 0
    max_token_id = -1
    all_lengths: list[numpy.ndarray] = []
    try:
        lock = OutputLock(prefix, "llama-fp8 preprocess").acquire()
    except OutputBusyError as err:  # another run writes this prefix: refused at once, its files untouched
        raise CorpusInputError(str(err)) from err
    bar = _progress_bar(input_bytes, enabled=progress)
    try:
        check_output_prefix(prefix, overwrite, reads=[*files, spec.path])  # again, now that no one else writes it
        with open(f"{bin_path(prefix)}{TMP_SUFFIX}", "wb") as out, _tokenizers_single_threaded():
            texts = _read_ahead(
                _batches(read_documents(files, formats, json_key, text_split, bad, read)), 2 * workers + 2
            )
            for flat, lengths in _encoded(texts, encode, workers):
                out.write(flat.tobytes(order="C"))
                all_lengths.append(lengths)
                documents += len(lengths)
                tokens += len(flat)
                if len(flat):
                    max_token_id = max(max_token_id, int(flat.max()))
                bar.update(read.bytes_done - bar.n)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s", False)
            out.flush()
            os.fsync(out.fileno())
        if tokens == 0:
            raise CorpusInputError(
                f"The input ({', '.join(map(str, files))}) gave no tokens ({documents} documents"
                f"{f', {bad.count} bad lines skipped' if bad.count else ''}); nothing was written."
            )
        lengths = numpy.concatenate(all_lengths)
        # One sequence per non-empty document; an empty document adds a document boundary only (as Megatron-LM).
        document_starts = numpy.concatenate([[0], numpy.cumsum(lengths > 0)])
        written_idx = Path(f"{idx_path(prefix)}{TMP_SUFFIX}")
        write_index(written_idx, dtype, lengths[lengths > 0], document_starts)
        seconds = time.perf_counter() - start
        summary = PreprocessSummary(
            str(prefix),
            documents,
            tokens,
            max_token_id,
            numpy.dtype(dtype).name,
            seconds,
            input_bytes,
            bad.count,
            spec.identity(),
        )
        sidecar = _sidecar(summary, files, json_key, text_split, append_eod, add_special_tokens, encode)
        sidecar["binding"] = corpus_binding(sidecar, Path(out.name), written_idx)
        publish_corpus(prefix, sidecar)
    except OSError as err:
        remove_partial_corpus(prefix)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(prefix.parent).free
            raise CorpusInputError(
                f"The disk holding {prefix.parent} is full ({free / 2**30:.2f} GiB free after removing this run's "
                f"partial files; the corpus needs about {tokens * numpy.dtype(dtype).itemsize / 2**30:.2f} GiB for "
                f"the {tokens:,} tokens written so far, and more for the rest). Free space or choose an "
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


def _sidecar(
    summary: PreprocessSummary,
    files: Sequence[Path],
    json_key: str,
    text_split: TextSplit,
    append_eod: bool,
    add_special_tokens: bool,
    encode: _Encoder,
) -> dict[str, Any]:
    record = asdict(summary)
    record.pop("prefix")
    leading = encode.tokenizer.encode("", add_special_tokens=add_special_tokens).tokens
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        **record,
        "append_eod": append_eod,
        "special_tokens_added": leading,  # what the tokenizer adds to every document (Llama 3: the BOS)
        "parse_special_tokens": not encode.tokenizer.encode_special_tokens,  # special-token strings in text
        "json_key": json_key,
        "text_split": text_split,
        "inputs": [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in files],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- command line
