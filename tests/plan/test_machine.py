"""Whether a plan fits the host it starts on (plan/machine.py): the offloaded optimizer state of every GPU process."""

from __future__ import annotations

from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings
from lightning_llama_fp8.plan.machine import host_memory_problem
from lightning_llama_fp8.validate import format_bytes
from tests.helpers.plans import reference_plan


def test_offloaded_optimizer_state_of_all_processes_against_the_host() -> None:
    plan = reference_plan(fp8_param_gather=False, optimizer_offload=OptimizerOffloadSettings(fraction=1.0))
    per_process = plan.memory.host
    assert per_process > 0
    assert host_memory_problem(plan, 8, 8 * per_process) is None
    assert host_memory_problem(plan, 8, None) is None  # unknown: not checked
    problem = host_memory_problem(plan, 8, 8 * per_process - 1)
    assert problem is not None
    assert (
        f"needs {format_bytes(per_process)} of host memory per GPU process, {format_bytes(8 * per_process)}" in problem
    )
    assert "for the 8 processes of this host" in problem and "Lower optimizer_offload.fraction" in problem
    assert host_memory_problem(reference_plan(), 8, 0) is None  # nothing offloaded, nothing needed
