"""Package facades that import their submodules on first use.

``from lightning_llama_fp8 import MegatronCPStrategy`` needs Lightning, torch and megatron-core; ``llama-fp8 plan`` and
``llama-fp8 preprocess`` need none of them. A facade built here resolves each public name from its module only when
it is first read, so importing a package (which Python does before any of its submodules) costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``names`` (name -> module path) is imported from its
    module when first read, then cached in the package's namespace."""

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
