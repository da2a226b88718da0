"""`llama-fp8 --help`, `plan` and `preprocess --help` answer without importing torch, Lightning or megatron-core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # every test runs llama-fp8 in a subprocess

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "megatron", "transformer_engine")

PROBE = """
import sys
from lightning_llama_fp8.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:  # argparse's --help
    code = stop.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print("HEAVY", heavy, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["preprocess", "--help"],
        ["plan", "--help"],
        ["plan", "--config", "examples/configs/llama3_8b_h100_fp8.yaml"],
    ],
    ids=["help", "preprocess-help", "plan-help", "plan-8b"],
)
def test_light_commands_import_no_framework(args: list[str]) -> None:
    probe = f"HEAVY = {HEAVY!r}\n{PROBE}"
    result = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout or "Parameters" in result.stdout
    assert "HEAVY []" in result.stderr, result.stderr
