"""``llama-fp8 preprocess`` on CPU with the real Llama 3 tokenizer: token ids, Megatron's bytes, inputs, bad input."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from tokenizers import Tokenizer

from lightning_llama_fp8.data.preprocess import CorpusInputError, preprocess, read_sidecar
from lightning_llama_fp8.data.tokenizer import resolve_tokenizer
from tests.helpers import REPO_ROOT
from tests.helpers.corpora import DOCUMENTS, write_jsonl

LLAMA3 = resolve_tokenizer("llama3")
BOS, EOD = 128000, 128001  # <|begin_of_text|>, <|end_of_text|>


def corpus_documents(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix), mmap=True)
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_ids(documents: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(LLAMA3.path))
    return [[*tokenizer.encode(doc).ids, EOD] for doc in documents]


def test_token_ids_are_the_tokenizers_encoding_plus_eod(tmp_path: Path) -> None:
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)], tmp_path / "out", workers=2, progress=False)
    ids = corpus_documents(tmp_path / "out")
    assert ids == expected_ids(DOCUMENTS)
    assert all(doc[0] == BOS and doc[-1] == EOD for doc in ids)
    assert summary.documents == len(DOCUMENTS)
    assert summary.tokens == sum(map(len, ids))
    assert summary.max_token_id == max(max(doc) for doc in ids)
    assert summary.dtype == "int32"


def test_bytes_equal_megatrons_builder(tmp_path: Path) -> None:
    """The .bin/.idx equal what megatron-core's IndexedDatasetBuilder writes for Megatron-LM's preprocess_data.py.

    (The tool itself is compared in benchmarks/real_text.py; it adds documents to this builder one by one.)
    """
    docs = DOCUMENTS * 40  # several tokenizer batches
    preprocess([write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "ours", workers=2, progress=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(LLAMA3.vocab_size))
    for ids in expected_ids(docs):
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_empty_document_without_special_tokens_is_a_boundary_like_megatron(tmp_path: Path) -> None:
    docs = ["one", "", "three"]
    preprocess([write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", add_special_tokens=False, progress=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=numpy.int32)
    tokenizer = Tokenizer.from_file(str(LLAMA3.path))
    for doc in docs:
        ids = tokenizer.encode(doc, add_special_tokens=False).ids
        ids = [*ids, EOD] if ids else []  # Megatron-LM appends EOD to non-empty documents only
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert (tmp_path / "out.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_formats_give_the_same_documents(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    docs = [d for d in DOCUMENTS if d.strip()]
    want = expected_ids(docs)
    write_jsonl(tmp_path / "a.jsonl.gz", docs, compress=True)
    pq.write_table(pyarrow.table({"content": docs}), tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "lines.txt.gz").write_bytes(gzip.compress("\n".join(d.replace("\n", " ") for d in docs).encode()))

    preprocess([tmp_path / "a.jsonl.gz"], tmp_path / "jsonl_gz", progress=False)
    preprocess([tmp_path / "a.parquet"], tmp_path / "parquet", json_key="content", progress=False)
    preprocess([tmp_path / "a.parquet.gz"], tmp_path / "parquet_gz", json_key="content", progress=False)
    preprocess([str(tmp_path / "doc*.txt")], tmp_path / "files", progress=False)  # a glob, one document per file
    preprocess([tmp_path / "lines.txt.gz"], tmp_path / "lines", text_split="line", progress=False)
    for name in ("jsonl_gz", "parquet", "parquet_gz", "files"):
        assert corpus_documents(tmp_path / name) == want, name
    assert corpus_documents(tmp_path / "lines") == expected_ids([d.replace("\n", " ") for d in docs])


def test_paragraphs_and_several_inputs_in_order(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first para\nline two\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", ["after the text file"])
    preprocess([tmp_path / "p.txt", tmp_path / "b.jsonl"], tmp_path / "out", text_split="paragraph", progress=False)
    assert corpus_documents(tmp_path / "out") == expected_ids(
        ["first para\nline two", "second para", "third", "after the text file"]
    )


def test_sidecar_records_the_tokenizer_and_counts(tmp_path: Path) -> None:
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)], tmp_path / "out", progress=False)
    sidecar = read_sidecar(tmp_path / "out")
    assert sidecar is not None
    assert sidecar["tokenizer"]["sha256"] == LLAMA3.sha256
    assert sidecar["tokenizer"]["eod_token"] == "<|end_of_text|>"
    assert sidecar["special_tokens_added"] == ["<|begin_of_text|>"]
    assert (sidecar["documents"], sidecar["tokens"], sidecar["max_token_id"]) == (
        summary.documents,
        summary.tokens,
        summary.max_token_id,
    )
    # A .bin replaced by another of a different size makes the sidecar stale: ignored, not trusted.
    with open(tmp_path / "out.bin", "ab") as fh:
        fh.write(b"\0\0\0\0")
    assert read_sidecar(tmp_path / "out") is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"text": "ok"\n', r"in\.jsonl:3: invalid JSON"),
        (b'{"body": "no text key"}\n', r"in\.jsonl:3: no key 'text'"),
        (b'{"text": 42}\n', r"in\.jsonl:3: the value of 'text' is int, not a string"),
        (b'{"text": "bad \xff byte"}\n', r"in\.jsonl:3: invalid UTF-8"),
    ],
)
def test_bad_line_is_named_or_skipped(tmp_path: Path, line: bytes, problem: str) -> None:
    good = b'{"text": "one"}\n{"text": "two"}\n'
    (tmp_path / "in.jsonl").write_bytes(good + line + b'{"text": "four"}\n')
    with pytest.raises(CorpusInputError, match=problem + r".*--skip-bad-lines"):
        preprocess([tmp_path / "in.jsonl"], tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out*")), "a failed run leaves nothing behind"
    summary = preprocess([tmp_path / "in.jsonl"], tmp_path / "out", skip_bad_lines=True, progress=False)
    assert (summary.documents, summary.skipped_lines) == (3, 1)
    assert corpus_documents(tmp_path / "out") == expected_ids(["one", "two", "four"])


def test_missing_key_in_first_record_is_found_before_tokenizing(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", ["x"], key="content")
    with pytest.raises(CorpusInputError, match=r"in\.jsonl:1: no key 'text' \(choose the text field with --json-key"):
        preprocess([tmp_path / "in.jsonl"], tmp_path / "out", progress=False)


def test_bad_inputs_and_outputs_are_refused_before_work(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "in.jsonl", ["x"])
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(inputs=[tmp_path / "gone.jsonl"]), r"Input file .*gone\.jsonl does not exist"),
        (dict(inputs=[str(tmp_path / "*.parquet")]), r"Input glob .* matches no file"),
        (dict(inputs=[tmp_path]), r"is a directory: give its files or a glob"),
        (dict(inputs=[]), r"No input given"),
        (dict(output_prefix=tmp_path / "no" / "such" / "dir" / "out"), r"Output directory .* does not exist"),
        (dict(workers=0), r"workers must be >= 1"),
    ]
    (tmp_path / "notes.xyz").write_text("x")
    cases.append((dict(inputs=[tmp_path / "notes.xyz"]), r"Cannot tell the format of .*notes\.xyz"))
    for overrides, message in cases:
        kwargs: dict[str, Any] = dict(inputs=[good], output_prefix=tmp_path / "out", progress=False)
        kwargs.update(overrides)
        with pytest.raises(CorpusInputError, match=message):
            preprocess(kwargs.pop("inputs"), kwargs.pop("output_prefix"), **kwargs)
    with pytest.raises(FileNotFoundError, match=r"Tokenizer .*nope.* not found.*hf download"):
        preprocess([good], tmp_path / "out", tokenizer=str(tmp_path / "nope"), progress=False)
    with pytest.raises(ValueError, match=r"End-of-document token '<eod>' is not in the tokenizer"):
        preprocess([good], tmp_path / "out", eod_token="<eod>", progress=False)


def test_no_tokens_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    with pytest.raises(CorpusInputError, match=r"gave no tokens \(2 documents\); nothing was written"):
        preprocess([tmp_path / "in.jsonl"], tmp_path / "out", add_special_tokens=False, progress=False)
    assert not list(tmp_path.glob("out*"))


def test_existing_output_is_kept_unless_overwrite_and_a_failed_overwrite_keeps_it(tmp_path: Path) -> None:
    preprocess([write_jsonl(tmp_path / "a.jsonl", ["old corpus"])], tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out*")}
    assert set(before) == {"out.bin", "out.idx", "out.corpus.json"}
    with pytest.raises(CorpusInputError, match=r"already exists; .*--overwrite"):
        preprocess([tmp_path / "a.jsonl"], tmp_path / "out", progress=False)
    # An overwrite that fails half-way (a bad line late in the input) leaves the old corpus as it was.
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "new"}\n' * 3000 + b"not json\n")
    with pytest.raises(CorpusInputError, match=r"b\.jsonl:3001: invalid JSON"):
        preprocess([tmp_path / "b.jsonl"], tmp_path / "out", overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out*")} == before
    preprocess([write_jsonl(tmp_path / "c.jsonl", ["new corpus"])], tmp_path / "out", overwrite=True, progress=False)
    assert corpus_documents(tmp_path / "out") == expected_ids(["new corpus"])


@pytest.mark.multiprocess
def test_interrupted_run_leaves_no_corpus(tmp_path: Path) -> None:
    """A run killed mid-way (SIGKILL: no cleanup at all) leaves only .tmp files, never <prefix>.idx."""
    big = write_jsonl(tmp_path / "big.jsonl", ["some text " * 200] * 20000)
    script = (
        "import sys; from lightning_llama_fp8.data.preprocess import preprocess\n"
        f"preprocess([{str(big)!r}], {str(tmp_path / 'out')!r}, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    tmp_bin = tmp_path / "out.bin.tmp"
    for _ in range(600):  # wait until it is writing
        if tmp_bin.exists() and tmp_bin.stat().st_size > 0:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out.idx").exists()
    assert not (tmp_path / "out.bin").exists()
    # The next run starts clean over the leftovers.
    preprocess([write_jsonl(tmp_path / "small.jsonl", ["x"])], tmp_path / "out", progress=False)
    assert corpus_documents(tmp_path / "out") == expected_ids(["x"])
