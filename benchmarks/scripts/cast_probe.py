"""Time Transformer Engine's FP8 cast with transpose and name the kernels it runs (copied and run by fp8-casts).

    python3 cast_probe.py OUT_JSON SETTING

Casts two BF16 activation shapes of Llama 3 8B to FP8 E4M3 with the transpose the weight-gradient GEMM needs, and
writes each shape's seconds per cast, GB/s moved and the CUDA kernels one cast ran, with the ``NVTE_*`` environment
it ran under (the stage varies it) and SETTING as its name.
"""

import json
import os
import sys

import torch
import transformer_engine.pytorch  # noqa: F401  (loads TE's libraries; its torch extension imports after it)
import transformer_engine_torch as tex
from torch.profiler import ProfilerActivity, profile
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

SHAPES = ((8192, 4096), (8192, 14336))
WARMUP_CASTS, TIMED_CASTS = 5, 50


def probe(shape: tuple[int, int]) -> dict:
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    quantizer = Float8Quantizer(
        torch.ones(1, device="cuda"),
        torch.zeros(1, device="cuda"),
        tex.DType.kFloat8E4M3,
        rowwise=True,
        columnwise=True,
    )
    for _ in range(WARMUP_CASTS):
        quantizer(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_CASTS):
        quantizer(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / TIMED_CASTS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        quantizer(x)
        torch.cuda.synchronize()
    kernels = sorted({event.name[:120] for event in prof.events() if event.device_type.name == "CUDA"})
    moved = x.numel() * (2 + 1 + 1)  # read bf16, write the FP8 data and its transpose
    return {"shape": shape, "s": seconds, "gb_per_s": moved / seconds / 1e9, "kernels": kernels}


def main() -> None:
    out_path, setting = sys.argv[1], sys.argv[2]
    rows = [probe(shape) for shape in SHAPES]
    out = {"setting": setting, "env": {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}, "rows": rows}
    print(json.dumps(out))
    with open(out_path, "w") as file:
        file.write(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
