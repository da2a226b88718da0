"""Reading documents for ``llama-fp8 preprocess``: JSON Lines, Parquet and plain text inputs (each optionally gzip
compressed), streamed one document at a time, every problem named by file and line (Parquet: row); and, for
``--chat``, conversations from JSON Lines and Parquet (:func:`read_conversations`).

Two kinds of problem, both turned into one-line errors by :func:`read_documents` and :func:`read_conversations`:

- a bad record (invalid JSON or UTF-8, no text field, text that is not Unicode such as a JSON ``"\\ud800"`` escape
  of half a UTF-16 pair, which no tokenizer can encode; a conversation of another shape, a tool message) goes to
  :class:`BadLines`: the run stops, or with ``--skip-bad-lines`` the record is counted and skipped;
- a file that cannot be read to its end (a truncated ``.gz``, bytes after the gzip stream, a failed CRC, a damaged
  Parquet page, an I/O error) stops the run even with ``--skip-bad-lines``: its remaining documents would be lost
  without a trace.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import shlex
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    """Files named by ``patterns`` (paths or globs, in order; each glob sorted), each checked to be readable.

    A file named more than once (twice, by overlapping globs, or through a link) is read once, where it is first
    named; each repeat left out gets a line on stderr.
    """
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
    files = _without_repeats(files)
    for path in files:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise CorpusInputError(f"Input file {path} cannot be read ({err.strerror}).") from err
    return files


def _without_repeats(files: Sequence[Path]) -> list[Path]:
    """``files`` without the ones that are an earlier one (the same file on disk: same resolved path, or a hard
    link to it), each left out with a line on stderr: a corpus would otherwise hold its documents twice."""
    first: dict[tuple[int, int], Path] = {}
    kept: list[Path] = []
    for path in files:
        stat = path.stat()  # follows links: a link and its target are one file
        key = (stat.st_dev, stat.st_ino)
        if key in first:
            again = "named more than once" if first[key] == path else f"the same file as {first[key]}, named before it"
            print(f"llama-fp8 preprocess: input {path} is {again}; reading it once.", file=sys.stderr)
            continue
        first[key] = path
        kept.append(path)
    return kept


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


class _Cursor:
    """How far the reader of one file got: the last line (Parquet: row) read whole, for a read error to name."""

    def __init__(self, path: Path, unit: str) -> None:
        self.path, self.unit, self.done = path, unit, 0

    def at(self, number: int) -> str:
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path}: row {number}"


def _read_errors(fmt: InputFormat) -> tuple[type[BaseException], ...]:
    """What reading a file of ``fmt`` raises when the file is damaged or the disk fails (not a bad record)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
    if fmt == "parquet":
        with contextlib.suppress(ImportError):
            import pyarrow

            errors += (pyarrow.ArrowException,)
    return errors


