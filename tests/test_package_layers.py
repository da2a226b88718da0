"""The package's import order: every import points down the layers below, and no module imports itself back.

Each module of ``lightning_llama_fp8`` belongs to the first layer entry its dotted name starts with (the longest
match wins). A module may import modules of lower layers and of its own entry; entries that share a layer are
independent of each other. Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "lightning_llama_fp8"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: Top layer first. Entries of one layer are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    (f"{PACKAGE}.__init__",),  # the public facade
    (f"{PACKAGE}.cli",),
    (f"{PACKAGE}.pipeline_layout",),  # the documented path of parallel.pipeline_layout
    (f"{PACKAGE}.model",),  # the LightningModule, built for the strategy below
    (f"{PACKAGE}.strategy", f"{PACKAGE}.plan"),
    (f"{PACKAGE}.hf",),
    (f"{PACKAGE}.data",),
    (f"{PACKAGE}.checkpoint", f"{PACKAGE}.callbacks"),
    (f"{PACKAGE}.precision",),
    (f"{PACKAGE}.parallel", f"{PACKAGE}.fp8"),
    (f"{PACKAGE}.config",),
    (f"{PACKAGE}.hf.config",),  # Hugging Face config.json read into LlamaConfig's fields (for LlamaConfig.from_hf)
    (f"{PACKAGE}._compat", f"{PACKAGE}._lazy", f"{PACKAGE}.storage", f"{PACKAGE}.validate"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imported_modules(name: str) -> Iterator[str]:
    """The package's modules that module ``name`` imports (a ``from X import y`` of a submodule ``y`` counts as
    importing ``X.y``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if (target.startswith(PACKAGE) and target != name and target != PACKAGE) or target == PACKAGE != name:
                yield target


def place(name: str) -> tuple[int, str]:
    """(layer index, entry) of module ``name``: the longest entry it falls under."""
    candidates = [
        (len(entry), index, entry)
        for index, layer in enumerate(LAYERS)
        for entry in layer
        if name == entry or name.startswith(entry + ".") or (entry.endswith(".__init__") and name == PACKAGE)
    ]
    assert candidates, f"{name} is in no layer: add it to LAYERS"
    _, index, entry = max(candidates)
    return index, entry


EDGES = {name: sorted(set(imported_modules(name))) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        place(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    layer, entry = place(name)
    wrong = []
    for target in EDGES[name]:
        target_layer, target_entry = place(target)
        if target_entry != entry and target_layer <= layer:
            wrong.append(f"{target} ({'same layer' if target_layer == layer else 'a higher layer'}: {target_entry})")
    assert not wrong, f"{name} ({entry}) imports " + ", ".join(wrong)


def test_no_import_cycles() -> None:
    """No module reaches itself through the imports of others (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in EDGES[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in MODULES:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_function_level_and_type_checking_imports() -> None:
    """The edges come from every import statement: the facade's lazy names and a function-level import count."""
    assert f"{PACKAGE}.strategy" in EDGES[PACKAGE]  # under TYPE_CHECKING in __init__.py
    assert f"{PACKAGE}.hf.config" in EDGES[f"{PACKAGE}.config"]  # inside LlamaConfig.from_hf
