"""The files of a Megatron corpus: ``<prefix>.bin`` (tokens), ``<prefix>.idx`` (Megatron's index), this package's
``<prefix>.corpus.json`` sidecar and, for a chat corpus (``llama-fp8 preprocess --chat``), ``<prefix>.loss_mask.bin``;
written under temporary names and published whole.

A corpus is of one of two kinds, the sidecar's ``kind``: ``"text"`` (pretraining: every token is learned; sidecars
older than the key are text) or ``"chat"`` (fine-tuning: one conversation per document, and a loss mask that says
which tokens are learned). The loss mask is uint8, one byte per token, aligned one to one with the ``.bin``: element
``i`` of the mask belongs to token element ``i``, so a sequence's mask starts at its ``.idx`` pointer divided by the
token itemsize (:class:`LossMask` reads it as megatron-core's ``IndexedDataset.get`` reads the tokens). 1 marks a
token the model learns to predict (an answer's text and the end-of-turn token that closes it), 0 the rest (system
and user messages, headers, BOS).

The sidecar is a hint, not proof: it is trusted only while its ``binding`` matches, a SHA-256 over the claims
training relies on (largest token id, counts, dtype, tokenizer, kind, ...), the whole ``.idx`` and 64 blocks of 64
KiB spread over the ``.bin`` (all of a ``.bin`` up to 4 MiB), and as many of the loss mask. A sidecar left behind by
an earlier corpus of that name, copied beside another corpus or edited by hand no longer matches (:func:`check_sidecar`
says why), and training then reads the token ids from the ``.bin`` instead (or refuses a corpus too large to read;
``data/indexed.py``). File times are not part of it, so a copied corpus keeps its sidecar; a ``.bin`` changed in place,
between the sampled blocks, at the same size, is what it cannot see. Checking a sidecar costs a read of the ``.idx``:
1.1 s for 20 million documents (a 400 MB ``.idx``) from the page cache, once per process.
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
#: 2: the sidecar carries a ``binding`` to its files (version 1 had none and is not trusted); 3: a ``kind``, and for
#: chat corpora the loss mask and what made it, bound too.
SIDECAR_VERSION = 3
#: ``<prefix>.loss_mask.bin`` of a chat corpus.
LOSS_MASK_SUFFIX = ".loss_mask.bin"
LOSS_MASK_DTYPE = numpy.uint8
#: The sidecar's ``kind`` of a pretraining corpus (also of sidecars without the key) and of a chat corpus.
TEXT_KIND, CHAT_KIND = "text", "chat"
#: The sidecar fields training relies on, as the first binding scheme (sidecar version 2) covered them.
BOUND_CLAIMS_V1 = (
    "documents",
    "tokens",
    "max_token_id",
    "dtype",
    "tokenizer",
    "append_eod",
    "special_tokens_added",
    "parse_special_tokens",
)
#: The sidecar fields training relies on: the binding covers exactly these (a text corpus has no chat fields).
BOUND_CLAIMS = (
    *BOUND_CLAIMS_V1,
    "kind",
    "chat_template",
    "max_seq_length",
    "too_long",
    "answer_tokens",
)
BINDING_SCHEME_V1 = "sha256 over claims, .idx, .bin sample; v1"  # still trusted: text corpora made before kinds
BINDING_SCHEME = "sha256 over claims, .idx, .bin sample, loss mask sample; v2"
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


def loss_mask_path(prefix: str | Path) -> Path:
    """``<prefix>.loss_mask.bin``: a chat corpus's loss mask (module docstring)."""
    return Path(f"{prefix}{LOSS_MASK_SUFFIX}")


def loss_mask_bytes(bin_bytes: int, dtype: type[numpy.integer] | numpy.dtype | str) -> int:
    """The size of the loss mask of a ``.bin`` of ``bin_bytes`` bytes of ``dtype`` tokens: one byte per token."""
    return bin_bytes // numpy.dtype(dtype).itemsize * numpy.dtype(LOSS_MASK_DTYPE).itemsize


def _corpus_files(prefix: Path) -> list[Path]:
    return [bin_path(prefix), loss_mask_path(prefix), idx_path(prefix), sidecar_path(prefix)]


