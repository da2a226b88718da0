"""Safetensors directories: a checked reader that reads single tensors or slices, and a streaming sharded writer.

Reading checks the whole directory before any tensor is read: the index (``model.safetensors.index.json``) or the
single ``model.safetensors``, every shard it names present, and each shard's header and length (a truncated copy
is found from the header's offsets, without reading tensor data). Tensors are then read one slice at a time with
``safetensors.safe_open(...).get_slice``, so a tensor-parallel rank reads only its own rows or columns.

Writing buffers tensors until a shard is full and hands the shard to a background thread, which writes it while the
caller reads and converts the next one (safetensors' serializer releases the GIL, so reading and writing overlap):
peak memory is about two shards plus what the caller holds, whatever the model size. The files get Hugging Face's
names (``model-00001-of-00004.safetensors``) and an index once the number of shards is known.
:class:`PlannedSafetensorsWriter` (the export's) writes the same files when every tensor's name, dtype and shape is
known in advance: each tensor goes to its place in its shard as it arrives, so nothing is buffered.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lightning_llama_fp8.hf.config import HFConfigError
from lightning_llama_fp8.storage.paths import PathOutsideFolderError, path_inside

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: The shard size transformers' ``save_pretrained`` uses by default.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1})


class SafetensorsDir:
    """The weights of a Hugging Face model directory, checked on construction; reads tensors or slices on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            raise HFConfigError(
                f"{self.path} is a file; give the Hugging Face model directory holding config.json and the "
                f"safetensors ({self.path.parent})."
            )
        if not self.path.is_dir():
            raise HFConfigError(f"Hugging Face model directory {self.path} does not exist (or is not a directory).")
        self.file_of: dict[str, str] = self._tensor_files()
        self.headers: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self.file_of.values())):
            self.headers[name] = read_header(self.path / name)
        for tensor, name in self.file_of.items():
            if tensor not in self.headers[name]:
                raise HFConfigError(
                    f"{self.path / INDEX_FILE} says tensor {tensor} is in {name}, but that file does not hold it "
                    "(the index and the shards are from different saves?)."
                )

    def _tensor_files(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise HFConfigError(f"{index} is not a safetensors index (no readable 'weight_map': {err}).") from err
            if not isinstance(weight_map, dict):
                raise HFConfigError(f"{index}: 'weight_map' is not a mapping of tensor names to files.")
            for name in set(weight_map.values()):
                try:
                    path_inside(self.path, name, index)
                except PathOutsideFolderError as err:
                    raise HFConfigError(str(err)) from err
            missing = sorted({name for name in weight_map.values() if not (self.path / name).is_file()})
            if missing:
                raise HFConfigError(
                    f"{self.path}: shard(s) {', '.join(missing)} named by {INDEX_FILE} are missing. Download or copy "
                    "the complete model."
                )
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in read_header(single)}
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        hint = f" It has {', '.join(found)} but no {INDEX_FILE}." if found else ""
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pth")):
            hint += " Only safetensors weights are read; convert .bin/.pth weights with transformers first."
        raise HFConfigError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}.{hint}")

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.file_of

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self._entry(tensor)["shape"])

    def dtype(self, tensor: str) -> str:
        return str(self._entry(tensor)["dtype"])

    def _entry(self, tensor: str) -> dict[str, Any]:
        if tensor not in self.file_of:
            raise HFConfigError(f"{self.path}: tensor {tensor} is missing from the weights.")
        return self.headers[self.file_of[tensor]][tensor]

    def read(self, tensor: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """``tensor[rows, cols]`` (all of a dimension where ``None``), reading only that part from disk."""
        from safetensors import safe_open

        shape = self.shape(tensor)
        with safe_open(str(self.path / self.file_of[tensor]), framework="pt") as handle:
            part = handle.get_slice(tensor)
            if len(shape) == 1:
                return part[rows or slice(None)]
            return part[rows or slice(None), cols or slice(None)]


def read_header(file: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file, checked against the file's length (no tensor data is read)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"its header claims {header_len} bytes but the file has {size}")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, struct.error) as err:
        raise HFConfigError(f"{file} is not a readable safetensors file ({err}); re-download or re-copy it.") from err
    if not isinstance(header, dict):
        raise HFConfigError(
            f"{file} is not a readable safetensors file (its header holds a JSON {type(header).__name__}, not an "
            "object of tensors); re-download or re-copy it."
        )
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not _is_tensor_entry(entry):
            raise HFConfigError(
                f"{file} is not a readable safetensors file (its header's entry for {name!r} is {entry!r}, not a "
                "tensor's dtype, shape and data_offsets); re-download or re-copy it."
            )
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if size < 8 + header_len + end:
        raise HFConfigError(
            f"{file} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}. "
            "Re-download or re-copy it."
        )
    for name, entry in header.items():
        expected = _DTYPE_BYTES.get(entry["dtype"], 0) * _numel(entry["shape"])
        start, stop = entry["data_offsets"]
        if expected and stop - start != expected:
            raise HFConfigError(f"{file}: tensor {name} has {stop - start} bytes for shape {entry['shape']}.")
    return header


def _is_tensor_entry(entry: Any) -> bool:
    """Whether a safetensors header entry has a dtype name, a shape of sizes and two data offsets."""

    def counts(value: Any, length: int | None = None) -> bool:
        whole = isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)
        return whole and (length is None or len(value) == length)

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and counts(entry.get("shape"))
        and counts(entry.get("data_offsets"), 2)
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class ShardedSafetensorsWriter:
    """Write tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes`` plus an index.

    Call :meth:`add` per tensor (in the order they should appear), then :meth:`finish`. One shard is written in
    the background at a time; a write error is raised by the next :meth:`add` that fills a shard, or by
    :meth:`finish`.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._in_flight: Future[None] | None = None
        self._file_mode = _default_file_mode()  # read here: os.umask is process-wide, not safe in the writer thread
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        file = self.directory / f".shard-{len(self._written):05d}.safetensors.partial"
        self._wait()  # at most one shard in the background: memory stays about two shards
        self._in_flight = self._executor.submit(_write_shard, self._pending, file, self._file_mode)
        self._written.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # re-raises the writer thread's error here

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index; return the shard paths."""
        if self._pending:
            self._flush()
        try:
            self._wait()
        finally:
            self._executor.shutdown(wait=True)
        count = len(self._written)
        weight_map: dict[str, str] = {}
        final = []
        for number, (file, names) in enumerate(self._written, start=1):
            target = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(file, target)
            final.append(target)
            weight_map.update({name: target.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final


def _write_shard(tensors: dict[str, torch.Tensor], file: Path, mode: int) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); give the shard the mode any new file gets
    # here, so a model directory shared with other users (or a serving container) stays readable.
    os.chmod(file, mode)


def _default_file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: safetensors' names of the torch dtypes a planned writer takes.
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
_SAFETENSORS_DTYPE.update({torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"})


class PlannedSafetensorsWriter:
    """Write tensors whose names, dtypes and shapes are known in advance straight into their shard files.

    The shards (the same split :class:`ShardedSafetensorsWriter` makes for the same tensors in the same order) and
    each file's header are fixed by ``layout``, so each tensor is written where it belongs as soon as it arrives and
    nothing is kept: the caller can reuse its buffers once :meth:`write` returns, and no shard is ever held in
    memory. A tensor can come as several contiguous pieces whose bytes, concatenated, are the tensor's (e.g. a
    strided slice of a fused weight, one block per attention group) instead of being copied into one tensor.
    Tensors must be written in ``layout``'s order; :meth:`finish` names the shards and writes the index.
    """

    def __init__(
        self,
        directory: Path,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        self.directory = directory
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = []
        shard_bytes = 0
        for name, dtype, shape in layout:
            nbytes = _numel(list(shape)) * dtype.itemsize
            if not self._shards or (self._shards[-1] and shard_bytes + nbytes > max_shard_bytes):
                self._shards.append([])
                shard_bytes = 0
            self._shards[-1].append((name, dtype, tuple(shape), nbytes))
            shard_bytes += nbytes
        self._order = [(number, entry) for number, shard in enumerate(self._shards) for entry in shard]
        self._next = 0
        self._file: Any = None  # the open shard (raw, unbuffered: writes go from the caller's memory to the kernel)
        self._shard = -1
        self.total_bytes = sum(entry[3] for _, entry in self._order)

    def _partial(self, number: int) -> Path:
        return self.directory / f".shard-{number:05d}.safetensors.partial"

    def write(self, name: str, pieces: list[torch.Tensor]) -> None:
        """Write tensor ``name`` (the next one in the layout) from ``pieces``, contiguous and in order."""
        if self._next >= len(self._order) or self._order[self._next][1][0] != name:
            expected = self._order[self._next][1][0] if self._next < len(self._order) else "nothing more"
            raise ValueError(f"Safetensors writer: got tensor {name}, expected {expected} (the layout's order).")
        number, (_, dtype, shape, nbytes) = self._order[self._next]
        if any(piece.dtype != dtype or not piece.is_contiguous() for piece in pieces):
            raise ValueError(f"Tensor {name}: every piece must be a contiguous {dtype} tensor.")
        if sum(piece.numel() for piece in pieces) * dtype.itemsize != nbytes:
            raise ValueError(f"Tensor {name}: the pieces hold {sum(p.numel() for p in pieces)} values, not {shape}.")
        if number != self._shard:
            self._open(number)
        for piece in pieces:
            _write_all(self._file, piece)
        self._next += 1

    def _open(self, number: int) -> None:
        self._close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in self._shards[number]:
            entry = {
                "dtype": _SAFETENSORS_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            header[name] = entry
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # as safetensors pads it: the tensor data starts 8-byte aligned
        self._file = self._partial(number).open("wb", buffering=0)
        self._shard = number
        _write_all(self._file, memoryview(struct.pack("<Q", len(text)) + text))

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the open shard (after an error; :meth:`finish` closes it otherwise)."""
        self._close()

    def finish(self) -> list[Path]:
        """Give every shard its final name and write the index; return the shard paths."""
        if self._next != len(self._order):
            raise ValueError(f"Safetensors writer: {len(self._order) - self._next} tensor(s) were not written.")
        self._close()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        final = []
        for number, shard in enumerate(self._shards):
            target = self.directory / f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._partial(number), target)
            final.append(target)
            weight_map.update({entry[0]: target.name for entry in shard})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final


def _write_all(file: Any, data: torch.Tensor | memoryview) -> None:
    """Write all of ``data`` (a contiguous tensor's bytes, read in place) to a raw file, which may write less."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            return
        data = memoryview(data.reshape(-1).view(torch.uint8).numpy())
    written, total = 0, len(data)
    while written < total:
        written += file.write(data[written:])
