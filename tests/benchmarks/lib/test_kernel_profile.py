"""benchmarks/lib/kernel_profile.py: kernel kinds by name and the per-step sums of a profiled step."""

from __future__ import annotations

import pytest

from benchmarks.lib.kernel_profile import kernel_kind, kernels_from_chrome_trace, launch_sites, summarize_kernels


@pytest.mark.parametrize(
    "name,kind",
    [
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_kernel__5x_cublas", "gemm_fp8"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm_16bit"),
        # Names from an H200 profile (CUDA 13 cuBLAS): BF16, then FP8 E4M3 x E4M3 and E4M3 x E5M2.
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm_16bit"),
        ("nvjet_sm90_qqtst_192x192_128x4_2x1_v_bz_coopB_TNN", "gemm_fp8"),
        ("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", "gemm_fp8"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", "attention"),
        ("void transformer_engine::detail::cast_transpose_fused_kernel<true, float, __nv_fp8_e4m3>", "fp8_cast_amax"),
        ("void transformer_engine::normalization::rmsnorm_fwd_tuned_kernel<__nv_fp8_e4m3>", "norm"),
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ],
)
def test_kernel_kinds(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_summary_per_step_and_idle_time() -> None:
    kernels = [  # (name, start us, end us) over 2 steps of 1 s wall each
        ("sm90_xmma_gemm_e4m3bf16_tn", 0, 400_000),
        ("ncclDevKernel_AllGather_RING_LL", 100_000, 300_000),  # overlaps the GEMM: busy time counts it once
        ("rmsnorm_fwd_tuned_kernel", 500_000, 600_000),
        ("sm90_xmma_gemm_e4m3bf16_tn", 1_000_000, 1_400_000),
    ]
    summary = summarize_kernels(kernels, wall_s=2.0, steps=2)
    assert summary["kernel_s_per_step_by_kind"] == pytest.approx({"gemm_fp8": 0.4, "communication": 0.1, "norm": 0.05})
    assert summary["gpu_busy_s_per_step"] == pytest.approx(0.45)
    assert summary["gpu_idle_s_per_step"] == pytest.approx(0.55)
    assert summary["top_kernels_s_per_step"][0] == {
        "name": "sm90_xmma_gemm_e4m3bf16_tn", "kind": "gemm_fp8", "s": 0.4, "calls_per_step": 1.0, "mean_us": 400_000,
    }  # fmt: skip


def test_chrome_trace_kernels_carry_their_grids() -> None:
    """What ``export_chrome_trace`` writes (torch 2.11): kernels under cat "kernel" with ts/dur in us and args.grid."""
    cast = "void transformer_engine::detail::cast_transpose_general_kernel<4ul, 4ul, __nv_bfloat16, __nv_fp8_e4m3>"
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5},
            {"ph": "X", "cat": "kernel", "name": cast, "ts": 10, "dur": 30, "args": {"grid": [2048, 1, 1]}},
            {"ph": "X", "cat": "kernel", "name": cast, "ts": 50, "dur": 30, "args": {"grid": [2048, 1, 1]}},
            {"ph": "X", "cat": "kernel", "name": cast, "ts": 90, "dur": 90, "args": {"grid": [7168, 1, 1]}},
            {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_qqtst_192x192", "ts": 200, "dur": 100},
        ]
    }  # fmt: skip
    kernels = kernels_from_chrome_trace(trace)
    assert kernels[0] == (cast, 10.0, 40.0, (2048, 1, 1)) and kernels[-1][3] is None and len(kernels) == 4
    top = {k["name"]: k for k in summarize_kernels(kernels, wall_s=1e-3, steps=1)["top_kernels_s_per_step"]}
    assert top[cast]["calls_per_step"] == 3 and top[cast]["mean_us"] == pytest.approx(50)
    assert top[cast]["grids"] == [{"grid": [2048, 1, 1], "calls": 2}, {"grid": [7168, 1, 1], "calls": 1}]
    assert "grids" not in top["nvjet_sm90_qqtst_192x192"] and top["nvjet_sm90_qqtst_192x192"]["kind"] == "gemm_fp8"


def _python(name: str, ts: int, dur: int) -> dict:
    return {"ph": "X", "cat": "python_function", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 7}


def _launch(correlation: int, ts: int, cat: str = "cuda_runtime") -> dict:
    name = "cuLaunchKernel" if cat == "cuda_driver" else "cudaLaunchKernel"  # NVRTC kernels: the driver API
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 2, "args": {"correlation": correlation}, "pid": 1,
            "tid": 7}  # fmt: skip


def _kernel(name: str, correlation: int, ts: int, dur: int, grid: list[int] | None = None) -> dict:
    args = {"correlation": correlation, **({"grid": grid} if grid else {})}
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": args}


def test_launch_sites_name_the_python_code_that_launched_a_cast() -> None:
    """Kernel -> its launch (shared correlation id) -> the Python functions open on that thread at the launch."""
    cast = "void transformer_engine::detail::cast_transpose_general_kernel<4ul, 4ul, __nv_bfloat16, __nv_fp8_e4m3>"
    trace = {
        "traceEvents": [
            _python("model.py(10): forward", 0, 100),
            _python("linear.py(5): _quantize", 10, 20),
            _launch(1, 15),
            _python("optim.py(3): step", 40, 30),
            _launch(2, 50, cat="cuda_driver"),
            _launch(3, 80),
            _launch(4, 85),
            _kernel(cast, 1, 20, 30, [64, 1, 1]),
            _kernel(cast, 2, 60, 500, [9, 1, 1]),
            _kernel(cast, 3, 600, 10, [2, 1, 1]),
            _kernel("nvjet_sm90_qqtst", 4, 700, 99),
        ]
    }
    sites = launch_sites(trace)
    assert [(s["frames"], s["calls"]) for s in sites] == [
        (["optim.py(3): step", "model.py(10): forward"], 1),
        (["linear.py(5): _quantize", "model.py(10): forward"], 1),
        (["model.py(10): forward"], 1),  # launched after _quantize and step had returned
    ]
    assert sites[0]["s"] == pytest.approx(500e-6) and sites[0]["grids"] == [{"grid": [9, 1, 1], "calls": 1}]
    assert all(s["kernel"] == cast for s in sites)  # the GEMM is not a cast kind