def output_files(prefix: Path) -> list[Path]:
    """Every file a preprocess run of ``prefix`` writes or replaces: the corpus (a text corpus replacing a chat one
    removes its loss mask), their temporary names and the lock."""
    finals = _corpus_files(prefix)
    return finals + [Path(f"{path}{TMP_SUFFIX}") for path in finals] + [lock_path(prefix)]


def output_prefix_path(given: str | os.PathLike[str]) -> Path:
    """``--output-prefix`` as a path, refusing one that names no file prefix: empty, ending with a path separator, or
    an existing directory (``out_dir/`` would otherwise write ``out_dir.bin`` beside the directory)."""
    text = os.fspath(given)
    if not text.strip():
        raise CorpusInputError(
            "--output-prefix is empty: give a file prefix such as data/corpus (writes data/corpus.bin, "
            "data/corpus.idx and data/corpus.corpus.json)."
        )
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    path = Path(text).expanduser()
    if text.endswith(separators) or path.is_dir():
        directory = text.rstrip("".join(separators)) or text
        raise CorpusInputError(
            f"--output-prefix {text} names a directory, not a file prefix: give a prefix inside it, e.g. "
            f"{os.path.join(directory, 'corpus')} (writes corpus.bin, corpus.idx and corpus.corpus.json there)."
        )
    return path


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
    existing = [p for p in _corpus_files(prefix) if p.exists()]
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
    """Rename the finished files into place: the index last, so a corpus exists only once it is whole.

    A chat corpus (``sidecar["kind"] == "chat"``) publishes its ``<prefix>.loss_mask.bin.tmp`` too, before the index;
    any other corpus removes a loss mask left by an earlier chat corpus of that prefix.
    """
    final_bin, final_idx, final_sidecar = bin_path(prefix), idx_path(prefix), sidecar_path(prefix)
    final_mask = loss_mask_path(prefix)
    final_idx.unlink(missing_ok=True)  # an overwritten corpus stops existing before its .bin is replaced
    final_sidecar.unlink(missing_ok=True)
    final_mask.unlink(missing_ok=True)
    with_mask = sidecar.get("kind") == CHAT_KIND
    sidecar["bin_bytes"] = Path(f"{final_bin}{TMP_SUFFIX}").stat().st_size
    sidecar["idx_bytes"] = Path(f"{final_idx}{TMP_SUFFIX}").stat().st_size
    if with_mask:
        sidecar["loss_mask_bytes"] = Path(f"{final_mask}{TMP_SUFFIX}").stat().st_size
    Path(f"{final_sidecar}{TMP_SUFFIX}").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    os.replace(f"{final_bin}{TMP_SUFFIX}", final_bin)
    if with_mask:
        os.replace(f"{final_mask}{TMP_SUFFIX}", final_mask)
    os.replace(f"{final_sidecar}{TMP_SUFFIX}", final_sidecar)
    os.replace(f"{final_idx}{TMP_SUFFIX}", final_idx)


def remove_partial_corpus(prefix: Path) -> None:
    """Remove the temporary files of an unfinished run (a published corpus of that prefix is left as it is)."""
    for path in _corpus_files(prefix):
        Path(f"{path}{TMP_SUFFIX}").unlink(missing_ok=True)


def corpus_binding(
    claims: Mapping[str, Any], bin_file: Path, idx_file: Path, loss_mask_file: Path | None = None
) -> dict[str, Any]:
    """The ``binding`` of a sidecar whose ``claims`` describe ``bin_file`` + ``idx_file`` (+ the loss mask of a chat
    corpus), see the module docstring."""
    binding: dict[str, Any] = {
        "scheme": BINDING_SCHEME,
        "bin_bytes": bin_file.stat().st_size,
        "idx_bytes": idx_file.stat().st_size,
        "loss_mask_bytes": None if loss_mask_file is None else loss_mask_file.stat().st_size,
        "bin_sample_blocks": BIN_SAMPLE_BLOCKS,
        "bin_sample_block_bytes": BIN_SAMPLE_BLOCK_BYTES,
    }
    binding["sha256"] = _binding_digest(claims, binding, bin_file, idx_file, loss_mask_file)
    return binding


