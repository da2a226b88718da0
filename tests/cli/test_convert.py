"""``llama-fp8 convert`` (cli/convert.py): a training checkpoint to a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.hf.files import INDEX_FILE


@pytest.mark.multiprocess
def test_convert_cli_writes_the_directory(imported: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    from lightning_llama_fp8.cli import main

    out = tmp_path / "cli_out"
    assert main(["convert", str(imported["ckpt"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Weights: model weights (BF16)" in printed and (out / INDEX_FILE).is_file()
    assert main(["convert", str(imported["ckpt"]), str(out)]) == 2  # not over a non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err


def test_convert_help_is_readable(capsys: Any) -> None:
    from lightning_llama_fp8.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "llama-fp8 convert" in text and "--tokenizer" in text and "init_weights" in text
