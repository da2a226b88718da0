"""torch's checkpoint-reader internals that ``hf/export.py`` reads tensors with are in the installed torch."""

from __future__ import annotations

from lightning_llama_fp8._compat import torch as torch_compat


def test_the_reader_internals_exist_in_the_installed_torch() -> None:
    assert callable(torch_compat.narrow_tensor_by_index)
    assert callable(torch_compat.create_file_view)