def _binding_digest(
    claims: Mapping[str, Any],
    binding: Mapping[str, Any],
    bin_file: Path,
    idx_file: Path,
    loss_mask_file: Path | None = None,
) -> str:
    """The digest of a binding of either scheme (v1: no kind, no loss mask)."""
    first_scheme = binding["scheme"] == BINDING_SCHEME_V1
    digest = hashlib.sha256()
    header = {key: claims.get(key) for key in (BOUND_CLAIMS_V1 if first_scheme else BOUND_CLAIMS)}
    header.update({key: binding[key] for key in ("scheme", "bin_bytes", "idx_bytes")})
    header.update({key: binding[key] for key in ("bin_sample_blocks", "bin_sample_block_bytes")})
    if not first_scheme:
        header["loss_mask_bytes"] = binding["loss_mask_bytes"]
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    blocks, block_bytes = int(binding["bin_sample_blocks"]), int(binding["bin_sample_block_bytes"])
    _digest_files(digest, bin_file, int(binding["bin_bytes"]), idx_file, blocks, block_bytes)
    if not first_scheme and binding["loss_mask_bytes"] is not None:
        if loss_mask_file is None:
            raise FileNotFoundError(f"the binding covers a loss mask, and none was given beside {bin_file}")
        _digest_sample(digest, loss_mask_file, int(binding["loss_mask_bytes"]), blocks, block_bytes)
    return digest.hexdigest()


