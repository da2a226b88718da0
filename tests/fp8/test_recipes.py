"""The FP8 recipes and their checks that need no GPU (fp8/recipes.py)."""

from __future__ import annotations

import pytest

from lightning_llama_fp8.fp8.recipes import resolve_recipe
from lightning_llama_fp8.fp8.support import fp8_support
from lightning_llama_fp8.precision import TEFP8Precision


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


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("delayed", "delayed"), ("current", "current"), ("tensorwise", "current"), ("blockwise", "blockwise")],
)
def test_recipe_names_resolve(name: str, canonical: str) -> None:
    assert resolve_recipe(name) == canonical
    assert TEFP8Precision(recipe=name).recipe == canonical  # type: ignore[arg-type]


def test_resolve_unknown_recipe() -> None:
    with pytest.raises(ValueError, match=r"Unknown FP8 recipe 'custom'"):
        resolve_recipe("custom")
    with pytest.raises(ValueError, match=r"Unknown FP8 recipe 'nvfp4'"):
        fp8_support("nvfp4")
