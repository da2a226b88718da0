"""The public API the README documents resolves: every name the facades export, and the documented submodule paths."""

from __future__ import annotations

import importlib

import pytest

FACADES = ("lightning_llama_fp8", "lightning_llama_fp8.callbacks", "lightning_llama_fp8.data", "lightning_llama_fp8.hf")

#: Paths the README's "Public API" names, module -> names.
DOCUMENTED = {
    "lightning_llama_fp8.pipeline_layout": ("model_chunks", "bubble_fraction"),
    "lightning_llama_fp8.precision": ("fp8_support", "FP8UnavailableError", "TEFP8Precision", "MegatronPrecision"),
    "lightning_llama_fp8.plan": ("plan_training", "format_plan", "TrainingPlan"),
    "lightning_llama_fp8.data.preprocess": ("preprocess",),
    "lightning_llama_fp8.data": (
        "read_sidecar",
        "resolve_tokenizer",
        "check_token_ids",
        "CorpusInputError",
        "SFTDataModule",
        "check_chat_corpus",
    ),
    "lightning_llama_fp8.hf": ("load_hf_weights", "export_to_hf", "HFConfigError"),
    "lightning_llama_fp8.cli": ("main",),
}


@pytest.mark.parametrize("facade", FACADES)
def test_every_exported_name_resolves(facade: str) -> None:
    module = importlib.import_module(facade)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{facade}.{name}"
    assert set(module.__all__) <= set(dir(module))


@pytest.mark.parametrize("path", sorted(DOCUMENTED))
def test_documented_paths_resolve(path: str) -> None:
    module = importlib.import_module(path)
    for name in DOCUMENTED[path]:
        assert callable(getattr(module, name)) or isinstance(getattr(module, name), type), f"{path}.{name}"


def test_the_documented_alias_is_the_same_function() -> None:
    from lightning_llama_fp8.parallel import pipeline_layout
    from lightning_llama_fp8.pipeline_layout import bubble_fraction, model_chunks

    assert model_chunks is pipeline_layout.model_chunks and bubble_fraction is pipeline_layout.bubble_fraction


def test_the_fine_tuning_data_module_is_one_class_in_both_facades() -> None:
    from lightning_llama_fp8 import SFTDataModule
    from lightning_llama_fp8.data import SFTDataModule as from_data
    from lightning_llama_fp8.data.sft import SFTDataModule as from_module

    assert SFTDataModule is from_data is from_module


def test_an_unknown_name_is_an_attribute_error() -> None:
    import lightning_llama_fp8

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        lightning_llama_fp8.NoSuchThing  # noqa: B018
