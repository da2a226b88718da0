"""The corpus files (data/corpus.py): the token dtypes and their codes in Megatron's index, the content fingerprint,
the kinds of corpus, the loss mask of a chat corpus and the sidecar's binding to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import DType

from lightning_llama_fp8.data import corpus
from tests.helpers.corpora import megatron_corpus


def test_dtype_codes_match_megatron() -> None:
    for dtype, code in corpus.DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    for vocab in (1000, 65499, 65500, 128257):
        assert corpus.token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_fingerprint_follows_the_contents_not_the_path_or_file_times(tmp_path: Path) -> None:
    megatron_corpus(tmp_path / "a", [[1, 2, 3], [4, 5]])
    for ext in (".bin", ".idx"):
        shutil.copyfile(tmp_path / f"a{ext}", tmp_path / f"copy{ext}")
    assert corpus.corpus_fingerprint(tmp_path / "a") == corpus.corpus_fingerprint(tmp_path / "copy")
    megatron_corpus(tmp_path / "copy", [[1, 2, 3], [4, 6]])  # the same sizes and index, one token changed
    assert corpus.corpus_fingerprint(tmp_path / "a") != corpus.corpus_fingerprint(tmp_path / "copy")


# ---------------------------------------------------------------------------------------------------- kinds, masks
def chat_corpus(prefix: Path) -> Path:
    """A small chat corpus from llama-fp8 preprocess --chat."""
    from lightning_llama_fp8.data.preprocess import preprocess_chat

    records = [
        {"prompt": "Sort: 3 1 2", "response": "1 2 3", "system": "You sort numbers."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
    ] * 3
    source = prefix.parent / f"{prefix.name}.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    preprocess_chat([source], prefix, max_seq_length=64, progress=False)
    return prefix


def test_the_loss_mask_is_read_as_megatron_reads_the_tokens(tmp_path: Path) -> None:
    """LossMask(prefix).get(i, offset, length) lines up with IndexedDataset.get(i, offset, length): element j of the
    mask belongs to token element j of the .bin."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = chat_corpus(tmp_path / "c")
    dataset, mask = IndexedDataset(str(prefix), mmap=True), corpus.LossMask(prefix)
    assert len(mask) == len(dataset) == 6
    eot = 128009
    for i in range(len(dataset)):
        tokens, learned = dataset.get(i), mask.get(i)
        assert len(tokens) == len(learned) and learned.dtype == numpy.uint8
        assert tokens[-1] == eot and learned[-1] == 1  # every conversation here ends with an answer's end of turn
        assert learned[0] == 0  # the BOS
        for offset, length in ((0, 4), (5, 3), (len(tokens) - 2, None)):
            assert len(mask.get(i, offset, length)) == len(dataset.get(i, offset, length))
            assert (mask.get(i, offset, length) == learned[offset : None if length is None else offset + length]).all()
    all_tokens = numpy.fromfile(f"{prefix}.bin", dtype=numpy.int32)
    all_mask = numpy.fromfile(corpus.loss_mask_path(prefix), dtype=numpy.uint8)
    assert len(all_tokens) == len(all_mask)
    starts = dataset.index.sequence_pointers // 4
    assert (all_mask[starts[3] : starts[3] + len(dataset.get(3))] == mask.get(3)).all()
    (tmp_path / "c.loss_mask.bin").write_bytes(all_mask[:-1].tobytes())
    with pytest.raises(corpus.CorpusInputError, match=r"c\.loss_mask\.bin has [\d,]+ bytes for the [\d,]+ tokens"):
        corpus.LossMask(prefix)
    with pytest.raises(corpus.CorpusInputError, match=r"has no loss mask .*only chat corpora have one"):
        corpus.LossMask(megatron_corpus(tmp_path / "m", [[1, 2, 3]]))


