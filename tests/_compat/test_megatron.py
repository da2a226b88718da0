"""The megatron-core private calls of ``_compat/megatron.py`` exist in the installed megatron-core and are made."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_llama_fp8._compat.megatron import copy_main_params_to_model_params


# The optimizers of BF16 parameters, which are the only ones that hold FP8 weights (the copy's only use here).
@pytest.mark.parametrize("optimizer_class", ["DistributedOptimizer", "Float16OptimizerWithFloat16Params"])
def test_megatrons_optimizers_still_have_the_main_to_model_copy(optimizer_class: str) -> None:
    import megatron.core.optimizer as megatron_optimizer

    assert callable(getattr(megatron_optimizer, optimizer_class)._copy_main_params_to_model_params)


def test_the_copy_runs_on_every_part_of_a_chained_optimizer() -> None:
    calls: list[str] = []

    def part(name: str) -> SimpleNamespace:
        return SimpleNamespace(_copy_main_params_to_model_params=lambda: calls.append(name))

    copy_main_params_to_model_params(SimpleNamespace(chained_optimizers=[part("first"), part("second")]))
    assert calls == ["first", "second"]
    copy_main_params_to_model_params(part("plain"))
    assert calls == ["first", "second", "plain"]


def test_a_failed_graph_capture_leaves_no_capture_state_behind() -> None:
    """megatron-core sets its capture flags and Transformer Engine swaps the layer class's __call__; both are undone
    only at the end of a successful capture. A capture that raises must not leave them for the rest of the process."""
    from megatron.core.transformer import cuda_graphs

    from lightning_llama_fp8._compat.megatron import graph_capture_undone_on_failure

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    def autocast_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the capture's wrapper must be gone")

    layer = Layer()
    with pytest.raises(RuntimeError, match="capture failed"), graph_capture_undone_on_failure([layer]):
        cuda_graphs._set_warmup_start()
        cuda_graphs._set_capture_start()
        Layer.__call__ = autocast_wrapper  # as make_graphed_callables does until it finishes
        raise RuntimeError("capture failed")
    assert not cuda_graphs.is_graph_capturing() and not cuda_graphs.is_graph_warmup()
    assert "__call__" not in Layer.__dict__ and layer(torch.zeros(1)).item() == 1.0

    class OwnCall(Layer):  # as megatron-core's TransformerLayer, which defines __call__ itself
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    own = OwnCall.__dict__["__call__"]
    with pytest.raises(RuntimeError), graph_capture_undone_on_failure([OwnCall()]):
        OwnCall.__call__ = autocast_wrapper
        raise RuntimeError("capture failed")
    assert OwnCall.__dict__["__call__"] is own

    with graph_capture_undone_on_failure([layer]):  # a capture that succeeds keeps what it did
        Layer.__call__ = torch.nn.Module.__call__
    assert Layer.__dict__["__call__"] is torch.nn.Module.__call__
