"""IndexedDataModule over real Megatron corpora (``.bin``/``.idx`` written by megatron-core's own builder), on CPU;
corpora that the model's vocabulary or the configured tokenizer cannot read are refused before anything is built."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from lightning_llama_fp8 import IndexedDataModule
from lightning_llama_fp8.data import check_corpus, check_token_ids, parse_data_path, resolve_tokenizer
from lightning_llama_fp8.data import corpus as corpus_module
from lightning_llama_fp8.data import indexed as indexed_module
from lightning_llama_fp8.data.corpus import check_sidecar
from lightning_llama_fp8.data.preprocess import preprocess
from tests.helpers import REPO_ROOT
from tests.helpers.corpora import LLAMA3_VOCAB, megatron_corpus, write_corpus, write_jsonl
from tests.helpers.models import Recorder
from tests.helpers.trainers import cpu_trainer

SEQ, VOCAB, GBS, MBS = 64, 1000, 4, 2


def module(data_path: Any, **overrides: Any) -> IndexedDataModule:
    kwargs: dict[str, Any] = dict(
        seq_length=SEQ,
        vocab_size=VOCAB,
        global_batch_size=GBS,
        micro_batch_size=MBS,
        train_samples=16 * GBS,
        val_samples=2 * GBS,
        split="90,10,0",
        num_workers=0,
    )
    return IndexedDataModule(data_path, **{**kwargs, **overrides})


def test_samples_are_consecutive_corpus_tokens(corpora: dict[str, Any]) -> None:
    data = module([corpora["low"]])
    data.setup("fit")
    stream = torch.cat(corpora["low_docs"]).tolist()
    text = " ".join(map(str, stream))
    batches = list(data.train_dataloader())
    assert len(batches) == 16
    for batch in batches:
        assert batch["tokens"].shape == (GBS // MBS, MBS, SEQ)
        tokens, labels = batch["tokens"].reshape(-1, SEQ), batch["labels"].reshape(-1, SEQ)
        assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
        assert torch.equal(batch["position_ids"][0, 0], torch.arange(SEQ))
        assert bool((batch["loss_mask"] == 1).all())
        for sample in tokens:  # documents are concatenated in some shuffled order; each window is a real run
            window = sample[:8].tolist()
            assert int(sample.max()) < 100
            assert " ".join(map(str, window)) in text or _spans_documents(window, corpora["low_docs"])


def _spans_documents(window: list[int], docs: list[torch.Tensor]) -> bool:
    """A window may cross from the end of one (shuffled) document into the start of another."""
    for cut in range(1, len(window)):
        head, tail = window[:cut], window[cut:]
        ends = any(doc[-len(head) :].tolist() == head for doc in docs)
        starts = any(doc[: len(tail)].tolist() == tail for doc in docs)
        if ends and starts:
            return True
    return False


def test_same_seed_same_batches_other_seed_other_batches(corpora: dict[str, Any]) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        data = module([corpora["low"]], seed=seed)
        data.setup("fit")
        return next(iter(data.train_dataloader()))["tokens"]

    assert torch.equal(first_batch(7), first_batch(7))
    assert not torch.equal(first_batch(7), first_batch(8))


def test_blend_weights_decide_the_mix(corpora: dict[str, Any]) -> None:
    data = module(f"1 {corpora['low']} 3 {corpora['high']}", train_samples=200)  # Megatron-LM's string form
    data.setup("fit")
    from_high = [bool(data.train_dataset[i]["tokens"].min() >= 500) for i in range(200)]
    assert 0.65 < sum(from_high) / 200 < 0.85  # 3:1 blend


def test_validation_split_holds_other_documents(corpora: dict[str, Any]) -> None:
    data = module([corpora["low"]])
    data.setup("fit")
    train = {tuple(data.train_dataset[i]["tokens"][:16].tolist()) for i in range(len(data.train_dataset))}
    val = {tuple(data.val_dataset[i]["tokens"][:16].tolist()) for i in range(len(data.val_dataset))}
    assert len(data.val_dataset) == 2 * GBS and train.isdisjoint(val)


def test_parse_data_path_forms() -> None:
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["a"]) == (["a"], None)
    with pytest.raises(ValueError, match="data_path is empty"):
        parse_data_path([])
    # megatron-core's BlendedDataset asserts (no message) on a zero weight
    for weights in ("0 a 1 b", "-1 a 2 b"):
        with pytest.raises(ValueError, match=r"weights must be positive.*leave a corpus out"):
            parse_data_path(weights)


@pytest.mark.parametrize("damage", ["no_idx", "no_bin", "header", "truncated_bin", "truncated_idx"])
def test_damaged_corpus_is_refused_before_building(corpora: dict[str, Any], tmp_path: Path, damage: str) -> None:
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(corpora["low"] + ext, f"{prefix}{ext}")
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    expected: tuple[type[Exception], str]
    if damage == "no_idx":
        idx.unlink()
        expected = (FileNotFoundError, r"copy\.idx not found\. A corpus is <prefix>\.bin \+ <prefix>\.idx")
    elif damage == "no_bin":
        bin_.unlink()
        expected = (FileNotFoundError, r"copy\.bin not found")
    elif damage == "header":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
        expected = (ValueError, "is not a Megatron index file")
    elif damage == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:1000])
        expected = (ValueError, r"copy\.bin has 1000 bytes but its index needs \d+ \(truncated copy\?\)")
    else:
        idx.write_bytes(idx.read_bytes()[:40])
        expected = (ValueError, r"copy\.idx cannot be read")
    with pytest.raises(expected[0], match=expected[1]):
        check_corpus(str(prefix))
    with pytest.raises(expected[0], match=expected[1]):
        module([str(prefix)]).setup("fit")


def test_split_without_documents_is_refused(tmp_path: Path) -> None:
    write_corpus(tmp_path / "tiny", 3, 0, 100)
    with pytest.raises(
        ValueError,
        match=r"Corpus .*tiny' \(3 sequences in 3 documents; megatron-core splits by sequence\): "
        r"Split '90,10,0' over 3 seq",
    ):
        module([str(tmp_path / "tiny")]).setup("fit")


def test_cli_accepts_indexed_data_in_yaml(corpora: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    config = REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml"
    args = ["fit", "--config", str(config), "--data", "lightning_llama_fp8.IndexedDataModule"]
    args += ["--data.data_path", f"[{corpora['low']}]", "--print_config"]
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    assert excinfo.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_llama_fp8.IndexedDataModule" in out or "IndexedDataModule" in out
    assert corpora["low"] in out


def test_yaml_weights_may_be_numbers(
    corpora: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data_path: [0.7, prefix, 0.3, prefix]`` in YAML: the weights arrive as floats and still parse."""
    from lightning_llama_fp8.cli import main

    extra = tmp_path / "data.yaml"
    extra.write_text(
        "data:\n  class_path: lightning_llama_fp8.IndexedDataModule\n  init_args:\n"
        f"    data_path: [0.25, {corpora['low']}, 0.75, {corpora['high']}]\n"
    )
    config = REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--config", str(extra), "--print_config"])
    assert "- 0.25" in capsys.readouterr().out
    assert parse_data_path([0.25, corpora["low"], 0.75, corpora["high"]]) == (
        [corpora["low"], corpora["high"]],
        [0.25, 0.75],
    )