def _digest_files(digest: Any, bin_file: Path, bin_bytes: int, idx_file: Path, blocks: int, block_bytes: int) -> None:
    """Feed ``digest`` the whole ``.idx`` and ``blocks`` blocks spread from the first to the last byte of the
    ``.bin`` (the whole ``.bin`` if it is no larger than those blocks)."""
    with open(idx_file, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    _digest_sample(digest, bin_file, bin_bytes, blocks, block_bytes)


def _digest_sample(digest: Any, path: Path, size: int, blocks: int, block_bytes: int) -> None:
    """Feed ``digest`` ``blocks`` blocks spread from the first to the last byte of ``path`` (all of a small file)."""
    if size <= blocks * block_bytes:
        offsets = list(range(0, size, block_bytes))
    else:
        offsets = [i * (size - block_bytes) // (blocks - 1) for i in range(blocks)]
    with open(path, "rb") as fh:
        for offset in offsets:
            fh.seek(offset)
            digest.update(fh.read(block_bytes))


def corpus_fingerprint(prefix: str | Path) -> str:
    """A SHA-256 of the corpus ``prefix`` as a sidecar binding sees it: its ``.bin`` size, the whole ``.idx`` and 64
    blocks of the ``.bin``. Equal for copies; different once the files are replaced, whatever their sizes.

    What a cache built from a corpus should be keyed by: megatron-core keys its cached sample indices
    (``path_to_cache``) by the corpus path and the dataset config only, so a corpus re-created under the same
    prefix reuses indices of the old one (an IndexError at the first batch, or samples cut at the wrong places).
    The loss mask of a chat corpus is not part of it (sample indices do not depend on it).
    """
    bin_file, idx_file = bin_path(prefix), idx_path(prefix)
    bin_bytes = bin_file.stat().st_size
    # The first scheme's name, so that fingerprints (cache keys) of existing corpora stay what they were.
    digest = hashlib.sha256(f"{BINDING_SCHEME_V1}; bin_bytes {bin_bytes}\n".encode())
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
    mask_file = loss_mask_path(prefix)
    try:
        mask_stat = os.stat(mask_file)
        key += ((os.path.realpath(mask_file), mask_stat.st_ino, mask_stat.st_size, mask_stat.st_mtime_ns),)
    except OSError:
        key += (None,)
    if key not in _checked:
        _checked[key] = _check_sidecar(path, bin_path(prefix), idx_path(prefix), mask_file)
    return _checked[key]


def _check_sidecar(path: Path, bin_file: Path, idx_file: Path, mask_file: Path) -> SidecarCheck:
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return SidecarCheck(None, f"{path} cannot be read as JSON ({err})")
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return SidecarCheck(None, f"{path} is not a corpus sidecar of llama-fp8 preprocess")
    binding = sidecar.get("binding")
    parameters = ("bin_bytes", "idx_bytes", "bin_sample_blocks", "bin_sample_block_bytes")
    scheme = binding.get("scheme") if isinstance(binding, dict) else None
    mask_size = binding.get("loss_mask_bytes") if isinstance(binding, dict) else None
    if (
        not isinstance(binding, dict)
        or scheme not in (BINDING_SCHEME, BINDING_SCHEME_V1)
        or not all(type(binding.get(key)) is int and binding[key] >= 0 for key in parameters)
        or (scheme == BINDING_SCHEME and not (mask_size is None or (type(mask_size) is int and mask_size >= 0)))
        or (scheme == BINDING_SCHEME_V1 and sidecar.get("kind", TEXT_KIND) != TEXT_KIND)
        or binding["bin_sample_blocks"] < 2
        or not isinstance(binding.get("sha256"), str)
    ):
        return SidecarCheck(
            None, f"{path} is not bound to its files (written by an older llama-fp8 preprocess, or edited)"
        )
    if (sidecar.get("kind") == CHAT_KIND) != (scheme == BINDING_SCHEME and mask_size is not None):
        return SidecarCheck(None, f"{path} says a kind ({sidecar.get('kind')!r}) that its binding does not (edited?)")
    sizes = (bin_file.stat().st_size, idx_file.stat().st_size)
    if sizes != (binding["bin_bytes"], binding["idx_bytes"]):
        return SidecarCheck(
            None,
            f"{path} describes a {binding['bin_bytes']:,}-byte .bin and a {binding['idx_bytes']:,}-byte .idx, not "
            f"these ({sizes[0]:,} and {sizes[1]:,} bytes): it belongs to another corpus of that name",
        )
    if mask_size is not None:
        try:
            found = mask_file.stat().st_size
        except OSError as err:
            return SidecarCheck(None, f"{path} is a chat corpus's, and its loss mask {mask_file} is missing ({err})")
        if found != mask_size:
            return SidecarCheck(
                None,
                f"{path} describes a {mask_size:,}-byte loss mask, not this one ({found:,} bytes, {mask_file}): it "
                "belongs to another corpus of that name",
            )
    try:
        digest = _binding_digest(sidecar, binding, bin_file, idx_file, mask_file)
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


def corpus_kind(prefix: str | Path) -> str | None:
    """``"text"`` or ``"chat"``, as the trusted sidecar of the corpus ``prefix`` says (a sidecar older than kinds:
    ``"text"``); ``None`` without a trusted sidecar (:func:`check_sidecar` says why)."""
    sidecar = read_sidecar(prefix)
    return None if sidecar is None else str(sidecar.get("kind", TEXT_KIND))


def require_corpus_kind(prefix: str | Path, kind: str) -> dict[str, Any] | None:
    """Check, before any training, that the corpus ``prefix`` is of ``kind``; return its trusted sidecar.

    ``"chat"`` needs a trusted sidecar saying so (the loss mask and the rendering are what it vouches for);
    ``"text"`` refuses only a corpus whose trusted sidecar says ``"chat"`` (a corpus of Megatron-LM's tools has no
    sidecar and is text).

    Raises:
        CorpusInputError: the corpus is of the other kind, or a chat corpus cannot be trusted; the message says how
            to make the right one.
    """
    if kind not in (TEXT_KIND, CHAT_KIND):
        raise ValueError(f"kind must be {TEXT_KIND!r} or {CHAT_KIND!r}; got {kind!r}.")
    found = check_sidecar(prefix)
    found_kind = None if found.sidecar is None else str(found.sidecar.get("kind", TEXT_KIND))
    if kind == CHAT_KIND and found_kind != CHAT_KIND:
        if found_kind is None:
            why = found.problem or f"there is no {sidecar_path(prefix)}"
            raise CorpusInputError(
                f"Corpus {prefix!r} cannot be used for fine-tuning: {why}. A chat corpus (token ids, loss mask and "
                "sidecar) is made by `llama-fp8 preprocess --chat --max-seq-length N --input CONVERSATIONS.jsonl "
                "--output-prefix PREFIX`."
            )
        raise CorpusInputError(
            f"Corpus {prefix!r} is a pretraining (text) corpus, made without --chat: it has no loss mask and no "
            "conversation per document. Make a chat corpus with `llama-fp8 preprocess --chat ...` from conversations, "
            "or train this one with IndexedDataModule."
        )
    if kind == TEXT_KIND and found_kind == CHAT_KIND:
        raise CorpusInputError(
            f"Corpus {prefix!r} is a chat corpus (llama-fp8 preprocess --chat): its loss mask restricts the loss to "
            "the answers, which a pretraining data module would ignore. Train it with the fine-tuning (SFT) data "
            "module, or make a text corpus with llama-fp8 preprocess without --chat."
        )
    return found.sidecar


def read_index(idx_file: Path) -> tuple[numpy.dtype, numpy.ndarray, numpy.ndarray]:
    """The token dtype, sequence lengths and byte pointers of Megatron's ``.idx`` (version 1)."""
    codes = {code: numpy.dtype(dtype) for dtype, code in DTYPE_CODES.items()}
    with open(idx_file, "rb") as fh:
        header = fh.read(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
    if len(header) < 34 or not header.startswith(INDEX_HEADER) or struct.unpack("<Q", header[9:17])[0] != 1:
        raise CorpusInputError(f"{idx_file} is not a Megatron index (version 1); re-create the corpus.")
    code, sequences = header[17], struct.unpack("<Q", header[18:26])[0]
    if code not in codes:
        raise CorpusInputError(f"{idx_file} holds tokens of dtype code {code}, which preprocess never writes.")
    lengths = numpy.memmap(idx_file, dtype=numpy.int32, mode="r", offset=34, shape=(sequences,))
    pointers = numpy.memmap(idx_file, dtype=numpy.int64, mode="r", offset=34 + 4 * sequences, shape=(sequences,))
    return codes[code], lengths, pointers


class LossMask:
    """The loss mask of the chat corpus ``prefix``, read per sequence as megatron-core's ``IndexedDataset.get``
    reads its tokens: ``LossMask(prefix).get(i, offset, length)`` is the mask of ``dataset.get(i, offset, length)``
    (uint8, 1 = a token to learn; see the module docstring).

    Opening checks the mask against the ``.bin`` (one byte per token) and maps it read-only; it does not check the
    sidecar (:func:`require_corpus_kind` does).

    Raises:
        CorpusInputError: no loss mask beside the corpus, or one of another size than its ``.bin``.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix, self.path = str(prefix), loss_mask_path(prefix)
        self.token_dtype, self.sequence_lengths, pointers = read_index(idx_path(prefix))
        self.sequence_starts = pointers // self.token_dtype.itemsize  # token (= mask byte) offsets
        tokens = bin_path(prefix).stat().st_size // self.token_dtype.itemsize
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CorpusInputError(
                f"Corpus {self.prefix!r} has no loss mask ({self.path}): only chat corpora have one; make it with "
                "`llama-fp8 preprocess --chat`."
            ) from None
        if size != tokens * numpy.dtype(LOSS_MASK_DTYPE).itemsize:
            raise CorpusInputError(
                f"{self.path} has {size:,} bytes for the {tokens:,} tokens of {bin_path(prefix)} (one byte per "
                "token): it belongs to another corpus; re-create the corpus with llama-fp8 preprocess --chat."
            )
        self.mask = numpy.memmap(self.path, dtype=LOSS_MASK_DTYPE, mode="r", shape=(tokens,))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> numpy.ndarray:
        """The mask of sequence ``index`` from token ``offset``, ``length`` tokens (``None``: to its end); a view."""
        start = int(self.sequence_starts[index]) + offset
        end = int(self.sequence_starts[index]) + int(self.sequence_lengths[index])
        if length is not None:
            end = min(end, start + length)
        return self.mask[start:end]
