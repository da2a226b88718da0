"""``llama-fp8 preprocess`` (cli/preprocess.py): the command line around data/preprocess.py."""

from __future__ import annotations

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
