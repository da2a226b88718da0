"""How a stage runs (benchmarks/lib/stage_run.py), on the CPU: logs, failures, the time limit."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from benchmarks.lib.stage_run import TIMED_OUT, Command, Stage, StageSession

pytestmark = pytest.mark.multiprocess  # every test runs a stage's commands as subprocesses


def _python(code: str) -> str:
    """A command line running ``code`` with this interpreter."""
    return shlex.join([sys.executable, "-c", code])


def test_the_runner_logs_goes_on_after_a_failure_and_reports_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    def summary_step(session: StageSession) -> None:
        session.call(json.loads, "{not json")

    stage = Stage(
        name="cpu-check",
        gpus=1,
        purpose="the runner on the CPU",
        limit_s=60,
        steps=(
            Command(_python("print('tee line'); import sys; print('err line', file=sys.stderr)"), log="{out}/a.log",
                    tee=True),
            Command(_python("print('\\n'.join(map(str, range(10))))"), log="{out}/b.log", tail=2),
            Command(_python("import os, sys; print(os.environ['GPU_RESULTS_DIR'], os.environ['KNOB']); sys.exit(3)"),
                    env={"KNOB": "{WHAT}"}),
            Command(_python("print('never')"), after_success=True),
            summary_step,
        ),
        outputs=("a.log", "b.log"),
        knobs={"WHAT": "default value"},
    )  # fmt: skip
    out = tmp_path / "out"
    session = StageSession(stage, out, environ={**os.environ, "STAGE_COMMIT": "abc123 dirty"})
    assert session.run_stage() == 1
    printed = capfd.readouterr()
    lines = printed.out.splitlines()
    assert "tee line" in lines and "err line" in lines  # tee: stdout and stderr on the console as well
    assert (out / "a.log").read_text().splitlines() == ["tee line", "err line"]
    assert (out / "b.log").read_text().split() == [str(i) for i in range(10)]
    assert "8" in lines and "9" in lines and "7" not in lines  # only the last two lines of b.log
    assert f"{out} default value" in lines
    assert "never" not in lines
    assert len(session.failures) == 3  # exit 3, the step after it, the summary that raised
    assert session.failures[0].startswith("exit 3") and "not run" in session.failures[1]
    assert "JSONDecodeError" in printed.err
    assert (out / "commit.txt").read_text() == "abc123 dirty\n" and (out / "device.txt").exists()


def test_the_time_limit_stops_a_command_and_the_steps_after_it(tmp_path: Path) -> None:
    stage = Stage(
        name="slow",
        gpus=1,
        purpose="a command past the stage's limit",
        limit_s=3,
        steps=(Command(_python("import time; time.sleep(60)")), Command(_python("print(1)"))),
        outputs=("nothing",),
    )
    session = StageSession(stage, tmp_path / "out")
    started = time.monotonic()
    assert session.run_stage() == 1
    assert time.monotonic() - started < 30
    assert session.failures[0].startswith("timed out") and "spent" in session.failures[1]
    assert session.run(["true"]) == TIMED_OUT
