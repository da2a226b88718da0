import json, os, sys
import torch
import transformer_engine.pytorch  # noqa: F401  (loads TE's libraries; its torch extension imports after it)
import transformer_engine_torch as tex
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer
from torch.profiler import ProfilerActivity, profile

rows = []
for shape in ((8192, 4096), (8192, 14336)):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    quantizer = Float8Quantizer(torch.ones(1, device="cuda"), torch.zeros(1, device="cuda"), tex.DType.kFloat8E4M3,
                                rowwise=True, columnwise=True)
    for _ in range(5):
        quantizer(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        quantizer(x)
    end.record(); torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 50
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        quantizer(x); torch.cuda.synchronize()
    kernels = sorted({e.name[:120] for e in prof.events() if e.device_type.name == "CUDA"})
    moved = x.numel() * (2 + 1 + 1)  # read bf16, write the FP8 data and its transpose
    rows.append({"shape": shape, "s": seconds, "gb_per_s": moved / seconds / 1e9, "kernels": kernels})
out = {"setting": sys.argv[2], "env": {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}, "rows": rows}
print(json.dumps(out)); open(sys.argv[1], "w").write(json.dumps(out, indent=2))