def test_corpus_without_tokens_is_refused(tmp_path: Path) -> None:
    # megatron-core's GPTDataset would loop forever looking for tokens in it. (An empty .bin already fails to
    # memory-map; the token count is checked as well, for index layouts that map.)
    builder = IndexedDatasetBuilder(f"{tmp_path / 'blank'}.bin", dtype=numpy.int32)
    for _ in range(3):
        builder.add_document(torch.zeros(0, dtype=torch.int32), [0])
    builder.finalize(f"{tmp_path / 'blank'}.idx")
    with pytest.raises(ValueError, match=r"Corpus '.*blank': .*(cannot mmap an empty file|holds no tokens)"):
        check_corpus(str(tmp_path / "blank"))


def test_cache_path_that_is_a_file_is_refused(corpora: dict[str, Any], tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(ValueError, match=r"path_to_cache .*cache is a file; give a directory"):
        IndexedDataModule(data_path=corpora["low"], path_to_cache=str(file))


@pytest.mark.parametrize(
    "data_path,expected",
    [
        ([0.5, "a", "b"], "mixes weights and prefixes"),
        (["a", 0.5], "mixes weights and prefixes"),
        ([float("nan"), "a"], "must be positive and finite"),
        (["inf", "a"], "must be positive and finite"),
        ([-1, "a", 2, "b"], "must be positive and finite"),
        (["a", ""], "empty entry"),
        (5, "must be a list or a string"),
    ],
)
def test_odd_data_paths_get_one_sentence(data_path: Any, expected: str) -> None:
    from lightning_llama_fp8.data import parse_data_path

    with pytest.raises(ValueError, match=expected):
        parse_data_path(data_path)


IMAGE = 128256  # <|image|>: in the Llama 3.2 tokenizer.json, one past the text models' vocabulary


def test_sidecar_gives_the_largest_id_without_reading_the_tokens(tmp_path: Path) -> None:
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", ["hello world", "more text"])], tmp_path / "c")
    info = check_token_ids(check_corpus(str(tmp_path / "c")), LLAMA3_VOCAB, resolve_tokenizer("llama3").sha256)
    assert (info.max_token_id, info.max_token_id_from) == (summary.max_token_id, "sidecar")
    assert info.tokenizer_sha256 == resolve_tokenizer("llama3").sha256


def test_image_token_in_text_is_text_unless_parsing_was_asked(tmp_path: Path) -> None:
    """Real case: the Llama 3.2 tokenizer reads the literal text ``<|image|>`` as id 128256 when asked to."""
    text = write_jsonl(tmp_path / "in.jsonl", ["a caption <|image|> here"])
    preprocess([text], tmp_path / "c", progress=False)
    info = IndexedDataModule(str(tmp_path / "c"), vocab_size=LLAMA3_VOCAB).check_files()[0]
    assert info.max_token_id == 128001 and info.parse_special_tokens is False  # <|end_of_text|>: text stays text

    preprocess([text], tmp_path / "parsed", parse_special_tokens=True, progress=False)
    data = IndexedDataModule(str(tmp_path / "parsed"), vocab_size=LLAMA3_VOCAB)
    with pytest.raises(
        ValueError,
        match=rf"holds token id {IMAGE}, but the vocabulary has {LLAMA3_VOCAB} ids.*made with --parse-special-tokens",
    ):
        data.check_files()
    # The same corpus fits a vocabulary one larger.
    assert IndexedDataModule(str(tmp_path / "parsed"), vocab_size=IMAGE + 1).check_files()[0].max_token_id == IMAGE


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
    tokens[7] = 1
    tokens.flush()
    del tokens
    megatron_corpus(tmp_path / "idx", [[1]])
    os.replace(tmp_path / "idx.idx", tmp_path / "big.idx")  # the scan reads the .bin only
    start = time.perf_counter()
    smallest, largest = indexed_module._scan_token_range(str(tmp_path / "big"), "int32")
    seconds = time.perf_counter() - start
    assert (smallest, largest) == (1, 128000)
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


def _edit_sidecar(prefix: Path, **changes: Any) -> None:
    path = Path(f"{prefix}.corpus.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def test_edited_sidecar_is_not_trusted(tmp_path: Path) -> None:
    """Issue 30: a sidecar whose sizes match but whose max_token_id was edited let a vocab-1024 model train on ids up
    to 128,001. The binding covers the claims: the sidecar is ignored and the .bin read instead."""
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["hello world", "more text"])], tmp_path / "c", progress=False)
    _edit_sidecar(tmp_path / "c", max_token_id=500)
    with (
        pytest.warns(
            UserWarning, match=r"ignoring its sidecar: .*c\.corpus\.json does not match .* or the sidecar was edited"
        ),
        pytest.raises(ValueError, match=r"holds token id 128001, but the vocabulary has 1024 ids"),
    ):
        IndexedDataModule(str(tmp_path / "c"), vocab_size=1024).check_files()


