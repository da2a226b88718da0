"""Text to a training corpus: ``llama-fp8 preprocess`` writes Megatron's ``<prefix>.bin`` / ``<prefix>.idx``.

The output is what Megatron-LM's ``tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --append-eod``
writes for the same documents and tokenizer, byte for byte: each document is tokenized with the tokenizer's own
special tokens (the Llama 3 tokenizer puts ``<|begin_of_text|>`` first, as ``transformers`` does), the
end-of-document token is appended (Llama 3: ``<|end_of_text|>``), one sequence per document, the smallest integer
type that holds the vocabulary. Beside the corpus, ``<prefix>.corpus.json`` records the tokenizer (its SHA-256),
the counts and the largest token id, so that training can refuse a corpus made for another vocabulary without
reading it.

Documents stream: a reader thread parses the input while ``workers`` threads tokenize batches in Rust (the
``tokenizers`` library releases the GIL), and the main thread writes in input order. The corpus appears only when
complete: everything is written under ``.tmp`` names and renamed at the end, the index last.

Inputs: JSON Lines (one object per line, the text under ``json_key``), Parquet (a string column ``json_key``;
needs ``pyarrow``) and plain text (a whole file, each paragraph, or each line a document), each optionally
gzip-compressed (``.gz``); the format comes from the file name unless ``input_format`` says it.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import queue
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy

from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER, TokenizerSpec, resolve_tokenizer

__all__ = [
    "SIDECAR_SUFFIX",
    "CorpusInputError",
    "PreprocessSummary",
    "preprocess",
    "read_sidecar",
]

InputFormat = Literal["jsonl", "parquet", "text"]
TextSplit = Literal["file", "paragraph", "line"]

#: ``<prefix>.corpus.json``: what made the corpus (tokenizer, counts, largest token id).
SIDECAR_SUFFIX = ".corpus.json"
SIDECAR_FORMAT = "lightning-llama-fp8 corpus"
_TMP = ".tmp"
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # Megatron's index magic, version 1 follows
_SUFFIX_FORMATS: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
# Megatron's index dtype codes (megatron.core.datasets.indexed_dataset.DType); kept here so that preprocessing
# does not import megatron-core (seconds of start-up). A test checks them against megatron-core's.
_DTYPE_CODES: dict[type[numpy.integer], int] = {numpy.uint8: 1, numpy.int32: 4, numpy.uint16: 8}
# A batch handed to one tokenizer call: large enough that the Rust side dominates, small enough to stream.
_BATCH_CHARS = 1 << 20
_BATCH_DOCUMENTS = 1024


class CorpusInputError(ValueError):
    """Bad input for :func:`preprocess`; the message names the file (and line) and the fix."""


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
def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, in order; each glob sorted), each checked to be readable."""
    if not patterns:
        raise CorpusInputError("No input given: name one or more files or globs (e.g. 'data/*.jsonl.gz').")
    files: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise CorpusInputError(f"Input glob {pattern!r} matches no file.")
            files.extend(matches)
            continue
        path = Path(pattern).expanduser()
        if path.is_dir():
            raise CorpusInputError(f"Input {path} is a directory: give its files or a glob ('{path}/*.jsonl').")
        if not path.is_file():
            raise CorpusInputError(f"Input file {path} does not exist.")
        files.append(path)
    for path in files:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise CorpusInputError(f"Input file {path} cannot be read ({err.strerror}).") from err
    return files


