"""Reading a ``llama-fp8`` config file (cli/config_file.py): one sentence for a file that is not a config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.parametrize("subcommand", ["fit", "validate", "plan"])
@pytest.mark.parametrize(
    "content,expected",
    [
        ("- a\n- b\n", r"is a list, not a mapping of sections"),
        ("trainer: [unclosed\n", r"is not valid YAML at line 2, column 1"),
        ("", r"is empty"),
        (None, r"does not exist"),
    ],
    ids=["list", "unparsable", "empty", "missing"],
)
def test_malformed_config_files_get_one_sentence(
    subcommand: str, content: str | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_llama_fp8.cli import fit as cli
    from lightning_llama_fp8.cli import main as llama_fp8

    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert llama_fp8([subcommand, "--config", str(path)]) == cli.EXIT_CANNOT_TRAIN
    err = capsys.readouterr().err.strip()
    assert re.search(rf"^llama-fp8 {subcommand}: config file .*config\.yaml {expected}", err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
