"""The megatron-core private calls of ``_compat/megatron.py`` exist in the installed megatron-core and are made."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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
