"""The ``llama-fp8`` command itself (cli/__init__.py, the console script): its subcommands and its help."""

from __future__ import annotations

import importlib
import tomllib

import pytest

from lightning_llama_fp8.cli import main
from lightning_llama_fp8.cli.fit import LlamaCLI
from tests.helpers import REPO_ROOT
from tests.helpers.paths import CONFIG_8B


def test_only_fit_and_validate(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(LlamaCLI.subcommands()) == {"fit", "validate"}
    assert main(["test", "--config", str(CONFIG_8B)]) == 2
    assert "llama-fp8: unknown command 'test'" in capsys.readouterr().err


def test_help_names_the_plan_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "llama-fp8 plan --config" in " ".join(capsys.readouterr().out.split())


def test_console_script_entry_point() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llama-fp8"] == "lightning_llama_fp8.cli:main"
    module_name, attr = scripts["llama-fp8"].split(":")
    entry = getattr(importlib.import_module(module_name), attr)
    assert callable(entry)
    assert entry is main
