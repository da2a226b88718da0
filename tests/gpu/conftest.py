"""GPU tests: run on the GPU machine (``pytest -m gpu tests/gpu``); skipped where CUDA, TE or FP8 is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch


def _gpu_stack_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return "Transformer Engine is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_stack_reason()
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def record() -> Any:
    """Write a named JSON record under $GPU_RESULTS_DIR (the device run's $OUT), if set."""

    def _record(name: str, payload: dict[str, Any]) -> None:
        out = os.environ.get("GPU_RESULTS_DIR")
        payload = {"device": torch.cuda.get_device_name(), **payload}
        print(f"[record {name}] {json.dumps(payload)[:2000]}")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, f"{name}.json").write_text(json.dumps(payload, indent=2))

    return _record