def test_the_binding_covers_the_loss_mask_and_the_kind(tmp_path: Path) -> None:
    prefix = chat_corpus(tmp_path / "c")
    assert corpus.corpus_kind(prefix) == "chat"
    mask_file = corpus.loss_mask_path(prefix)
    original = mask_file.read_bytes()
    flipped = bytearray(original)
    flipped[5] ^= 1  # one token's mask, same size
    mask_file.write_bytes(bytes(flipped))
    found = corpus.check_sidecar(prefix)
    assert found.sidecar is None and "does not match the corpus files" in (found.problem or "")
    mask_file.unlink()
    found = corpus.check_sidecar(prefix)
    assert found.sidecar is None and "its loss mask" in (found.problem or "") and "is missing" in (found.problem or "")
    with pytest.raises(corpus.CorpusInputError, match=r"cannot be used for fine-tuning: .*its loss mask .* missing"):
        corpus.require_corpus_kind(prefix, "chat")
    mask_file.write_bytes(original)
    assert corpus.check_sidecar(prefix).sidecar is not None
    sidecar = json.loads(corpus.sidecar_path(prefix).read_text())
    sidecar["kind"] = "text"  # a chat corpus passed off as a text corpus
    corpus.sidecar_path(prefix).write_text(json.dumps(sidecar))
    assert corpus.check_sidecar(prefix).sidecar is None


def test_sidecars_of_the_first_binding_scheme_stay_trusted_as_text(tmp_path: Path) -> None:
    """Text corpora made before kinds (sidecar version 2, binding scheme v1) keep their trusted sidecar."""
    from lightning_llama_fp8.data.preprocess import preprocess
    from tests.helpers.corpora import write_jsonl

    prefix = tmp_path / "old"
    preprocess([write_jsonl(tmp_path / "in.jsonl", ["made before kinds"])], prefix, progress=False)
    sidecar = json.loads(corpus.sidecar_path(prefix).read_text())
    del sidecar["kind"]
    sidecar["version"] = 2
    binding = {
        key: sidecar["binding"][key]
        for key in ("bin_bytes", "idx_bytes", "bin_sample_blocks", "bin_sample_block_bytes")
    }
    binding["scheme"] = corpus.BINDING_SCHEME_V1
    binding["sha256"] = corpus._binding_digest(sidecar, binding, corpus.bin_path(prefix), corpus.idx_path(prefix))
    sidecar["binding"] = binding
    corpus.sidecar_path(prefix).write_text(json.dumps(sidecar))
    assert corpus.check_sidecar(prefix).sidecar is not None
    assert corpus.corpus_kind(prefix) == "text"
    assert corpus.require_corpus_kind(prefix, "text") is not None
    sidecar["kind"] = "chat"  # the first scheme never described a chat corpus
    corpus.sidecar_path(prefix).write_text(json.dumps(sidecar))
    assert corpus.check_sidecar(prefix).sidecar is None


def test_each_data_module_gets_its_kind_of_corpus(tmp_path: Path) -> None:
    chat = chat_corpus(tmp_path / "c")
    megatron = megatron_corpus(tmp_path / "m", [[1, 2, 3]])  # Megatron-LM's tools: no sidecar, text
    assert corpus.require_corpus_kind(chat, "chat") is not None
    assert corpus.require_corpus_kind(megatron, "text") is None
    assert corpus.corpus_kind(megatron) is None
    with pytest.raises(corpus.CorpusInputError, match=r"is a chat corpus .*Train it with the fine-tuning \(SFT\)"):
        corpus.require_corpus_kind(chat, "text")
    with pytest.raises(corpus.CorpusInputError, match=r"cannot be used for fine-tuning: there is no .*m\.corpus\.json"):
        corpus.require_corpus_kind(megatron, "chat")
    with pytest.raises(ValueError, match=r"kind must be 'text' or 'chat'; got 'sft'"):
        corpus.require_corpus_kind(chat, "sft")
    names = {path.name for path in corpus.output_files(tmp_path / "c")}
    assert {"c.loss_mask.bin", "c.loss_mask.bin.tmp", "c.lock"} <= names