def _unreadable(cursor: _Cursor, err: BaseException) -> CorpusInputError:
    if isinstance(err, EOFError):
        reason = "the gzip stream ends early (a truncated file?)"
    elif isinstance(err, gzip.BadGzipFile) and str(err).startswith("Not a gzipped file") and cursor.done:
        reason = f"bytes that are not gzip data follow the compressed stream ({err})"
    elif isinstance(err, (gzip.BadGzipFile, zlib.error)):
        reason = f"damaged gzip data ({err})"
    else:
        reason = f"{type(err).__name__}: {str(err).rstrip('.')}"
    place = f"past {cursor.unit} {cursor.done:,}" if cursor.done else "it"
    return CorpusInputError(
        f"{cursor.path}: cannot read {place}: {reason}. Copy or download the file again, or leave it out "
        "(--skip-bad-lines skips records, not the rest of a damaged file)."
    )


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized (``None``: it can): a lone surrogate is a ``str`` but not Unicode text."""
    if text.isascii():  # O(1) in CPython
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"the text holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start} (a JSON "
            "\\ud800-style escape of half a UTF-16 pair), which is not Unicode text"
        )
    return None


@contextlib.contextmanager
def _open_lines(path: Path, progress: ReadProgress, cursor: _Cursor) -> Iterator[Iterator[tuple[int, bytes]]]:
    """The numbered lines of ``path`` (gunzipped if compressed), advancing ``progress`` by the on-disk bytes read
    and ``cursor`` by the lines read."""
    start = progress.bytes_done
    with open(path, "rb") as raw:
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(path) else raw  # type: ignore[assignment]

        def lines() -> Iterator[tuple[int, bytes]]:
            for number, line in enumerate(stream, start=1):
                cursor.done = number
                if number % 1024 == 1:
                    progress.bytes_done = start + raw.tell()
                yield number, line
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


def _jsonl_records(path: Path, bad: BadLines, progress: ReadProgress, cursor: _Cursor) -> Iterator[tuple[int, Any]]:
    """The numbered JSON values of the lines of ``path`` (blank lines skipped, undecodable lines reported)."""
    with _open_lines(path, progress, cursor) as lines:
        for number, line in lines:
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
            except ValueError as err:  # e.g. an integer past Python's 4300-digit conversion limit
                bad(where, f"invalid JSON ({err})")
                continue
            except RecursionError:
                bad(where, "JSON nested too deeply to read")
                continue
            yield number, record


def _jsonl_documents(
    path: Path, key: str, bad: BadLines, progress: ReadProgress, cursor: _Cursor
) -> Iterator[tuple[int, str]]:
    for number, record in _jsonl_records(path, bad, progress, cursor):
        where = f"{path}:{number}"
        if isinstance(record, list):
            bad(where, f"a JSON array, not an object with key {key!r} (JSON Lines holds one object per line)")
            continue
        if not isinstance(record, dict) or key not in record:
            bad(where, f"no key {key!r} (choose the text field with --json-key)")
            continue
        value = record[key]
        if not isinstance(value, str):
            bad(where, f"the value of {key!r} is {type(value).__name__}, not a string")
            continue
        yield number, value


def _text_documents(
    path: Path, split: TextSplit, bad: BadLines, progress: ReadProgress, cursor: _Cursor
) -> Iterator[tuple[int, str]]:
    """Documents of a text file, each numbered by its first line."""
    if split == "file":
        data = _read_whole(path, progress)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            bad(f"{path}:{data.count(b'\n', 0, err.start) + 1}", "invalid UTF-8")
            return
        yield 1, text
        return
    with _open_lines(path, progress, cursor) as lines:
        paragraph: list[str] = []
        first = 0
        for number, line in lines:
            text = _decode(line, f"{path}:{number}", bad)
            if text is None:
                continue
            if split == "line":
                if text.strip():
                    yield number, text.rstrip("\r\n")
            elif text.strip():
                if not paragraph:
                    first = number
                paragraph.append(text)
            elif paragraph:
                yield first, "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield first, "".join(paragraph).rstrip("\r\n")


def _parquet_file(path: Path, name: Path | None = None) -> Any:
    """``path`` opened as Parquet; errors name ``name`` (the input, when ``path`` is its unpacked copy)."""
    name = name or path
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise CorpusInputError(
            f"{name} is Parquet, which needs pyarrow: pip install 'lightning-llama-fp8[parquet]'."
        ) from err
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise CorpusInputError(f"{name} is not a readable Parquet file ({err}).") from err


def _check_parquet_column(parquet: Any, path: Path, key: str) -> None:
    names = parquet.schema_arrow.names
    if key not in names:
        raise CorpusInputError(
            f"{path} has no column {key!r} (columns: {', '.join(names)}); choose it with --json-key."
        )


def _parquet_values(column: Any, first_row: int, key: str, problems: dict[int, str]) -> list[Any]:
    """The Python values of one batch's column; a value that is not UTF-8 is a bad row: its problem goes to
    ``problems`` (by row number) and ``_SKIPPED`` takes its place."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # pyarrow does not check UTF-8 on read; find the bad rows one by one
        values = []
        for offset in range(len(column)):
            try:
                values.append(column[offset].as_py())
            except UnicodeDecodeError as err:
                problems.setdefault(first_row + offset, f"column {key!r}: invalid UTF-8 at byte {err.start}")
                values.append(_SKIPPED)
        return values


