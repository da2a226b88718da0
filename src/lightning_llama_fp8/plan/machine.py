"""Whether a :class:`~.estimate.TrainingPlan` can fit the host it starts on, checked before anything is allocated.

The plan counts the host memory an offloaded optimizer keeps (:attr:`~.estimate.MemoryBreakdown.host`, per GPU,
exactly: fp32 main weights, Adam moments and fp32 gradients of the offloaded share). Every GPU process of a host
keeps its own, so a host needs that times its GPU processes; a setting that needs more than the host has would
otherwise be found by the kernel's out-of-memory killer, with no message, once the optimizer is built.
"""

from __future__ import annotations

from lightning_llama_fp8.plan.estimate import TrainingPlan
from lightning_llama_fp8.validate import format_bytes


def host_memory_problem(plan: TrainingPlan, processes_on_host: int, available: int | None) -> str | None:
    """Why ``plan`` cannot fit the host memory ``available`` (bytes; None: unknown, nothing is checked) with
    ``processes_on_host`` GPU processes on this host, or None where it fits."""
    per_process = max(stage.memory.host for stage in plan.stages) if plan.stages else plan.memory.host
    needed = per_process * processes_on_host
    if available is None or needed <= available:
        return None
    return (
        f"the offloaded optimizer state needs {format_bytes(per_process)} of host memory per GPU process, "
        f"{format_bytes(needed)} for the {processes_on_host} processes of this host, but it has "
        f"{format_bytes(available)} available. Lower optimizer_offload.fraction, use more nodes, or turn the offload "
        "off (optimizer_offload: null)."
    )
