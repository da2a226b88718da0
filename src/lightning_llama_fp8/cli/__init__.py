"""The ``llama-fp8`` command line (``fit``, ``validate``, ``plan``, ``preprocess``, ``convert``)."""

from lightning_llama_fp8.cli.fit import main

__all__ = ["main"]
