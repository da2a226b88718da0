"""GPU machines for the tests: the no_gpu mark (skipped where a GPU is visible) and fake machines, as torch.cuda and
Transformer Engine describe them, for the FP8 support checks (the fake_machine fixture of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


@dataclass
class Machine:
    """A GPU machine as torch.cuda and Transformer Engine would describe it."""

    name: str
    capability: tuple[int, int]
    cuda: float = 12.9
    te_version: str = "2.20.2"
    missing_checks: tuple[str, ...] = ()


def te_support_checks(machine: Machine) -> dict[str, Callable[..., tuple[bool, str]]]:
    """TE's ``is_*_available(return_reason=True)`` with TE's own conditions and reasons (TE 2.20 quantization.py)."""
    cc = machine.capability

    def fp8(return_reason: bool = False) -> tuple[bool, str]:
        if cc >= (9, 0):
            return True, ""
        if cc < (8, 9):
            return False, "Device compute capability 8.9 or higher required for FP8 execution."
        return True, ""

    def mxfp8(return_reason: bool = False) -> tuple[bool, str]:
        if cc >= (12, 0):
            return False, "MXFP8 (for all gemm layouts) is not supported on 12.0+ architectures yet."
        if cc >= (10, 0):
            return True, ""
        return False, "Device compute capability 10.0 or higher required for MXFP8 execution."

    def blockwise(return_reason: bool = False) -> tuple[bool, str]:
        if cc >= (9, 0) and machine.cuda >= 12.9:
            return True, ""
        return False, "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."

    return {"is_fp8_available": fp8, "is_mxfp8_available": mxfp8, "is_fp8_block_scaling_available": blockwise}


H100 = Machine("NVIDIA H100 80GB HBM3", (9, 0))
B200 = Machine("NVIDIA B200", (10, 0))
L40S_CUDA_12_8 = Machine("NVIDIA L40S", (8, 9), cuda=12.8)
A100 = Machine("NVIDIA A100-SXM4-80GB", (8, 0))
