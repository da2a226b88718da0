"""Where a training step's GPU time goes: kernel time by kind and the GPU's idle time, from ``torch.profiler``.

Used by ``python -m benchmarks.throughput --profile-steps N`` (a Lightning callback that profiles N steps after the
warm-up) to compare FP8 and BF16 steps kind by kind (METHOD: count, predict, measure, compare in one run): GEMMs
(FP8 and 16-bit apart), attention, norms, FP8 casts / transposes / amax and scale updates, communication, the
optimizer, and the rest; plus the time no kernel ran (host gaps) within the profiled steps' wall time.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

# Checked in order; the first match decides a kernel's kind.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce|sendrecv", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attn|sdpa|softmax", re.I)),
    ("norm", re.compile(r"rmsnorm|layernorm|layer_norm|rms_norm", re.I)),  # before casts: TE norms may emit FP8
    # cuBLAS's nvjet kernels name their operand types after the architecture: "nvjet_sm90_tst_..." is BF16,
    # "nvjet_sm90_qqtst_..." (E4M3 x E4M3) and "..._qrtst_..." (E4M3 x E5M2) are FP8 (seen on an H200 with CUDA 13).
    (
        "gemm_fp8",
        re.compile(
            r"(gemm|nvjet|xmma|matmul|cutlass).*(e4m3|e5m2|f8)|(e4m3|e5m2|f8).*(gemm|nvjet)|nvjet_sm\d+\w?_[qr]", re.I
        ),
    ),
    ("gemm_16bit", re.compile(r"gemm|nvjet|xmma|matmul|cutlass|ampere_|sm90_", re.I)),
    ("fp8_cast_amax", re.compile(r"cast|transpose|amax|quantiz|fp8|delayed_scaling|scale", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|l2norm", re.I)),
    ("cross_entropy", re.compile(r"cross_entropy|log_softmax|nll", re.I)),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel by its name (``other`` when none matches)."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def kernels_from_chrome_trace(trace: dict[str, Any]) -> list[tuple[str, float, float, tuple[int, ...] | None]]:
    """``(name, start_us, end_us, grid)`` of every GPU kernel in a ``torch.profiler`` Chrome trace.

    The trace (``export_chrome_trace``) has what ``profiler.events()`` lacks: each launch's grid, from which a
    kernel's problem size can be read back (which tensor a cast kernel worked on, say).
    """
    kernels = []
    for event in trace.get("traceEvents", []):
        if event.get("cat") != "kernel" or "dur" not in event:
            continue
        grid = (event.get("args") or {}).get("grid")
        start = float(event["ts"])
        kernels.append((event["name"], start, start + float(event["dur"]), tuple(grid) if grid else None))
    return kernels


def launch_sites(
    trace: dict[str, Any], kinds: tuple[str, ...] = ("fp8_cast_amax",), frames: int = 8, top: int = 12
) -> list[dict[str, Any]]:
    """Which Python code launched the kernels of ``kinds``: grouped by kernel and innermost Python frames.

    Needs a trace recorded with CPU activity and ``with_stack=True``: kernels and the runtime (or driver, for
    NVRTC-compiled kernels) calls that launched them share a ``correlation`` id, and the ``python_function`` events
    open on that thread at the launch are its Python stack (they nest properly per thread). Returns the ``top``
    groups by GPU time, each with ``kernel``, ``frames`` (innermost first, ``frames`` of them), ``calls``, ``s`` and
    the most frequent launch grids.
    """
    events = trace.get("traceEvents", [])
    launches: dict[Any, tuple[Any, float]] = {}  # correlation -> (thread, launch time)
    python: dict[Any, list[tuple[float, float, str]]] = defaultdict(list)
    for event in events:
        cat, args = event.get("cat"), event.get("args") or {}
        if cat in ("cuda_runtime", "cuda_driver") and "correlation" in args:
            launches[args["correlation"]] = ((event.get("pid"), event.get("tid")), float(event["ts"]))
        elif cat == "python_function" and "dur" in event:
            start = float(event["ts"])
            python[(event.get("pid"), event.get("tid"))].append((start, start + float(event["dur"]), event["name"]))
    # thread -> (launch time, kernel, seconds, grid) of each wanted kernel
    by_thread: dict[Any, list[tuple[float, str, float, tuple[int, ...] | None]]] = defaultdict(list)
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "kernel" or kernel_kind(event["name"]) not in kinds:
            continue
        launch = launches.get(args.get("correlation"))
        if launch is not None:
            grid = tuple(args["grid"]) if args.get("grid") else None
            by_thread[launch[0]].append((launch[1], event["name"], float(event["dur"]) / 1e6, grid))
    groups: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for thread, calls in by_thread.items():
        functions = sorted(python.get(thread, []), key=lambda f: (f[0], -f[1]))
        open_stack: list[tuple[float, float, str]] = []
        i = 0
        for at, name, seconds, grid in sorted(calls, key=lambda c: c[0]):
            while i < len(functions) and functions[i][0] <= at:
                while open_stack and open_stack[-1][1] < functions[i][0]:
                    open_stack.pop()
                open_stack.append(functions[i])
                i += 1
            while open_stack and open_stack[-1][1] < at:
                open_stack.pop()
            stack = tuple(f[2] for f in reversed(open_stack[-frames:]))
            group = groups.setdefault((name, stack), {"calls": 0, "s": 0.0, "grids": defaultdict(int)})
            group["calls"] += 1
            group["s"] += seconds
            if grid is not None:
                group["grids"][grid] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1]["s"])[:top]
    return [
        {
            "kernel": name[:160],
            "frames": list(stack),
            "calls": group["calls"],
            "s": group["s"],
            "grids": [{"grid": list(g), "calls": n} for g, n in _most_common(group["grids"], 3)],
        }
        for (name, stack), group in ranked
    ]


def summarize_kernels(kernels: Iterable[tuple[Any, ...]], wall_s: float, steps: int) -> dict[str, Any]:
    """Per-step kernel time by kind, the busiest kernels, and the GPU's idle share of ``wall_s``.

    ``kernels``: ``(name, start_us, end_us)`` or ``(name, start_us, end_us, grid)`` of every kernel in the profiled
    steps (all streams). Busy time is the union of their intervals, so overlapping kernels (communication beside
    compute) count once there. The busiest kernels come with their launches per step, mean duration and (where
    given) their most frequent launch grids.
    """
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    grids: dict[str, dict[tuple[int, ...], int]] = defaultdict(lambda: defaultdict(int))
    intervals = []
    for kernel in kernels:
        name, start, end = kernel[:3]
        seconds = (end - start) / 1e6
        by_kind[kernel_kind(name)] += seconds
        by_name[name] += seconds
        calls[name] += 1
        if len(kernel) > 3 and kernel[3] is not None:
            grids[name][tuple(kernel[3])] += 1
        intervals.append((start, end))
    busy_us, current_end = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if start > current_end:
            busy_us += end - start
            current_end = end
        elif end > current_end:
            busy_us += end - current_end
            current_end = end
    steps = max(steps, 1)
    busy_s = busy_us / 1e6
    top = sorted(by_name.items(), key=lambda item: -item[1])[:15]
    return {
        "steps": steps,
        "wall_s_per_step": wall_s / steps,
        "kernel_s_per_step_by_kind": {kind: seconds / steps for kind, seconds in sorted(by_kind.items())},
        "gpu_busy_s_per_step": busy_s / steps,
        "gpu_idle_s_per_step": max(wall_s - busy_s, 0.0) / steps,
        "top_kernels_s_per_step": [
            {
                "name": name[:160],
                "kind": kernel_kind(name),
                "s": seconds / steps,
                "calls_per_step": calls[name] / steps,
                "mean_us": seconds / calls[name] * 1e6,
                **(
                    {"grids": [{"grid": list(g), "calls": n} for g, n in _most_common(grids[name], 3)]}
                    if grids.get(name)
                    else {}
                ),
            }
            for name, seconds in top
        ],
    }


def _most_common(counts: dict[tuple[int, ...], int], n: int) -> list[tuple[tuple[int, ...], int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]


class StepProfiler(Callback):
    """A Lightning callback: profile ``steps`` optimizer steps starting after ``warmup`` (CUDA activity only).

    ``summary`` holds :func:`summarize_kernels` of them once done (``None`` before, or where nothing was seen).
    With ``stacks``, CPU activity and Python stacks are recorded too (slower steps, a far larger trace) and
    ``summary["launch_sites"]`` says which Python code launched the FP8 cast and the "other" kernels
    (:func:`launch_sites`).
    """

    def __init__(self, warmup: int, steps: int, stacks: bool = False) -> None:
        super().__init__()
        self.first, self.last = warmup + 1, warmup + steps
        self.stacks = stacks
        self.summary: dict[str, Any] | None = None
        self._profiler: Any = None
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        import torch

        if trainer.global_step + 1 != self.first or self._profiler is not None:
            return
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        if self.stacks:
            activities.append(torch.profiler.ProfilerActivity.CPU)
        self._profiler = torch.profiler.profile(activities=activities, with_stack=self.stacks)
        self._profiler.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        import torch

        if self._profiler is None or trainer.global_step < self.last or self.summary is not None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._start
        self._profiler.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:  # the Chrome trace carries each launch's grid
            path = Path(tmp) / "trace.json"
            self._profiler.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        kernels: list[tuple[Any, ...]] = kernels_from_chrome_trace(trace)
        if not kernels:  # a trace format without "kernel" events: the profiler's own list, without grids
            kernels = [
                (event.name, event.time_range.start, event.time_range.end)
                for event in self._profiler.events()
                if str(getattr(event, "device_type", "")).endswith("CUDA")
            ]
        self.summary = summarize_kernels(kernels, wall, self.last - self.first + 1)
        if self.stacks:
            # The casts, and the unclassified element-wise rest ("other": 0.17 s of the FP8 step on 2026-12-03).
            self.summary["launch_sites"] = launch_sites(trace, kinds=("fp8_cast_amax", "other"), top=24)