def test_sidecar_of_other_files_of_the_same_size_is_not_trusted(tmp_path: Path) -> None:
    """The files replaced by a corpus of the same sizes (same document lengths, other ids): the .bin sample differs."""
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["short text", "another one"])], tmp_path / "c", progress=False)
    documents = [doc.tolist() for doc in IndexedDataset(str(tmp_path / "c"), mmap=True)]
    sizes = [os.path.getsize(tmp_path / f"c{ext}") for ext in (".bin", ".idx")]
    megatron_corpus(tmp_path / "c", [[150000 + i for i in range(len(doc))] for doc in documents])
    assert [os.path.getsize(tmp_path / f"c{ext}") for ext in (".bin", ".idx")] == sizes
    found = check_sidecar(tmp_path / "c")
    assert found.sidecar is None and "the files were replaced" in (found.problem or "")
    with pytest.warns(UserWarning, match="ignoring its sidecar"):
        info = check_token_ids(check_corpus(str(tmp_path / "c")), 200000)
    longest = max(map(len, documents))
    assert (info.max_token_id, info.max_token_id_from, info.tokenizer_sha256) == (150000 + longest - 1, "scan", None)


def test_copied_corpus_keeps_its_sidecar(tmp_path: Path) -> None:
    """The binding is over contents, not file times: a plain copy (new mtimes) is still described by its sidecar."""
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", ["copied"])], tmp_path / "c", progress=False)
    (tmp_path / "elsewhere").mkdir()
    for ext in (".bin", ".idx", ".corpus.json"):
        shutil.copyfile(tmp_path / f"c{ext}", tmp_path / "elsewhere" / f"c{ext}")
    info = check_token_ids(check_corpus(str(tmp_path / "elsewhere" / "c")), LLAMA3_VOCAB)
    assert (info.max_token_id, info.max_token_id_from) == (summary.max_token_id, "sidecar")


