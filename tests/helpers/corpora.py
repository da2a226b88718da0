"""Inputs and corpora of the data tests: JSON-lines text and Megatron ``.bin``/``.idx`` corpora."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

#: Texts a tokenizer has to get right: Unicode, code, surrounding spaces, one long document, an empty one.
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: 日本語のテキスト, emoji 🦙, and tabs\tand\nnewlines.",
    "def f(x):\n    return x ** 2  # code is text too\n",
    " leading space and trailing space ",
    "A" * 5000,  # one long document
    "",  # empty text: the tokenizer still adds <|begin_of_text|>
]


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


LLAMA3_VOCAB = 128256  # model.arch.vocab_size of every Llama 3 preset


def megatron_corpus(prefix: Path, documents: list[list[int]]) -> Path:
    """A corpus as Megatron-LM's tools write it: no sidecar."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for ids in documents:
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def chat_corpus(
    prefix: Path, chats: list[tuple[list[int], list[int]]], kind: str | None = "chat", mask: bytes | None = None
) -> str:
    """A chat corpus as llama-fp8 preprocess --chat writes one: .bin/.idx (one document per conversation, int32), the
    loss mask (one byte per token; ``mask`` replaces it) and a sidecar bound to the files. ``kind`` "text" or None (a
    sidecar without the key): a text corpus, no loss mask."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from lightning_llama_fp8.data.corpus import (
        SIDECAR_FORMAT,
        SIDECAR_VERSION,
        corpus_binding,
        loss_mask_path,
        sidecar_path,
    )

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for ids, _ in chats:
        builder.add_document(numpy.asarray(ids, dtype=numpy.int32), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "documents": len(chats),
        "tokens": sum(len(ids) for ids, _ in chats),
        "max_token_id": max(max(ids) for ids, _ in chats),
        "dtype": "int32",
        "tokenizer": {"name": "test", "sha256": "0" * 64},
    }
    mask_file = None
    if kind == "chat":
        mask_file = loss_mask_path(prefix)
        masks = numpy.concatenate([numpy.asarray(m, dtype=numpy.uint8) for _, m in chats]).tobytes()
        mask_file.write_bytes(masks if mask is None else mask)
    if kind is not None:
        sidecar["kind"] = kind
    sidecar["binding"] = corpus_binding(sidecar, Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), mask_file)
    sidecar_path(prefix).write_text(json.dumps(sidecar))
    return str(prefix)
