"""The files of a Megatron corpus: ``<prefix>.bin`` (tokens), ``<prefix>.idx`` (Megatron's index) and this package's
``<prefix>.corpus.json`` sidecar; written under temporary names and published whole."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy

#: ``<prefix>.corpus.json``: what made the corpus (tokenizer, counts, largest token id).
SIDECAR_SUFFIX = ".corpus.json"
SIDECAR_FORMAT = "lightning-llama-fp8 corpus"
TMP_SUFFIX = ".tmp"
INDEX_HEADER = b"MMIDIDX\x00\x00"  # Megatron's index magic, version 1 follows
# Megatron's index dtype codes (megatron.core.datasets.indexed_dataset.DType); kept here so that preprocessing
# does not import megatron-core (seconds of start-up). A test checks them against megatron-core's.
DTYPE_CODES: dict[type[numpy.integer], int] = {numpy.uint8: 1, numpy.int32: 4, numpy.uint16: 8}


class CorpusInputError(ValueError):
    """Bad input for :func:`preprocess`; the message names the file (and line) and the fix."""


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def sidecar_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{SIDECAR_SUFFIX}")


def check_output_prefix(prefix: Path, overwrite: bool) -> None:
    parent = prefix.parent
    if not parent.is_dir():
        raise CorpusInputError(f"Output directory {parent} does not exist; create it first (mkdir -p {parent}).")
    if not os.access(parent, os.W_OK):
        raise CorpusInputError(f"Output directory {parent} is not writable.")
    existing = [p for p in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix)) if p.exists()]
    if existing and not overwrite:
        raise CorpusInputError(
            f"Output {', '.join(map(str, existing))} already exists; choose another --output-prefix or pass "
            "--overwrite to replace it."
        )


def token_dtype(vocab_size: int) -> type[numpy.integer]:
    """The ``.bin`` integer type for a vocabulary, as Megatron-LM's ``DType.optimal_dtype`` picks it."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def write_index(path: Path, dtype: type[numpy.integer], lengths: numpy.ndarray, documents: numpy.ndarray) -> None:
    """Megatron's ``.idx`` (version 1): header, dtype code, counts, sequence lengths, byte offsets, document starts."""
    itemsize = numpy.dtype(dtype).itemsize
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    if len(lengths) > 1:
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as fh:
        fh.write(INDEX_HEADER)
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", DTYPE_CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(documents)))
        fh.write(lengths.astype(numpy.int32).tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(documents.astype(numpy.int64).tobytes(order="C"))
        fh.flush()
        os.fsync(fh.fileno())


def publish_corpus(prefix: Path, sidecar: dict[str, Any]) -> None:
    """Rename the finished files into place: the index last, so a corpus exists only once it is whole."""
    final_bin, final_idx, final_sidecar = bin_path(prefix), idx_path(prefix), sidecar_path(prefix)
    final_idx.unlink(missing_ok=True)  # an overwritten corpus stops existing before its .bin is replaced
    final_sidecar.unlink(missing_ok=True)
    sidecar["bin_bytes"] = Path(f"{final_bin}{TMP_SUFFIX}").stat().st_size
    sidecar["idx_bytes"] = Path(f"{final_idx}{TMP_SUFFIX}").stat().st_size
    Path(f"{final_sidecar}{TMP_SUFFIX}").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    os.replace(f"{final_bin}{TMP_SUFFIX}", final_bin)
    os.replace(f"{final_sidecar}{TMP_SUFFIX}", final_sidecar)
    os.replace(f"{final_idx}{TMP_SUFFIX}", final_idx)


def remove_partial_corpus(prefix: Path) -> None:
    for path in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix)):
        Path(f"{path}{TMP_SUFFIX}").unlink(missing_ok=True)


def read_sidecar(prefix: str | Path) -> dict[str, Any] | None:
    """The ``<prefix>.corpus.json`` of a corpus, if it exists and still describes these ``.bin``/``.idx`` files.

    A sidecar whose recorded file sizes differ from the files on disk belongs to an earlier corpus of that name
    and is ignored (``None``), as is a missing or unreadable one.
    """
    path = sidecar_path(prefix)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return None
    try:
        sizes = (bin_path(prefix).stat().st_size, idx_path(prefix).stat().st_size)
    except OSError:
        return None
    if sizes != (sidecar.get("bin_bytes"), sidecar.get("idx_bytes")):
        return None
    return sidecar


# ---------------------------------------------------------------------------------------------------- the job
