"""Issue 30's comparisons (benchmarks/lib/reproducibility.py) on the CPU: run against run, resume against the run that
never stopped, the summary in the issue's format, the culprits, and what the command line runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lib import reproducibility as repro

LOSSES = [10.9, 10.9, 10.5, 10.2, 10.0, 9.9, 9.8, 9.7, 9.6, 9.5]


def _run(
    candidate: str,
    process: str,
    losses: list[float] = LOSSES,
    kind: str = "run",
    step_s: float = 0.05,
    first_step: int = 1,
    **changes: Any,
) -> dict[str, Any]:
    """A run record as ``run`` writes it: weights' fingerprint = the step number, grad norm = loss / 10."""
    steps = range(first_step, first_step + len(losses))
    run = {
        "candidate": candidate,
        "kind": kind,
        "process": process,
        "first_step": first_step,
        "losses": list(losses),
        "grad_norms": [loss / 10 for loss in losses],
        "step_s": [step_s] * len(losses),
        "fingerprints": [[float(step), 1.0] for step in steps],
        "final_fingerprint": [float(first_step + len(losses)), 1.0],
        "error": None,
    }
    run.update(changes)
    return run


def _differing_from(step: int, by: float = 1.3e-3) -> list[float]:
    return [loss + (by if index + 1 >= step else 0.0) for index, loss in enumerate(LOSSES)]


def test_equal_runs_are_bitwise_equal() -> None:
    comparison = repro.compare_runs(_run("default", "a"), _run("default", "b"))
    assert comparison == repro.Comparison(bitwise_equal=True, max_loss_gap=0.0, first_differing_step=None)


def test_the_first_differing_step_and_the_largest_gap() -> None:
    comparison = repro.compare_runs(_run("default", "a"), _run("default", "b", losses=_differing_from(3)))
    assert not comparison.bitwise_equal and comparison.first_differing_step == 3
    assert comparison.max_loss_gap == pytest.approx(1.3e-3)
    # The weights at the start of step 4 differ before any loss does (the fingerprint comes first).
    moved = _run("default", "b")
    moved["fingerprints"][3] = [4.0, 1.0000001]
    assert repro.compare_runs(_run("default", "a"), moved) == repro.Comparison(False, 0.0, 4)
    # Only the weights after the last step: the step after the last.
    final = _run("default", "b", final_fingerprint=[11.0, 2.0])
    assert repro.compare_runs(_run("default", "a"), final) == repro.Comparison(False, 0.0, 11)
    # A gradient norm alone, and a shorter run, are differences too.
    norms = _run("default", "b")
    norms["grad_norms"][6] += 1e-7
    assert repro.compare_runs(_run("default", "a"), norms).first_differing_step == 7
    assert not repro.compare_runs(_run("default", "a"), _run("default", "b", losses=LOSSES[:9])).bitwise_equal


def test_a_resume_is_compared_from_its_first_step() -> None:
    full = _run("deterministic", "a")
    resumed = _run("deterministic", "a", losses=LOSSES[5:], kind="resume", first_step=6)
    assert repro.compare_runs(full, resumed, first_step=6) == repro.Comparison(True, 0.0, None)
    off = _run("deterministic", "a", losses=[LOSSES[5] + 1e-4, *LOSSES[6:]], kind="resume", first_step=6)
    comparison = repro.compare_runs(full, off, first_step=6)
    assert comparison.first_differing_step == 6 and comparison.max_loss_gap == pytest.approx(1e-4)


def _records() -> list[dict[str, Any]]:
    """Two processes as the stage runs them: the default differs from step 3 on (and one of its resumes from the run
    of its process), switching TE's nondeterministic attention off alone makes the runs equal, deterministic mode too
    (and its resumes)."""
    a = [
        _run("default", "a"),
        _run("default", "a", [loss + 2e-4 for loss in LOSSES[5:]], kind="resume", first_step=6),
        _run("nondeterministic_algo_off", "a", step_s=0.06),
        _run("no_fp8_param_gather", "a"),
        _run("deterministic", "a", step_s=0.07),
        _run("deterministic", "a", LOSSES[5:], kind="resume", first_step=6),
    ]
    a[0]["step_s"] = [9.0, 9.0, 0.05, 0.05, 0.05, 3.0, 0.05, 0.05, 0.05, 0.05]  # warm-up, and the step after the save
    b = [
        _run("deterministic", "b", step_s=0.07),
        _run("deterministic", "b", LOSSES[5:], kind="resume", first_step=6),
        _run("no_fp8_param_gather", "b", losses=_differing_from(3, 5e-4)),
        _run("nondeterministic_algo_off", "b", step_s=0.06),
        _run("default", "b", losses=_differing_from(3)),
        _run("default", "b", _differing_from(3)[5:], kind="resume", first_step=6),  # equal to b's own run
    ]
    config = {"arch": "small", "layers": 4}
    return [
        {"process": "a", "device": "NVIDIA H100 80GB HBM3", "steps": 10, "config": config, "runs": a},
        {"process": "b", "device": "NVIDIA H100 80GB HBM3", "steps": 10, "config": config, "runs": b},
    ]