def test_large_bin_is_bound_by_blocks_spread_over_it(tmp_path: Path) -> None:
    """A .bin past 4 MiB is bound by 64 blocks from its first to its last byte: a changed last token is seen."""
    documents = [[7] * 1000] * 2000  # 8 MB of int32
    prefix = megatron_corpus(tmp_path / "big", documents)
    bin_file, idx_file = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    claims = {"max_token_id": 7, "tokens": 2_000_000, "documents": 2000, "dtype": "int32", "tokenizer": None}
    sidecar = {"format": corpus_module.SIDECAR_FORMAT, "version": corpus_module.SIDECAR_VERSION, **claims}
    sidecar["binding"] = corpus_module.corpus_binding(sidecar, bin_file, idx_file)
    assert bin_file.stat().st_size > corpus_module.BIN_SAMPLE_BLOCKS * corpus_module.BIN_SAMPLE_BLOCK_BYTES
    Path(f"{prefix}.corpus.json").write_text(json.dumps(sidecar))
    assert check_sidecar(prefix).sidecar is not None
    tokens = numpy.memmap(bin_file, dtype=numpy.int32, mode="r+")
    tokens[-1] = 200000
    tokens.flush()
    del tokens
    os.utime(bin_file, ns=(1, 1))  # a new file version for the per-process cache
    assert check_sidecar(prefix).sidecar is None
    assert check_token_ids(check_corpus(str(prefix)), 300000).max_token_id == 200000


def test_unbound_sidecar_is_ignored_and_refused_past_the_scan_limit(tmp_path: Path) -> None:
    """A sidecar without a binding (version 1, before issue 30) is not trusted: scanned below the scan limit,
    refused above it (the fix is in the message), unlike a corpus with no sidecar, which is logged unchecked."""
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["old sidecar"])], tmp_path / "c", progress=False)
    sidecar = json.loads((tmp_path / "c.corpus.json").read_text())
    del sidecar["binding"]
    (tmp_path / "c.corpus.json").write_text(json.dumps({**sidecar, "version": 1}))
    with pytest.warns(UserWarning, match=r"ignoring its sidecar: .*is not bound to its files"):
        assert check_token_ids(check_corpus(str(tmp_path / "c")), LLAMA3_VOCAB).max_token_id_from == "scan"
    with pytest.raises(
        ValueError,
        match=r"not bound to its files .*ids are unknown.*token_scan_limit_gib: null .*or delete .*c\.corpus\.json",
    ):
        check_token_ids(check_corpus(str(tmp_path / "c")), LLAMA3_VOCAB, scan_limit_gib=0)


def test_negative_token_id_is_refused(tmp_path: Path) -> None:
    prefix = str(megatron_corpus(tmp_path / "m", [[1, 2, 3], [-5, 9]]))
    with pytest.raises(ValueError, match=r"holds token id -5: token ids cannot be negative"):
        check_token_ids(check_corpus(prefix), LLAMA3_VOCAB)


def test_long_scan_shows_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(indexed_module, "_SCAN_PROGRESS_AFTER_S", 0.0)
    prefix = str(megatron_corpus(tmp_path / "shown", [[1, 2, 3]]))
    assert indexed_module._scan_token_range(prefix, "int32") == (1, 3)
    assert "token ids of shown" in capsys.readouterr().err


def test_a_corpus_re_created_under_its_prefix_gets_its_own_cached_indices(tmp_path: Path) -> None:
    """megatron-core names cached sample indices by path and settings only; the data module adds the contents."""
    cache = tmp_path / "cache"
    write_corpus(tmp_path / "c", 200, 0, 100, seed=0)
    first = module([str(tmp_path / "c")], path_to_cache=str(cache))
    first.setup("fit")
    next(iter(first.train_dataloader()))
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").unlink()
    docs = write_corpus(tmp_path / "c", 60, 500, 600, seed=1)  # fewer, other documents: old indices would overrun
    second = module([str(tmp_path / "c")], path_to_cache=str(cache))
    second.setup("fit")
    batch = next(iter(second.train_dataloader()))
    assert int(batch["tokens"].min()) >= 500  # tokens of the new corpus, cut by its own indices
    assert len(list(cache.iterdir())) == 2 and len(docs) == 60
    again = module([str(tmp_path / "c")], path_to_cache=str(cache))  # the same corpus: the same cache folder
    again.setup("fit")
    assert len(list(cache.iterdir())) == 2


