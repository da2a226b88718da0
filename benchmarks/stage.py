"""Run one GPU stage of ``benchmarks/stages.py`` into an output directory, or list the stages.

    python -m benchmarks.stage --list
    python -m benchmarks.stage NAME OUT_DIR [ARGS...]     # ARGS: for the stages that take them (suite)
    python -m benchmarks.stage --dry-run NAME OUT_DIR     # the stage's settings and commands, nothing run

Run it from the repository root (on the GPU machine after ``source .gpu/setup.sh``). Exit status: 0 when every
step succeeded, 1 when a step failed or ran out of time, 2 for an unknown stage or settings it cannot run with.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.lib.stage_run import Stage, StageSession, StageUsageError
from benchmarks.stages import STAGES, STAGES_BY_NAME


def stage_table(stages: Sequence[Stage]) -> str:
    """One line per stage: name, GPUs, time limit, purpose."""
    width = max(len(stage.name) for stage in stages)
    lines = [f"{'stage':<{width}}  GPUs  limit  purpose"]
    lines += [f"{s.name:<{width}}  {s.gpus:>4}  {s.limit_s:>3} s  {s.purpose}" for s in stages]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stage",
        description=__doc__.split("\n\n")[0],
        epilog="Stages and their knobs: --list, then --dry-run NAME OUT_DIR.",
    )
    parser.add_argument("--list", action="store_true", help="print the stages: name, GPUs, time limit, purpose")
    parser.add_argument("--dry-run", action="store_true", help="print the stage's settings and commands, run nothing")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the stage (see --list)")
    parser.add_argument("out", nargs="?", type=Path, metavar="OUT_DIR", help="where the stage writes its records")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed on to the stage (suite)")
    options = parser.parse_args(argv)
    if options.list:
        print(stage_table(STAGES))
        return 0
    if options.name is None or options.out is None:
        parser.print_usage(sys.stderr)
        print("NAME and OUT_DIR are needed (or --list)", file=sys.stderr)
        return 2
    stage = STAGES_BY_NAME.get(options.name)
    if stage is None:
        print(f"unknown stage '{options.name}' (python -m benchmarks.stage --list)", file=sys.stderr)
        return 2
    session = StageSession(stage, options.out, dry_run=options.dry_run, args=options.args)
    try:
        return session.run_stage()
    except StageUsageError as error:
        print(f"{stage.name}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
