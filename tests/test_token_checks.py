"""A corpus that the model's vocabulary or the configured tokenizer cannot read is refused before anything is built."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from lightning_llama_fp8 import IndexedDataModule
from lightning_llama_fp8.cli import main as cli_main
from lightning_llama_fp8.data import check_corpus, check_token_ids, resolve_tokenizer
from lightning_llama_fp8.data import indexed as indexed_module
from lightning_llama_fp8.data.preprocess import preprocess
from tests.helpers.corpora import write_jsonl

LLAMA3_VOCAB = 128256  # model.arch.vocab_size of every Llama 3 preset
IMAGE = 128256  # <|image|>: in the Llama 3.2 tokenizer.json, one past the text models' vocabulary


def megatron_corpus(prefix: Path, documents: list[list[int]]) -> Path:
    """A corpus as Megatron-LM's tools write it: no sidecar."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for ids in documents:
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_sidecar_gives_the_largest_id_without_reading_the_tokens(tmp_path: Path) -> None:
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", ["hello world", "more text"])], tmp_path / "c")
    info = check_token_ids(check_corpus(str(tmp_path / "c")), LLAMA3_VOCAB, resolve_tokenizer("llama3").sha256)
    assert (info.max_token_id, info.max_token_id_from) == (summary.max_token_id, "sidecar")
    assert info.tokenizer_sha256 == resolve_tokenizer("llama3").sha256


def test_image_token_in_text_is_past_the_vocabulary(tmp_path: Path) -> None:
    """Real case: the Llama 3.2 tokenizer turns the literal text ``<|image|>`` into id 128256."""
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["a caption <|image|> here"])], tmp_path / "c")
    data = IndexedDataModule(str(tmp_path / "c"), vocab_size=LLAMA3_VOCAB)
    with pytest.raises(ValueError, match=rf"holds token id {IMAGE}, but the vocabulary has {LLAMA3_VOCAB} ids"):
        data.check_files()
    # The same corpus fits a vocabulary one larger.
    assert IndexedDataModule(str(tmp_path / "c"), vocab_size=IMAGE + 1).check_files()[0].max_token_id == IMAGE


def test_corpus_without_sidecar_is_scanned(tmp_path: Path) -> None:
    prefix = str(megatron_corpus(tmp_path / "m", [[1, 2, 3], [140000, 5]]))
    info = check_token_ids(check_corpus(prefix), 200000)
    assert (info.max_token_id, info.max_token_id_from) == (140000, "scan")
    with pytest.raises(ValueError, match="holds token id 140000"):
        check_token_ids(check_corpus(prefix), LLAMA3_VOCAB)


def test_stale_sidecar_is_not_trusted(tmp_path: Path) -> None:
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["short"])], tmp_path / "c")
    sidecar = (tmp_path / "c.corpus.json").read_text()
    megatron_corpus(tmp_path / "c", [[7, 150000]])  # the files replaced; the old sidecar left behind
    (tmp_path / "c.corpus.json").write_text(sidecar)
    info = check_token_ids(check_corpus(str(tmp_path / "c")), 200000)
    assert (info.max_token_id, info.max_token_id_from) == (150000, "scan")


def test_corpus_past_the_scan_limit_is_logged_unchecked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prefix = str(megatron_corpus(tmp_path / "m", [[1, 140000]]))
    info = check_token_ids(check_corpus(prefix), LLAMA3_VOCAB, scan_limit_gib=0)
    assert (info.max_token_id, info.max_token_id_from) == (None, "unchecked")
    with pytest.warns(UserWarning, match=r"unchecked against vocab_size 128256.*token_scan_limit_gib"):
        IndexedDataModule(prefix, token_scan_limit_gib=0).check_files()


def test_scan_of_one_gib_is_fast(tmp_path: Path) -> None:
    """The measurement behind the default ``token_scan_limit_gib``: one GiB of int32 tokens scanned.

    The file was just written, so this reads the page cache (0.04 s on the 2-core CI machine); from a cold disk the
    scan runs at the disk's read speed.
    """
    tokens = numpy.memmap(tmp_path / "big.bin", dtype=numpy.int32, mode="w+", shape=(2**28,))
    tokens[:] = 5
    tokens[-1] = 128000
    tokens.flush()
    del tokens
    megatron_corpus(tmp_path / "idx", [[1]])
    os.replace(tmp_path / "idx.idx", tmp_path / "big.idx")  # the scan reads the .bin only
    start = time.perf_counter()
    largest = indexed_module._scan_max_token_id(str(tmp_path / "big"), "int32")
    seconds = time.perf_counter() - start
    assert largest == 128000
    logging.getLogger(__name__).info("1 GiB token scan: %.2f s", seconds)
    assert seconds < 30, f"scanning 1 GiB took {seconds:.1f} s: lower DEFAULT_TOKEN_SCAN_LIMIT_GIB"


def test_other_tokenizer_is_refused(tmp_path: Path) -> None:
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["hello"])], tmp_path / "c")
    other = json.loads(resolve_tokenizer("llama3").path.read_text())
    other["added_tokens"][-1]["content"] = "<|another_tokenizer|>"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"was made with tokenizer 'llama3'.*not the one data.tokenizer names"):
        IndexedDataModule(str(tmp_path / "c"), tokenizer=str(tmp_path / "other")).check_files()
    assert IndexedDataModule(str(tmp_path / "c"), tokenizer="llama3").check_files()[0].tokenizer_name == "llama3"


def test_fit_preflight_refuses_out_of_vocabulary_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = megatron_corpus(tmp_path / "m", [[1, 2, 3] * 50, [LLAMA3_VOCAB + 3] * 40] * 4)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  max_steps: 200\n  devices: 1\n"
        "  strategy:\n    class_path: lightning_llama_fp8.MegatronCPStrategy\n"
        "model:\n  arch: llama3_2_1b\n"
        "data:\n  class_path: lightning_llama_fp8.IndexedDataModule\n  init_args:\n"
        f"    data_path: [{prefix}]\n    seq_length: 8192\n    global_batch_size: 2\n    micro_batch_size: 1\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"Not training: Corpus '{prefix}' holds token id {LLAMA3_VOCAB + 3}" in err
