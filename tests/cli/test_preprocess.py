"""``llama-fp8 preprocess`` (cli/preprocess.py): the command line around data/preprocess.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tests.helpers.corpora import DOCUMENTS, write_jsonl


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    good = write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)
    assert main(["preprocess", "--input", str(good), "--output-prefix", str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"Wrote {tmp_path / 'out'}.bin/.idx: {len(DOCUMENTS)} documents" in capsys.readouterr().out
    assert main(["preprocess", "--input", str(good), "--output-prefix", str(tmp_path / "out")]) == 2
    assert "llama-fp8 preprocess: Output" in capsys.readouterr().err


def test_damaged_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 5000)[:-30])  # truncated
    assert main(["preprocess", "--input", str(tmp_path / "in.jsonl.gz"), "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "llama-fp8 preprocess: " in err and "in.jsonl.gz: cannot read past line" in err
    assert "Traceback" not in err


def test_parse_special_tokens_is_asked_for_and_recorded(tmp_path: Path) -> None:
    from lightning_llama_fp8.cli import main
    from lightning_llama_fp8.data import read_sidecar

    good = write_jsonl(tmp_path / "in.jsonl", ["a caption <|image|> here"])
    for name, flags in (("text", []), ("parsed", ["--parse-special-tokens"])):
        argv = ["preprocess", "--input", str(good), "--output-prefix", str(tmp_path / name), "--no-progress", *flags]
        assert main(argv) == 0
    text, parsed = read_sidecar(tmp_path / "text"), read_sidecar(tmp_path / "parsed")
    assert text is not None and (text["parse_special_tokens"], text["max_token_id"]) == (False, 128001)
    assert parsed is not None and (parsed["parse_special_tokens"], parsed["max_token_id"]) == (True, 128256)


def test_workers_must_be_a_whole_number_of_at_least_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    good = write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)
    for workers in ("0", "-2", "1.5"):
        with pytest.raises(SystemExit) as stop:
            main(["preprocess", "--input", str(good), "--output-prefix", str(tmp_path / "out"), "--workers", workers])
        assert stop.value.code == 2
        assert f"argument --workers: the value must be a whole number >= 1; got '{workers}'" in capsys.readouterr().err


def test_more_workers_than_cpus_are_cut_to_the_cpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 10000 used to keep 10000 threads' batches in memory (measured on 2 cores, 78 MB of JSON Lines: peak
    RSS 2.77 GB at --workers 512, 0.28 GB at 2); more threads than cores tokenize no faster, so it runs with as many
    threads as cores."""
    from lightning_llama_fp8.cli import main
    from lightning_llama_fp8.data import preprocess as pipeline

    monkeypatch.setattr(pipeline, "usable_cpus", lambda: 3)  # data.preprocess.preprocess cuts --workers
    threads = []
    real_encoded = pipeline._encoded
    monkeypatch.setattr(
        pipeline, "_encoded", lambda b, e, workers: threads.append(workers) or real_encoded(b, e, workers)
    )
    good = write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)
    argv = ["preprocess", "--input", str(good), "--no-progress", "--workers"]
    assert main([*argv, "10000", "--output-prefix", str(tmp_path / "many")]) == 0
    assert "workers (--workers) 10000 is more than the 3 CPU(s) this process may use; tokenizing with 3 thread(s)" in (
        capsys.readouterr().err
    )
    assert main([*argv, "2", "--output-prefix", str(tmp_path / "few")]) == 0
    assert capsys.readouterr().err == ""
    assert threads == [3, 2]
    assert (tmp_path / "many.bin").read_bytes() == (tmp_path / "few.bin").read_bytes()