def input_format_of(path: Path, given: InputFormat | None = None) -> InputFormat:
    """``given``, or the format the file name says (``.jsonl[.gz]``, ``.parquet[.gz]``, ``.txt[.gz]``)."""
    if given is not None:
        return given
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise CorpusInputError(
            f"Cannot tell the format of {path} from its name; name it .jsonl, .parquet or .txt (optionally .gz) or "
            "pass --input-format jsonl|parquet|text."
        )
    return fmt


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class _BadLines:
    """Counts (with ``skip``) or raises on lines that are not documents."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise CorpusInputError(f"{where}: {problem}. Fix the input or pass --skip-bad-lines to count and skip it.")
        self.count += 1


class _Progress:
    """Input bytes consumed so far (advanced by the reader thread, read by the progress bar)."""

    def __init__(self) -> None:
        self.bytes_done = 0


@contextlib.contextmanager
def _open_lines(path: Path, progress: _Progress) -> Iterator[Iterator[bytes]]:
    """The lines of ``path`` (gunzipped if compressed), advancing ``progress`` by the on-disk bytes read."""
    start = progress.bytes_done
    with open(path, "rb") as raw:
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(path) else raw  # type: ignore[assignment]

        def lines() -> Iterator[bytes]:
            for number, line in enumerate(stream):
                if number % 1024 == 0:
                    progress.bytes_done = start + raw.tell()
                yield line
            progress.bytes_done = start + raw.tell()

        yield lines()


def _read_whole(path: Path, progress: _Progress) -> bytes:
    with open(path, "rb") as raw:
        data = gzip.decompress(raw.read()) if _is_gzip(path) else raw.read()
    progress.bytes_done += path.stat().st_size
    return data


def _decode(line: bytes, where: str, bad: _BadLines) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad(where, f"invalid UTF-8 at byte {err.start} of the line")
        return None


def _jsonl_documents(path: Path, key: str, bad: _BadLines, progress: _Progress) -> Iterator[str]:
    with _open_lines(path, progress) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines; skip them silently
            where = f"{path}:{number}"
            text = _decode(line, where, bad)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                bad(where, f"invalid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict) or key not in record:
                bad(where, f"no key {key!r} (choose the text field with --json-key)")
                continue
            value = record[key]
            if not isinstance(value, str):
                bad(where, f"the value of {key!r} is {type(value).__name__}, not a string")
                continue
            yield value


def _text_documents(path: Path, split: TextSplit, bad: _BadLines, progress: _Progress) -> Iterator[str]:
    if split == "file":
        data = _read_whole(path, progress)
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as err:
            bad(f"{path}:{data.count(b'\n', 0, err.start) + 1}", "invalid UTF-8")
        return
    with _open_lines(path, progress) as lines:
        paragraph: list[str] = []
        for number, line in enumerate(lines, start=1):
            text = _decode(line, f"{path}:{number}", bad)
            if text is None:
                continue
            if split == "line":
                if text.strip():
                    yield text.rstrip("\r\n")
            elif text.strip():
                paragraph.append(text)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise CorpusInputError(
            f"{path} is Parquet, which needs pyarrow: pip install 'lightning-llama-fp8[parquet]'."
        ) from err
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise CorpusInputError(f"{path} is not a readable Parquet file ({err}).") from err


def _check_parquet_column(parquet: Any, path: Path, key: str) -> None:
    names = parquet.schema_arrow.names
    if key not in names:
        raise CorpusInputError(
            f"{path} has no column {key!r} (columns: {', '.join(names)}); choose it with --json-key."
        )


def _parquet_documents(path: Path, key: str, bad: _BadLines, progress: _Progress) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        source = path
        if _is_gzip(path):  # Parquet needs random access: unpack to a temporary file first
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".parquet"))
            with gzip.open(path, "rb") as packed:
                shutil.copyfileobj(packed, tmp, 1 << 24)
            tmp.flush()
            source = Path(tmp.name)
        parquet = _parquet_file(source)
        _check_parquet_column(parquet, path, key)
        row = 0
        size = path.stat().st_size
        start = progress.bytes_done
        for batch_number, batch in enumerate(parquet.iter_batches(batch_size=_BATCH_DOCUMENTS, columns=[key])):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    bad(f"{path}: row {row}", f"column {key!r} holds {type(value).__name__}, not a string")
                    continue
                yield value
            progress.bytes_done = start + size * (batch_number + 1) // max(parquet.metadata.num_row_groups, 1)
        progress.bytes_done = start + size


def _check_input(path: Path, fmt: InputFormat, key: str) -> None:
    """Cheap checks before any work: the first record of a JSON Lines / Parquet file has the key."""
    if fmt == "parquet" and not _is_gzip(path):
        _check_parquet_column(_parquet_file(path), path, key)
    if fmt == "jsonl":
        probe = _BadLines(skip=False)
        with contextlib.suppress(StopIteration):
            next(_jsonl_documents(path, key, probe, _Progress()))


def _documents(
    files: Sequence[Path],
    formats: Sequence[InputFormat],
    key: str,
    split: TextSplit,
    bad: _BadLines,
    progress: _Progress,
) -> Iterator[str]:
    for path, fmt in zip(files, formats, strict=True):
        if fmt == "jsonl":
            yield from _jsonl_documents(path, key, bad, progress)
        elif fmt == "parquet":
            yield from _parquet_documents(path, key, bad, progress)
        else:
            yield from _text_documents(path, split, bad, progress)


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

    def __init__(self, spec: TokenizerSpec, dtype: type[numpy.integer], add_special_tokens: bool, eod: int | None):
        self.tokenizer = spec.load()
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


# ---------------------------------------------------------------------------------------------------- output
def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def sidecar_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{SIDECAR_SUFFIX}")


def _check_output(prefix: Path, overwrite: bool) -> None:
    parent = prefix.parent
    if not parent.is_dir():
        raise CorpusInputError(f"Output directory {parent} does not exist; create it first (mkdir -p {parent}).")
    if not os.access(parent, os.W_OK):
        raise CorpusInputError(f"Output directory {parent} is not writable.")
    existing = [p for p in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix)) if p.exists()]
    if existing and not overwrite:
        raise CorpusInputError(
            f"Output {', '.join(map(str, existing))} already exists; choose another --output-prefix or pass "
            "--overwrite to replace it."
        )


def token_dtype(vocab_size: int) -> type[numpy.integer]:
    """The ``.bin`` integer type for a vocabulary, as Megatron-LM's ``DType.optimal_dtype`` picks it."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def _write_index(path: Path, dtype: type[numpy.integer], lengths: numpy.ndarray, documents: numpy.ndarray) -> None:
    """Megatron's ``.idx`` (version 1): header, dtype code, counts, sequence lengths, byte offsets, document starts."""
    itemsize = numpy.dtype(dtype).itemsize
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    if len(lengths) > 1:
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as fh:
        fh.write(_INDEX_HEADER)
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(documents)))
        fh.write(lengths.astype(numpy.int32).tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(documents.astype(numpy.int64).tobytes(order="C"))
        fh.flush()
        os.fsync(fh.fileno())


def _publish(prefix: Path, sidecar: dict[str, Any]) -> None:
    """Rename the finished files into place: the index last, so a corpus exists only once it is whole."""
    final_bin, final_idx, final_sidecar = bin_path(prefix), idx_path(prefix), sidecar_path(prefix)
    final_idx.unlink(missing_ok=True)  # an overwritten corpus stops existing before its .bin is replaced
    final_sidecar.unlink(missing_ok=True)
    sidecar["bin_bytes"] = Path(f"{final_bin}{_TMP}").stat().st_size
    sidecar["idx_bytes"] = Path(f"{final_idx}{_TMP}").stat().st_size
    Path(f"{final_sidecar}{_TMP}").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    os.replace(f"{final_bin}{_TMP}", final_bin)
    os.replace(f"{final_sidecar}{_TMP}", final_sidecar)
    os.replace(f"{final_idx}{_TMP}", final_idx)


def _remove_partial(prefix: Path) -> None:
    for path in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix)):
        Path(f"{path}{_TMP}").unlink(missing_ok=True)