def _corpus_of_sequences(prefix: Path, documents: list[list[int]]) -> str:
    """A corpus whose documents hold ``documents[i]`` sequences (0: an empty document, which preprocess writes for
    an empty text; several: a ``--split-sentences`` corpus), each 40 tokens."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for sequences in documents:
        builder.add_document(torch.randint(3, 100, (40 * len(sequences),), dtype=torch.int32), sequences)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def builder_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron-core's builder raises instead of building: a check that lets a hanging split through fails."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    def build(self: Any) -> None:
        raise AssertionError("megatron-core's builder was reached; with this split it loops forever")

    monkeypatch.setattr(BlendedMegatronDatasetBuilder, "build", build)


def test_empty_documents_count_for_nothing_in_the_split_check(tmp_path: Path, builder_reached: None) -> None:
    # 3 documents with tokens, 97 empty: megatron-core splits the 3 sequences, so validation (10%) gets none and its
    # GPTDataset would loop forever; counting the 100 documents let it through.
    prefix = _corpus_of_sequences(tmp_path / "sparse", [[40]] * 3 + [[]] * 97)
    with pytest.raises(
        ValueError,
        match=r"sparse' \(3 sequences in 100 documents \(an empty document has none\); megatron-core splits by "
        r"sequence\): "
        r"Split '90,10,0' over 3 sequences gives the validation split zero sequences \(sequence range \[3, 3\)",
    ):
        module([prefix]).setup("fit")


def test_sentences_of_few_documents_are_enough_to_split(tmp_path: Path) -> None:
    # A --split-sentences corpus: 3 documents of 10 sequences. Megatron splits the 30 sequences (27/3), so this
    # builds, though 3 documents could not be split 90/10.
    prefix = _corpus_of_sequences(tmp_path / "sentences", [[40] * 10] * 3)
    data = module([prefix], train_samples=2 * GBS, val_samples=GBS)
    data.setup("fit")
    assert (len(data.train_dataset), len(data.val_dataset)) == (2 * GBS, GBS)


def test_split_of_only_empty_sequences_is_refused(tmp_path: Path, builder_reached: None) -> None:
    # Sequences of 0 tokens (another writer's index): the validation range [9, 10) holds no token at all.
    builder = IndexedDatasetBuilder(f"{tmp_path / 'holes'}.bin", dtype=numpy.int32)
    for length in [40] * 9 + [0]:
        builder.add_document(torch.randint(3, 100, (length,), dtype=torch.int32), [length])
    builder.finalize(f"{tmp_path / 'holes'}.idx")
    with pytest.raises(ValueError, match=r"gives the validation split only empty sequences \(sequence range \[9, 10\)"):
        module([str(tmp_path / "holes")]).setup("fit")


def test_split_without_validation_names_the_samples_requested(corpora: dict[str, Any]) -> None:
    with pytest.raises(
        ValueError,
        match=r"weight 0, so megatron-core builds no validation dataset, yet 40 validation samples are requested\. "
        r"Give validation a positive weight in `split`, or set data\.val_samples: 0 or trainer\.limit_val_batches: 0",
    ):
        module([corpora["low"]], split="100,0,0", val_samples=None).setup("fit")


class _Validating(Recorder):
    """Counts its validation steps."""

    def __init__(self, seq_length: int) -> None:
        super().__init__(seq_length)
        self.validation_steps = 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_steps += 1


@pytest.mark.parametrize(
    ("split", "val_samples", "limit_val_batches"),
    [("100,0,0", 0, 1.0), ("90,10,0", 0, 1.0), ("100,0,0", None, 0), ("100,0,0", None, 0.0)],
)
def test_no_validation_samples_means_no_validation(
    corpora: dict[str, Any], split: str, val_samples: int | None, limit_val_batches: float
) -> None:
    """``val_samples: 0`` (the refusal's advice) or ``trainer.limit_val_batches: 0`` fits a model that has a
    validation_step without validating, whatever the split gives validation."""
    model = _Validating(SEQ)
    data = module([corpora["low"]], split=split, val_samples=val_samples, train_samples=None)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=limit_val_batches, val_check_interval=1)
    trainer.fit(model, datamodule=data)
    assert (trainer.global_step, model.validation_steps) == (2, 0)
    assert data.val_dataloader() == []
