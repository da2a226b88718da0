"""``llama-fp8 preprocess`` (cli/preprocess.py): the command line around data/preprocess.py, text and --chat."""

from __future__ import annotations

import gzip
import json
import re
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


def test_chat_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main
    from lightning_llama_fp8.data.corpus import require_corpus_kind

    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"prompt": "Sort: 2 1", "response": "1 2", "system": "You sort."},
        {"prompt": "word " * 100, "response": "too long"},
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = ["preprocess", "--chat", "--input", str(source), "--output-prefix", str(tmp_path / "sft"), "--no-progress"]
    assert main([*argv, "--max-seq-length", "64", "--too-long", "drop"]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'sft'}.bin/.idx/.loss_mask.bin: 2 conversations, " in out
    assert "answer tokens" in out and "1 longer than 64 tokens (--too-long drop): 1 dropped" in out
    sidecar = require_corpus_kind(tmp_path / "sft", "chat")
    assert sidecar is not None and sidecar["chat_template"]["source"].startswith("built-in Llama 3 template")
    (tmp_path / "qa.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}"
    )
    argv = [*argv[:-2], str(tmp_path / "own"), "--max-seq-length", "200", "--too-long", "truncate"]
    assert main([*argv, "--chat-template", str(tmp_path / "qa.jinja"), "--no-progress"]) == 0
    assert "3 conversations" in capsys.readouterr().out
    own = require_corpus_kind(tmp_path / "own", "chat")
    assert own is not None and own["chat_template"]["source"] == str(tmp_path / "qa.jinja")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chat"], r"--chat needs --max-seq-length N: the training sequence length"),
        (["--chat", "--max-seq-length", "64", "--json-key", "x"], r"--json-key: for text corpora only"),
        (["--chat", "--max-seq-length", "64", "--no-append-eod"], r"--append-eod/--no-append-eod: for text corpora"),
        (["--chat", "--max-seq-length", "64", "--input-format", "text"], r"--chat reads JSON Lines or Parquet"),
        (["--chat", "--max-seq-length", "0"], r"argument --max-seq-length: the value must be a whole number >= 1"),
        (["--too-long", "truncate"], r"--too-long: for --chat only; add --chat"),
        (["--max-seq-length", "64"], r"--max-seq-length: for --chat only"),
    ],
)
def test_chat_options_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from lightning_llama_fp8.cli import main

    source = write_jsonl(tmp_path / "in.jsonl", ["x"])
    with pytest.raises(SystemExit) as stop:
        main(["preprocess", "--input", str(source), "--output-prefix", str(tmp_path / "out"), *flags])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("out*"))


def test_bad_conversation_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main

    (tmp_path / "in.jsonl").write_text(
        '{"prompt": "q", "response": "a"}\n{"messages": [{"role": "tool", "content": "4"}]}\n'
    )
    argv = ["preprocess", "--chat", "--max-seq-length", "64", "--input", str(tmp_path / "in.jsonl")]
    assert main([*argv, "--output-prefix", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: message 1 is a tool result (role 'tool'): tool use is not supported" in err
    assert "Traceback" not in err
