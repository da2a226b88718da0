"""The files of a Megatron corpus: ``<prefix>.bin`` (tokens), ``<prefix>.idx`` (Megatron's index) and this package's
``<prefix>.corpus.json`` sidecar; written under temporary names and published whole.

The sidecar is a hint, not proof: it is trusted only while its ``binding`` matches, a SHA-256 over the claims
training relies on (largest token id, counts, dtype, tokenizer, ...), the whole ``.idx`` and 64 blocks of 64 KiB
spread over the ``.bin`` (all of a ``.bin`` up to 4 MiB). A sidecar left behind by an earlier corpus of that name,
copied beside another corpus or edited by hand no longer matches (:func:`check_sidecar` says why), and training
then reads the token ids from the ``.bin`` instead (or refuses a corpus too large to read; ``data/indexed.py``).
File times are not part of it, so a copied corpus keeps its sidecar; a ``.bin`` changed in place, between the
sampled blocks, at the same size, is what it cannot see. Checking a sidecar costs a read of the ``.idx``: 1.1 s
for 20 million documents (a 400 MB ``.idx``) from the page cache, once per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from lightning_llama_fp8.storage.output_lock import lock_path
from lightning_llama_fp8.storage.paths import overlaps

#: ``<prefix>.corpus.json``: what made the corpus (tokenizer, counts, largest token id).
SIDECAR_SUFFIX = ".corpus.json"
SIDECAR_FORMAT = "lightning-llama-fp8 corpus"
#: 2: the sidecar carries a ``binding`` to its files (version 1 had none and is not trusted).
SIDECAR_VERSION = 2
#: The sidecar fields training relies on: the binding covers exactly these.
BOUND_CLAIMS = (
    "documents",
    "tokens",
    "max_token_id",
    "dtype",
    "tokenizer",
    "append_eod",
    "special_tokens_added",
    "parse_special_tokens",
)
BINDING_SCHEME = "sha256 over claims, .idx, .bin sample; v1"
BIN_SAMPLE_BLOCKS = 64
BIN_SAMPLE_BLOCK_BYTES = 1 << 16
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


def output_files(prefix: Path) -> list[Path]:
    """Every file a preprocess run of ``prefix`` writes or replaces: the corpus, its temporary names and its lock."""
    finals = [bin_path(prefix), idx_path(prefix), sidecar_path(prefix)]
    return finals + [Path(f"{path}{TMP_SUFFIX}") for path in finals] + [lock_path(prefix)]


def check_output_prefix(prefix: Path, overwrite: bool, reads: Sequence[Path] = ()) -> None:
    """Before any work: the corpus ``prefix`` can be written, replaces nothing the run reads (inputs, tokenizer),
    and replaces an existing corpus only with ``overwrite``."""
    parent = prefix.parent
    if not parent.is_dir():
        raise CorpusInputError(f"Output directory {parent} does not exist; create it first (mkdir -p {parent}).")
    if not os.access(parent, os.W_OK):
        raise CorpusInputError(f"Output directory {parent} is not writable.")
    for output in output_files(prefix):
        clash = next((read for read in reads if overlaps(output, read)), None)
        if clash is not None:
            raise CorpusInputError(
                f"--output-prefix {prefix} would write {output}, which is {clash}, an input of this run; choose "
                "another --output-prefix."
            )
        if output.is_dir() and not output.is_symlink():
            raise CorpusInputError(f"{output} is a directory; choose another --output-prefix.")
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


def corpus_binding(claims: Mapping[str, Any], bin_file: Path, idx_file: Path) -> dict[str, Any]:
    """The ``binding`` of a sidecar whose ``claims`` describe ``bin_file`` + ``idx_file`` (see the module docstring)."""
    binding: dict[str, Any] = {
        "scheme": BINDING_SCHEME,
        "bin_bytes": bin_file.stat().st_size,
        "idx_bytes": idx_file.stat().st_size,
        "bin_sample_blocks": BIN_SAMPLE_BLOCKS,
        "bin_sample_block_bytes": BIN_SAMPLE_BLOCK_BYTES,
    }
    binding["sha256"] = _binding_digest(claims, binding, bin_file, idx_file)
    return binding


def _binding_digest(claims: Mapping[str, Any], binding: Mapping[str, Any], bin_file: Path, idx_file: Path) -> str:
    digest = hashlib.sha256()
    header = {key: claims.get(key) for key in BOUND_CLAIMS}
    header.update({key: binding[key] for key in ("scheme", "bin_bytes", "idx_bytes")})
    header.update({key: binding[key] for key in ("bin_sample_blocks", "bin_sample_block_bytes")})
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    blocks, block_bytes = int(binding["bin_sample_blocks"]), int(binding["bin_sample_block_bytes"])
    _digest_files(digest, bin_file, int(binding["bin_bytes"]), idx_file, blocks, block_bytes)
    return digest.hexdigest()


def _digest_files(digest: Any, bin_file: Path, bin_bytes: int, idx_file: Path, blocks: int, block_bytes: int) -> None:
    """Feed ``digest`` the whole ``.idx`` and ``blocks`` blocks spread from the first to the last byte of the
    ``.bin`` (the whole ``.bin`` if it is no larger than those blocks)."""
    with open(idx_file, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    if bin_bytes <= blocks * block_bytes:
        offsets = list(range(0, bin_bytes, block_bytes))
    else:
        offsets = [i * (bin_bytes - block_bytes) // (blocks - 1) for i in range(blocks)]
    with open(bin_file, "rb") as fh:
        for offset in offsets:
            fh.seek(offset)
            digest.update(fh.read(block_bytes))


def corpus_fingerprint(prefix: str | Path) -> str:
    """A SHA-256 of the corpus ``prefix`` as a sidecar binding sees it: its ``.bin`` size, the whole ``.idx`` and 64
    blocks of the ``.bin``. Equal for copies; different once the files are replaced, whatever their sizes.

    What a cache built from a corpus should be keyed by: megatron-core keys its cached sample indices
    (``path_to_cache``) by the corpus path and the dataset config only, so a corpus re-created under the same
    prefix reuses indices of the old one (an IndexError at the first batch, or samples cut at the wrong places).
    """
    bin_file, idx_file = bin_path(prefix), idx_path(prefix)
    bin_bytes = bin_file.stat().st_size
    digest = hashlib.sha256(f"{BINDING_SCHEME}; bin_bytes {bin_bytes}\n".encode())
    _digest_files(digest, bin_file, bin_bytes, idx_file, BIN_SAMPLE_BLOCKS, BIN_SAMPLE_BLOCK_BYTES)
    return digest.hexdigest()


@dataclass(frozen=True)
class SidecarCheck:
    """What :func:`check_sidecar` found beside a corpus.

    Attributes:
        sidecar: the sidecar, if its binding matches the files (trusted); else ``None``.
        problem: why a sidecar that is there is not trusted (``None``: trusted, or there is none).
    """

    sidecar: dict[str, Any] | None
    problem: str | None


_checked: dict[tuple[Any, ...], SidecarCheck] = {}  # per process, by the three files' identity, size and mtime


def check_sidecar(prefix: str | Path) -> SidecarCheck:
    """The ``<prefix>.corpus.json`` of a corpus, trusted only if its binding matches the ``.bin`` and ``.idx``.

    Reads the whole ``.idx`` and 4 MiB of the ``.bin`` (once per process while the files stay the same).
    """
    path = sidecar_path(prefix)
    files = (path, bin_path(prefix), idx_path(prefix))
    try:
        stats = [os.stat(file) for file in files]
    except FileNotFoundError:
        if not path.exists():
            return SidecarCheck(None, None)
        return SidecarCheck(None, f"{path} is there but the corpus files are not")
    except OSError as err:
        return SidecarCheck(None, f"{path} or the corpus files cannot be read ({err})")
    key = tuple(
        (os.path.realpath(f), st.st_ino, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats, strict=True)
    )
    if key not in _checked:
        _checked[key] = _check_sidecar(path, bin_path(prefix), idx_path(prefix))
    return _checked[key]


def _check_sidecar(path: Path, bin_file: Path, idx_file: Path) -> SidecarCheck:
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return SidecarCheck(None, f"{path} cannot be read as JSON ({err})")
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return SidecarCheck(None, f"{path} is not a corpus sidecar of llama-fp8 preprocess")
    binding = sidecar.get("binding")
    parameters = ("bin_bytes", "idx_bytes", "bin_sample_blocks", "bin_sample_block_bytes")
    if (
        not isinstance(binding, dict)
        or binding.get("scheme") != BINDING_SCHEME
        or not all(type(binding.get(key)) is int and binding[key] >= 0 for key in parameters)
        or binding["bin_sample_blocks"] < 2
        or not isinstance(binding.get("sha256"), str)
    ):
        return SidecarCheck(
            None, f"{path} is not bound to its files (written by an older llama-fp8 preprocess, or edited)"
        )
    sizes = (bin_file.stat().st_size, idx_file.stat().st_size)
    if sizes != (binding["bin_bytes"], binding["idx_bytes"]):
        return SidecarCheck(
            None,
            f"{path} describes a {binding['bin_bytes']:,}-byte .bin and a {binding['idx_bytes']:,}-byte .idx, not "
            f"these ({sizes[0]:,} and {sizes[1]:,} bytes): it belongs to another corpus of that name",
        )
    try:
        digest = _binding_digest(sidecar, binding, bin_file, idx_file)
    except OSError as err:
        return SidecarCheck(None, f"the corpus files of {path} cannot be read ({err})")
    if digest != binding["sha256"]:
        return SidecarCheck(
            None,
            f"{path} does not match the corpus files or its own claims (its SHA-256 binding differs): the files "
            "were replaced by others of the same size, or the sidecar was edited",
        )
    return SidecarCheck(sidecar, None)


def read_sidecar(prefix: str | Path) -> dict[str, Any] | None:
    """The ``<prefix>.corpus.json`` of a corpus if it describes these ``.bin``/``.idx`` files, else ``None``.

    ``None`` also for a sidecar that is missing, unreadable, left by another corpus, edited, or not bound to its
    files; :func:`check_sidecar` says which.
    """
    return check_sidecar(prefix).sidecar


# ---------------------------------------------------------------------------------------------------- the job