def read_sidecar(prefix: str | Path) -> dict[str, Any] | None:
    """The ``<prefix>.corpus.json`` of a corpus, if it exists and still describes these ``.bin``/``.idx`` files.

    A sidecar whose recorded file sizes differ from the files on disk belongs to an earlier corpus of that name
    and is ignored (``None``), as is a missing or unreadable one.
    """
    path = sidecar_path(prefix)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return None
    try:
        sizes = (bin_path(prefix).stat().st_size, idx_path(prefix).stat().st_size)
    except OSError:
        return None
    if sizes != (sidecar.get("bin_bytes"), sidecar.get("idx_bytes")):
        return None
    return sidecar


# ---------------------------------------------------------------------------------------------------- the job
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
        workers: tokenizer threads.
        skip_bad_lines: count and skip undecodable, invalid or key-less records instead of stopping.
        overwrite: replace an existing corpus of that prefix (only once the new one is complete).
        progress: show a progress bar on stderr.

    Raises:
        CorpusInputError: bad input or output (named with file and line), found before tokenizing where possible.
        FileNotFoundError, ValueError: the tokenizer cannot be found or used.
    """
    start = time.perf_counter()
    if workers < 1:
        raise CorpusInputError(f"workers must be >= 1, got {workers}.")
    if text_split not in ("file", "paragraph", "line"):
        raise CorpusInputError(f"text_split must be file, paragraph or line; got {text_split!r}.")
    files = expand_inputs(inputs)
    formats = [input_format_of(path, input_format) for path in files]
    prefix = Path(output_prefix).expanduser()
    _check_output(prefix, overwrite)
    spec = resolve_tokenizer(tokenizer, eod_token)
    if append_eod and spec.eod_id is None:
        raise CorpusInputError(
            f"The tokenizer {spec.path} names no end-of-document token (no eos_token in a tokenizer_config.json "
            "beside it): pass --eod-token TOKEN, or --no-append-eod."
        )
    for path, fmt in zip(files, formats, strict=True):
        _check_input(path, fmt, json_key)

    dtype = token_dtype(spec.vocab_size)
    encode = _Encoder(spec, dtype, add_special_tokens, spec.eod_id if append_eod else None)
    input_bytes = sum(path.stat().st_size for path in files)
    bad, read = _BadLines(skip_bad_lines), _Progress()
    documents = tokens = 0
    max_token_id = -1
    all_lengths: list[numpy.ndarray] = []
    bar = _progress_bar(input_bytes, enabled=progress)
    try:
        with open(f"{bin_path(prefix)}{_TMP}", "wb") as out, _tokenizers_single_threaded():
            texts = _read_ahead(_batches(_documents(files, formats, json_key, text_split, bad, read)), 2 * workers + 2)
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
        _write_index(Path(f"{idx_path(prefix)}{_TMP}"), dtype, lengths[lengths > 0], document_starts)
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
        _publish(prefix, _sidecar(summary, files, json_key, text_split, append_eod, add_special_tokens, encode))
    except BaseException:
        _remove_partial(prefix)
        raise
    finally:
        bar.close()
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
        "version": 1,
        **record,
        "append_eod": append_eod,
        "special_tokens_added": leading,  # what the tokenizer adds to every document (Llama 3: the BOS)
        "json_key": json_key,
        "text_split": text_split,
        "inputs": [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in files],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- command line