def test_the_summary_has_issue_30s_format_and_names_the_culprit() -> None:
    reproducibility, details = repro.summarize(_records())
    assert reproducibility == {
        "card": "NVIDIA H100 80GB HBM3",
        "steps": 10,
        "rows": [
            {
                "mode": "default",
                "runs_bitwise_equal": False,
                "resume_bitwise_equal": False,
                "max_loss_gap": pytest.approx(1.3e-3),
                "s_per_step": 0.05,  # steps 3-10 but 6 (after the save) of both runs
            },
            {
                "mode": "deterministic",
                "runs_bitwise_equal": True,
                "resume_bitwise_equal": True,
                "max_loss_gap": 0.0,
                "s_per_step": 0.07,
            },
        ],
    }
    assert details["culprits"] == ["nondeterministic_algo_off"]
    assert details["deterministic_over_default_s_per_step"] == pytest.approx(1.4)
    default = details["candidates"]["default"]
    assert default["first_differing_step"] == 3 and default["runs"] == 2 and default["resumes"] == 2
    assert default["resume_first_differing_step"] == 6 and default["resume_max_loss_gap"] == pytest.approx(2e-4)
    assert default["change"] == "today's defaults"
    no_gather = details["candidates"]["no_fp8_param_gather"]
    assert no_gather["runs_bitwise_equal"] is False and no_gather["resume_bitwise_equal"] is None
    assert list(details["candidates"]) == ["default", "nondeterministic_algo_off", "no_fp8_param_gather",
                                           "deterministic"]  # fmt: skip


def test_without_two_finished_runs_there_is_no_verdict() -> None:
    records = _records()
    records[1]["runs"][4]["error"] = "OutOfMemoryError: CUDA out of memory"  # process b's default run
    reproducibility, details = repro.summarize(records)
    default_row = reproducibility["rows"][0]
    assert default_row["runs_bitwise_equal"] is None and default_row["max_loss_gap"] is None
    assert details["candidates"]["default"]["errors"] == ["OutOfMemoryError: CUDA out of memory"]
    assert details["culprits"] == []  # no verdict on the default: nothing to blame
    # b's resume has no full run of its own process to compare with; a's resume still counts.
    assert details["candidates"]["default"]["resumes"] == 1


def test_write_summary_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for record in _records():
        path = tmp_path / f"process_{record['process']}.json"
        path.write_text(json.dumps(record))
        paths.append(path)
    missing = tmp_path / "process_c.json"
    assert repro.main(["summarize", *map(str, paths), str(missing), "--out-dir", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "reproducibility.json").read_text())
    assert set(written) == {"card", "steps", "rows"}
    assert [set(row) for row in written["rows"]] == [
        {"mode", "runs_bitwise_equal", "resume_bitwise_equal", "max_loss_gap", "s_per_step"}
    ] * 2
    details = json.loads((tmp_path / "out" / "reproducibility_candidates.json").read_text())
    assert details["missing_records"] == [str(missing)]
    assert "culprits: ['nondeterministic_algo_off']" in capsys.readouterr().out


def test_the_runs_in_order_and_reversed(capsys: pytest.CaptureFixture[str]) -> None:
    settings = repro.RunSettings(ckpt_dir=Path("/dev/shm/r"))
    forward = repro.run_plan(repro.CANDIDATES, settings, reverse=False)
    assert forward[0].startswith(
        "default: 10 steps; today's defaults; checkpoints every 5 steps into /dev/shm/r/default"
    )
    assert forward[1] == "default: resumed from step 5 to 10"
    assert forward[-1] == "deterministic: resumed from step 5 to 10"
    assert len(forward) == len(repro.CANDIDATES) + 2  # the two modes resume
    backward = repro.run_plan(repro.CANDIDATES, settings, reverse=True)
    assert backward[0].startswith("deterministic: 10 steps") and backward[-1] == forward[1]
    assert repro.main(["run", "--out", "unused.json", "--only", "default", "bf16", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[1:]] == ["default", "default", "bf16"]
    with pytest.raises(SystemExit):
        repro.main(["run", "--out", "unused.json", "--save-at", "10", "--dry-run"])


def test_every_candidate_switches_one_thing_and_the_modes_resume() -> None:
    names = [candidate.name for candidate in repro.CANDIDATES]
    assert names[0] == "default" and names[-1] == "deterministic" and len(set(names)) == len(names)
    assert [c.name for c in repro.CANDIDATES if c.resumes] == ["default", "deterministic"]
    for candidate in repro.CANDIDATES[1:-1]:
        switched = len(candidate.env) + len(candidate.arch) + len(candidate.strategy) + (candidate.precision is None)
        switched += bool(candidate.precision)
        assert switched == 1 or candidate.name == "no_overlap", candidate  # the two overlaps go together
    assert repro.CANDIDATES_BY_NAME["deterministic"].deterministic
