"""The stage runner's command line (python -m benchmarks.stage): the list of stages, and the stages it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lib.stage_run import StageSession, StageUsageError
from benchmarks.stage import main as stage_main
from benchmarks.stages import STAGES, STAGES_BY_NAME
from tests.helpers import REPO_ROOT


@pytest.mark.multiprocess
def test_list_prints_every_stage() -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'src'}:{REPO_ROOT}"}
    listing = subprocess.run(
        [sys.executable, "-m", "benchmarks.stage", "--list"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [stage.name for stage in STAGES]
    assert all(f"{stage.limit_s} s" in row for stage, row in zip(STAGES, rows, strict=True))


def test_a_stage_refuses_to_start_without_what_it_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LEVER_")}
    session = StageSession(STAGES_BY_NAME["lever-1"], tmp_path / "o", dry_run=True, environ=environ)
    with pytest.raises(StageUsageError, match="needs LEVER_ARGS and/or LEVER_ENV"):
        session.run_stage()
    assert stage_main(["equivalence-2", str(tmp_path / "o"), "--extra"]) == 2
    assert stage_main(["no-such-stage", str(tmp_path / "o")]) == 2
    assert "unknown stage 'no-such-stage'" in capsys.readouterr().err