_SKIPPED = object()  # a value already reported as bad


def _parquet_records(
    path: Path, columns: Sequence[str], bad: BadLines, progress: ReadProgress, cursor: _Cursor
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The numbered rows of ``columns`` of the Parquet file ``path`` (``.parquet.gz`` unpacked to a temporary file),
    each a dict by column; a row with a value that is not UTF-8 is reported once and left out."""
    with contextlib.ExitStack() as stack:
        source = path
        if _is_gzip(path):  # Parquet needs random access: unpack to a temporary file first
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".parquet"))
            with gzip.open(path, "rb") as packed:
                shutil.copyfileobj(packed, tmp, 1 << 24)
            tmp.flush()
            source = Path(tmp.name)
        parquet = _parquet_file(source, name=path)
        present = set(parquet.schema_arrow.names)
        if len(columns) == 1:
            _check_parquet_column(parquet, path, columns[0])
        columns = [name for name in columns if name in present]
        size, rows = path.stat().st_size, max(parquet.metadata.num_rows, 1)
        start = progress.bytes_done
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            first_row = cursor.done + 1
            problems: dict[int, str] = {}
            values = [_parquet_values(batch.column(i), first_row, name, problems) for i, name in enumerate(columns)]
            for offset in range(len(batch)):
                row = first_row + offset
                if row in problems:
                    bad(f"{path}: row {row}", problems[row])
                    continue
                yield row, {name: column[offset] for name, column in zip(columns, values, strict=True)}
            cursor.done += len(batch)
            progress.bytes_done = start + size * min(cursor.done, rows) // rows
        progress.bytes_done = start + size


def _parquet_documents(
    path: Path, key: str, bad: BadLines, progress: ReadProgress, cursor: _Cursor
) -> Iterator[tuple[int, str]]:
    for row, record in _parquet_records(path, [key], bad, progress, cursor):
        value = record[key]
        if not isinstance(value, str):
            bad(f"{path}: row {row}", f"column {key!r} holds {type(value).__name__}, not a string")
            continue
        yield row, value


def check_input(path: Path, fmt: InputFormat, key: str) -> None:
    """Cheap checks before any work: a Parquet file has the column, the first JSON Lines record has the key.

    A first line that is not a JSON record is left to the reading itself, which stops on it or, with
    ``--skip-bad-lines``, skips it.
    """
    if fmt == "parquet" and not _is_gzip(path):
        _check_parquet_column(_parquet_file(path), path, key)
    first = _first_json_record(path, fmt)
    if first is not None and key not in first[1]:
        number, record = first
        raise CorpusInputError(
            f"{path}:{number}: no key {key!r} (choose the text field with --json-key; this record has "
            f"{_field_names(record)})."
        )


def _first_json_record(path: Path, fmt: InputFormat) -> tuple[int, dict[str, Any]] | None:
    """The line number and record of the first non-blank JSON Lines line, if it is a JSON object (``None``: not
    JSON Lines, no such line, or not an object: left to the reading, which stops on it or skips it).

    Raises:
        CorpusInputError: the first line opens a JSON array: the file is one JSON document, not JSON Lines (every
            line of it would be a bad record, even with ``--skip-bad-lines``).
    """
    if fmt != "jsonl":
        return None
    cursor = _Cursor(path, "line")
    try:
        with _open_lines(path, ReadProgress(), cursor) as lines:
            for number, line in lines:
                if not line.strip():
                    continue
                if line.lstrip().startswith(b"["):
                    raise _json_array_error(path, number)
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    return None
                return (number, record) if isinstance(record, dict) else None
    except _read_errors(fmt) as err:
        raise _unreadable(cursor, err) from err
    return None


def _json_array_error(path: Path, number: int) -> CorpusInputError:
    """The refusal of a ``.json`` file that holds a JSON array of records, with the command that converts it."""
    stem = path.name.removesuffix(".gz")
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    target = path.with_name(f"{stem}.jsonl")
    if target == path:  # never suggest writing over the input
        target = path.with_name(f"{stem}.lines.jsonl")
    read = (
        f"gunzip -c {shlex.quote(str(path))} | jq -c '.[]'"
        if _is_gzip(path)
        else f"jq -c '.[]' {shlex.quote(str(path))}"
    )
    return CorpusInputError(
        f"{path}:{number}: the file is a JSON array ([...]), not JSON Lines (one JSON object per line, no enclosing "
        f"brackets). Convert it, e.g. {read} > {shlex.quote(str(target))}, and give {target} as the input."
    )


def _field_names(record: dict[str, Any]) -> str:
    return ", ".join(map(repr, list(record)[:10])) or "no fields"


def read_documents(
    files: Sequence[Path],
    formats: Sequence[InputFormat],
    key: str,
    split: TextSplit,
    bad: BadLines,
    progress: ReadProgress,
) -> Iterator[str]:
    """The documents of ``files`` in order: each one Unicode text, every problem named by file and line."""
    for path, fmt in zip(files, formats, strict=True):
        cursor = _Cursor(path, "row" if fmt == "parquet" else "line")
        if fmt == "jsonl":
            numbered = _jsonl_documents(path, key, bad, progress, cursor)
        elif fmt == "parquet":
            numbered = _parquet_documents(path, key, bad, progress, cursor)
        else:
            numbered = _text_documents(path, split, bad, progress, cursor)
        try:
            for number, text in numbered:
                problem = _text_problem(text)
                if problem is not None:
                    bad(cursor.at(number), problem)
                    continue
                yield text
        except CorpusInputError:
            raise
        except _read_errors(fmt) as err:
            raise _unreadable(cursor, err) from err


# ---------------------------------------------------------------------------------------------------- conversations
#: The roles a conversation of ``llama-fp8 preprocess --chat`` may have.
CHAT_ROLES = ("system", "user", "assistant")
#: Roles of tool calling (OpenAI's ``tool``/``function``, Llama 3.1's ``ipython``): not supported, refused by name.
TOOL_ROLES = ("tool", "function", "ipython")
#: The JSON Lines keys / Parquet columns of the two shapes of a conversation.
MESSAGES_KEY = "messages"
PROMPT_KEY, RESPONSE_KEY, SYSTEM_KEY = "prompt", "response", "system"
CHAT_COLUMNS = (MESSAGES_KEY, PROMPT_KEY, RESPONSE_KEY, SYSTEM_KEY)
_SHAPES_HINT = (
    "a conversation is {'messages': [{'role': 'system'|'user'|'assistant', 'content': TEXT}, ...]} or "
    "{'prompt': TEXT, 'response': TEXT} with an optional 'system': TEXT"
)


@dataclass(frozen=True)
class Conversation:
    """One conversation read from the input.

    Attributes:
        where: ``file:line`` (Parquet: ``file: row N``), for messages about it.
        messages: ``{"role": ..., "content": ...}`` dicts, roles in :data:`CHAT_ROLES`, contents Unicode strings,
            at least one from the assistant.
    """

    where: str
    messages: list[dict[str, str]]


def conversation_messages(record: Any) -> list[dict[str, str]]:
    """The messages of one record of either shape (``messages`` list, or ``prompt``/``response`` with an optional
    ``system``), checked.

    Raises:
        ValueError: what is wrong with the record (the caller names its file and line).
    """
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object; {_SHAPES_HINT}")
    if record.get(MESSAGES_KEY) is not None:
        raw = record[MESSAGES_KEY]
        if not isinstance(raw, list) or not raw:
            what = "an empty list" if isinstance(raw, list) else f"a {type(raw).__name__}"
            raise ValueError(f"{MESSAGES_KEY!r} is {what}, not a list of messages; {_SHAPES_HINT}")
        messages = [_message(number, message) for number, message in enumerate(raw, start=1)]
    elif record.get(PROMPT_KEY) is not None or record.get(RESPONSE_KEY) is not None:
        messages = []
        for key, role in ((SYSTEM_KEY, "system"), (PROMPT_KEY, "user"), (RESPONSE_KEY, "assistant")):
            value = record.get(key)
            if value is None and key == SYSTEM_KEY:
                continue
            if not isinstance(value, str):
                state = "missing" if value is None else f"a {type(value).__name__}, not a string"
                raise ValueError(f"{key!r} is {state}; {_SHAPES_HINT}")
            messages.append(_message(key, {"role": role, "content": value}))
    else:
        fields = ", ".join(map(repr, list(record)[:10]))
        raise ValueError(
            f"no {MESSAGES_KEY!r} and no {PROMPT_KEY!r}/{RESPONSE_KEY!r} (it has {fields or 'no fields'}); "
            f"{_SHAPES_HINT}"
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: a conversation needs an answer to learn from")
    return messages


def _message(number: int | str, message: Any) -> dict[str, str]:
    name = f"message {number}" if isinstance(number, int) else repr(number)
    if not isinstance(message, dict):
        raise ValueError(f"{name} is a {type(message).__name__}, not an object with 'role' and 'content'")
    role = message.get("role")
    if role in TOOL_ROLES or message.get("tool_calls"):
        raise ValueError(
            f"{name} is a tool {'call' if message.get('tool_calls') else 'result'} (role {role!r}): tool use is not "
            "supported; leave such conversations out of the input"
        )
    if role not in CHAT_ROLES:
        raise ValueError(f"{name} has role {role!r}; roles are {', '.join(CHAT_ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
        state = "missing" if content is None else f"a {type(content).__name__}, not a string"
        hint = " (multimodal content parts are not supported)" if isinstance(content, list) else ""
        raise ValueError(f"the content of {name} ({role}) is {state}{hint}")
    problem = _text_problem(content)
    if problem is not None:
        raise ValueError(f"{name} ({role}): {problem}")
    return {"role": role, "content": content}


def check_chat_input(path: Path, fmt: InputFormat) -> None:
    """Cheap checks before any work: a Parquet file has the columns of a conversation, the first JSON Lines record
    has the keys of one (a record that is not JSON is left to the reading, as in :func:`check_input`)."""
    if fmt == "text":
        raise CorpusInputError(f"{path} is plain text; conversations come as JSON Lines or Parquet ({_SHAPES_HINT}).")
    if fmt == "parquet" and not _is_gzip(path):
        names = set(_parquet_file(path).schema_arrow.names)
        if MESSAGES_KEY not in names and not {PROMPT_KEY, RESPONSE_KEY} <= names:
            raise CorpusInputError(
                f"{path} has no column {MESSAGES_KEY!r} and no columns {PROMPT_KEY!r} and {RESPONSE_KEY!r} (columns: "
                f"{', '.join(sorted(names))}); {_SHAPES_HINT}."
            )
    first = _first_json_record(path, fmt)
    if first is not None and not ({MESSAGES_KEY, PROMPT_KEY, RESPONSE_KEY} & set(first[1])):
        number, record = first
        raise CorpusInputError(
            f"{path}:{number}: no {MESSAGES_KEY!r} and no {PROMPT_KEY!r}/{RESPONSE_KEY!r} (this record "
            f"has {_field_names(record)}); {_SHAPES_HINT}."
        )


def read_conversations(
    files: Sequence[Path], formats: Sequence[InputFormat], bad: BadLines, progress: ReadProgress
) -> Iterator[Conversation]:
    """The conversations of ``files`` (JSON Lines or Parquet) in order, every problem named by file and line."""
    for path, fmt in zip(files, formats, strict=True):
        cursor = _Cursor(path, "row" if fmt == "parquet" else "line")
        if fmt == "jsonl":
            numbered: Iterator[tuple[int, Any]] = _jsonl_records(path, bad, progress, cursor)
        elif fmt == "parquet":
            numbered = _parquet_records(path, CHAT_COLUMNS, bad, progress, cursor)
        else:
            raise CorpusInputError(f"{path} is plain text; conversations come as JSON Lines or Parquet.")
        try:
            for number, record in numbered:
                where = cursor.at(number)
                try:
                    messages = conversation_messages(record)
                except ValueError as err:
                    bad(where, str(err))
                    continue
                yield Conversation(where, messages)
        except CorpusInputError:
            raise
        except _read_errors(fmt) as err:
            raise _unreadable(cursor, err) from err
