"""Reading documents for ``llama-fp8 preprocess``: JSON Lines, Parquet and plain text inputs (each optionally gzip
compressed), streamed one document at a time, with bad records reported by file and line."""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lightning_llama_fp8.data.corpus import CorpusInputError

InputFormat = Literal["jsonl", "parquet", "text"]
TextSplit = Literal["file", "paragraph", "line"]

#: Rows of a Parquet file read at a time.
PARQUET_BATCH_ROWS = 1024

SUFFIX_FORMATS: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


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
    fmt = SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise CorpusInputError(
            f"Cannot tell the format of {path} from its name; name it .jsonl, .parquet or .txt (optionally .gz) or "
            "pass --input-format jsonl|parquet|text."
        )
    return fmt


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class BadLines:
    """Counts (with ``skip``) or raises on lines that are not documents."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise CorpusInputError(f"{where}: {problem}. Fix the input or pass --skip-bad-lines to count and skip it.")
        self.count += 1


class ReadProgress:
    """Input bytes consumed so far (advanced by the reader thread, read by the progress bar)."""

    def __init__(self) -> None:
        self.bytes_done = 0


@contextlib.contextmanager
def _open_lines(path: Path, progress: ReadProgress) -> Iterator[Iterator[bytes]]:
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


def _read_whole(path: Path, progress: ReadProgress) -> bytes:
    with open(path, "rb") as raw:
        data = gzip.decompress(raw.read()) if _is_gzip(path) else raw.read()
    progress.bytes_done += path.stat().st_size
    return data


def _decode(line: bytes, where: str, bad: BadLines) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad(where, f"invalid UTF-8 at byte {err.start} of the line")
        return None


def _jsonlread_documents(path: Path, key: str, bad: BadLines, progress: ReadProgress) -> Iterator[str]:
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


def _textread_documents(path: Path, split: TextSplit, bad: BadLines, progress: ReadProgress) -> Iterator[str]:
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


def _parquetread_documents(path: Path, key: str, bad: BadLines, progress: ReadProgress) -> Iterator[str]:
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
        for batch_number, batch in enumerate(parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[key])):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    bad(f"{path}: row {row}", f"column {key!r} holds {type(value).__name__}, not a string")
                    continue
                yield value
            progress.bytes_done = start + size * (batch_number + 1) // max(parquet.metadata.num_row_groups, 1)
        progress.bytes_done = start + size


def check_input(path: Path, fmt: InputFormat, key: str) -> None:
    """Cheap checks before any work: the first record of a JSON Lines / Parquet file has the key."""
    if fmt == "parquet" and not _is_gzip(path):
        _check_parquet_column(_parquet_file(path), path, key)
    if fmt == "jsonl":
        probe = BadLines(skip=False)
        with contextlib.suppress(StopIteration):
            next(_jsonlread_documents(path, key, probe, ReadProgress()))


def read_documents(
    files: Sequence[Path],
    formats: Sequence[InputFormat],
    key: str,
    split: TextSplit,
    bad: BadLines,
    progress: ReadProgress,
) -> Iterator[str]:
    for path, fmt in zip(files, formats, strict=True):
        if fmt == "jsonl":
            yield from _jsonlread_documents(path, key, bad, progress)
        elif fmt == "parquet":
            yield from _parquetread_documents(path, key, bad, progress)
        else:
            yield from _textread_documents(path, split, bad, progress)
