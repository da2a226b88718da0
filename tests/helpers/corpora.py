"""Inputs and corpora of the data tests: JSON-lines text and Megatron ``.bin``/``.idx`` corpora."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def write_jsonl(path: Path, documents: list[str], key: str = "text", compress: bool = False) -> Path:
    """One JSON object per document (``{key: text, "id": i}``), gzip-compressed if asked."""
    lines = "".join(json.dumps({key: doc, "id": i}) + "\n" for i, doc in enumerate(documents))
    data = lines.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_corpus(prefix: Path, documents: int, low: int, high: int, seed: int = 0) -> list[torch.Tensor]:
    """A corpus of ``documents`` random documents (20-200 tokens, ids in [low, high)), as preprocess_data.py would."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    generator = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    docs = []
    for _ in range(documents):
        length = int(torch.randint(20, 200, (1,), generator=generator))
        doc = torch.randint(low, high, (length,), generator=generator, dtype=torch.int32)
        builder.add_document(doc, [length])
        docs.append(doc)
    builder.finalize(f"{prefix}.idx")
    return docs
