"""The FP8 recipes and their checks that need no GPU (fp8/recipes.py)."""

from __future__ import annotations

import pytest


def test_bf16_layers_that_cover_every_layer_are_refused() -> None:
    from lightning_llama_fp8 import TEFP8Precision
    from lightning_llama_fp8.fp8.recipes import check_bf16_layers

    plugin = TEFP8Precision(recipe="current", bf16_first_layers=1, bf16_last_layers=1)
    plugin.check_num_layers(3)  # one FP8 layer left
    with pytest.raises(ValueError, match=r"keeps 2 layers in BF16, but the model has 2: no layer would train in FP8"):
        plugin.check_num_layers(2)
    with pytest.raises(ValueError, match="no layer would train in FP8"):
        check_bf16_layers(4, 0, 4)
    check_bf16_layers(0, 0, 1)


def test_bf16_end_layers_fit_megatrons_per_stage_limit() -> None:
    from lightning_llama_fp8.fp8.recipes import check_bf16_layers

    check_bf16_layers(8, 8, 32, 4)  # num_layers / PP = 8 at either end
    with pytest.raises(ValueError, match=r"at most num_layers / PP = 8 BF16 layers at either end"):
        check_bf16_layers(10, 0, 32, 4)
    check_bf16_layers(10, 0, 32, 1)  # without PP only "some layer stays in FP8"
