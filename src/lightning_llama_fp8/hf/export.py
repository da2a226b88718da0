"""A training checkpoint (Megatron ``torch_dist`` directory, any layout) -> a Hugging Face Llama directory.

Streams: one layer's weights at a time are read from the distributed checkpoint (torch.distributed.checkpoint's
load, which megatron-core's ``torch_dist`` format is written with, asked for one layer of each layer-stacked
tensor; CPU only, no process group; each stored tensor's bytes are read straight into a reused buffer), turned
into Hugging Face tensors (views of those buffers where the layout allows) and written by a background thread into
safetensors shards whose layout is fixed in advance, so no shard is held in memory. The fp32 model is never
materialised; peak host memory is about two layers plus one [vocab, hidden] matrix.

Where the weights come from: with FP8 weights (``TEFP8Precision(fp8_param_gather=True)``) the model tensors in a
checkpoint are FP8 values, so the export takes the fp32 main weights from the optimizer state instead, which a
``fully_reshardable`` checkpoint stores per parameter. A ``dp_reshardable`` checkpoint stores them in the
distributed optimizer's internal buckets, which only the training optimizer can unpack: such an FP8-weight
checkpoint is refused (resave it with ``checkpoint_optimizer_sharding="fully_reshardable"``) unless
``allow_fp8_weights`` accepts the FP8 values. BF16-weight checkpoints export their model tensors, which equal the
fp32 main weights rounded to BF16.

The tokenizer goes out ready to chat: its own chat template (``tokenizer_config.json``'s ``chat_template`` or
``chat_template.jinja``) is copied; a tokenizer without one that has Llama 3's header and end-of-turn tokens (a bare
Llama 3 ``tokenizer.json``, a base model's directory) gets Llama 3's template, the one ``llama-fp8 preprocess --chat``
renders such a tokenizer's conversations with. ``generation_config.json`` stops at the end of the text and at Llama 3's
end-of-turn token ``<|eot_id|>`` where the tokenizer has it, so ``generate`` ends after the answer.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future as TorchFuture

from lightning_llama_fp8._compat.torch import create_file_view, narrow_tensor_by_index
from lightning_llama_fp8.checkpoint.info import INFO_FILENAME, CheckpointError, CheckpointInfo, read_checkpoint_info
from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.data.chat_template import LLAMA3_CHAT_TEMPLATE, LLAMA3_CHAT_TOKENS, LLAMA3_EOT
from lightning_llama_fp8.hf.arch import hf_config_from_llama
from lightning_llama_fp8.hf.config import HFConfigError
from lightning_llama_fp8.hf.files import DEFAULT_MAX_SHARD_BYTES, PlannedSafetensorsWriter
from lightning_llama_fp8.hf.mapping import (
    HF_LAYER_TENSORS,
    HF_MODEL_TENSORS,
    LAYER_TENSORS,
    MODEL_TENSORS,
    expected_hf_shapes,
    hf_layer_name,
    hf_tensor_pieces,
)
from lightning_llama_fp8.storage.output_lock import output_lock
from lightning_llama_fp8.storage.outputs import (
    check_output_directory,
    fresh_partial_directory,
    publish_directory,
    remove_path,
)
from lightning_llama_fp8.validate import format_bytes, format_names

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: Where the exported weights came from (printed and returned).
SOURCE_MODEL = "model weights (BF16)"
SOURCE_MAIN = "BF16 from the fp32 main weights (optimizer state)"
SOURCE_FP8 = "FP8 weights (dequantized to BF16; the fp32 main weights are not readable from this checkpoint)"

#: Tokenizer files copied from a tokenizer directory (``chat_template.jinja``: where transformers 5 saves the template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
#: The Llama 3 special tokens, used for bos/eos when only a tokenizer.json is given.
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
#: Where the exported tokenizer's chat template came from (ExportReport.chat_template).
TEMPLATE_OWN, TEMPLATE_LLAMA3 = "the tokenizer's own", "Llama 3's (added: the tokenizer has none)"
TEMPLATE_GIVEN = "the one given (--chat-template)"


@dataclass
class ExportReport:
    output: Path
    weights_source: str
    shards: list[str]
    total_bytes: int
    seconds: float
    tokenizer_files: list[str]
    #: TEMPLATE_OWN, TEMPLATE_LLAMA3, TEMPLATE_GIVEN or None (no tokenizer, or one without template or chat tokens).
    chat_template: str | None = None
    #: The ids generation_config.json stops generation at (its eos_token_id).
    stop_token_ids: tuple[int, ...] = ()


def checkpoint_arch(info: CheckpointInfo) -> LlamaConfig:
    """The :class:`LlamaConfig` a checkpoint was trained with (its ``lightning_llama_fp8.json``)."""
    if not info.arch:
        raise CheckpointError(f"Checkpoint {info.path} records no architecture; it was not written by this package.")
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    return LlamaConfig(**{k: v for k, v in info.arch.items() if k in known})


def expected_checkpoint_shapes(arch: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors in a distributed checkpoint of ``arch`` (vocab rows: at least the vocab)."""
    h, f, hd, layers = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels, arch.num_layers
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = {"attn_norm": (h,), "qkv": (q + 2 * kv, h), "proj": (h, q), "mlp_norm": (h,), "fc1": (2 * f, h)}
    per_layer["fc2"] = (h, f)
    shapes = {f"decoder.layers.{LAYER_TENSORS[kind][0]}": (layers, *shape) for kind, shape in per_layer.items()}
    shapes[MODEL_TENSORS["final_norm"]] = (h,)
    shapes[MODEL_TENSORS["embedding"]] = (arch.vocab_size, h)
    if not arch.tie_embeddings:
        shapes[MODEL_TENSORS["output"]] = (arch.vocab_size, h)
    return shapes


class _CheckpointTensors:
    """Reads slices of a distributed checkpoint's tensors; knows which tensor holds each weight's best copy."""

    def __init__(self, info: CheckpointInfo, arch: LlamaConfig, allow_fp8_weights: bool) -> None:
        self.path, self.arch = info.path, arch
        direct = narrow_tensor_by_index is not None and create_file_view is not None
        self.reader = (_DirectFileSystemReader if direct else FileSystemReader)(str(info.path))
        self.metadata = self.reader.read_metadata().state_dict_metadata
        self._check_shapes(info)
        main_keys = {key for key in self.metadata if key.startswith("optimizer") and ".param." in key}
        self.main_key = {}
        for key in expected_checkpoint_shapes(arch):
            found = [m for m in main_keys if m.endswith(f".param.{key}")]
            if found:
                self.main_key[key] = found[0]
        fp8_buckets = any("torch.uint8" in key for key in self.metadata if key.startswith("optimizer.distributed"))
        # A precision-aware optimizer with remainders keeps 16-bit remainders, not main weights, in that place
        # (MegatronCPStrategy refuses to save them fully_reshardable; a checkpoint from elsewhere may): its bf16
        # model tensors are the weights.
        remainders = bool(info.optimizer_state.get("store_param_remainders"))
        if remainders:
            self.main_key = {}
        if self.main_key and len(self.main_key) == len(expected_checkpoint_shapes(arch)):
            self.source = SOURCE_MAIN
        elif fp8_buckets:
            if not allow_fp8_weights:
                raise CheckpointError(
                    f"Checkpoint {info.path} has FP8 weights and its fp32 main weights are in the distributed "
                    "optimizer's 'dp_reshardable' buckets, which only the training optimizer can unpack; exporting "
                    "the FP8 values would lose precision. Resume it for 0 steps with MegatronCPStrategy("
                    "checkpoint_optimizer_sharding='fully_reshardable') and save (trainer.save_checkpoint), then "
                    "export that; or pass --allow-fp8-weights to export the FP8 values."
                )
            self.source, self.main_key = SOURCE_FP8, {}
        else:
            self.source, self.main_key = SOURCE_MODEL, {}

    def _check_shapes(self, info: CheckpointInfo) -> None:
        for key, shape in expected_checkpoint_shapes(self.arch).items():
            if key not in self.metadata:
                raise CheckpointError(
                    f"Checkpoint {self.path} has no tensor {key}, which the architecture in its "
                    "lightning_llama_fp8.json needs; the checkpoint and its record disagree."
                )
            stored = tuple(self.metadata[key].size)
            vocab_rows = key in (MODEL_TENSORS["embedding"], MODEL_TENSORS["output"])
            fits = stored[1:] == shape[1:] and stored[0] >= shape[0] if vocab_rows else stored == shape
            if not fits:
                raise CheckpointError(
                    f"Checkpoint {self.path}: tensor {key} has shape {list(stored)}, but the architecture in its "
                    f"lightning_llama_fp8.json implies {list(shape)}; the checkpoint and its record disagree."
                )

    def read(
        self, keys: list[str], layer: int | None, into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors (one layer of each, if ``layer``), from the main weights where those are used.

        ``into`` keeps the read buffers (by stored name) for the next call to read into again: on a machine whose
        first touch of fresh memory is slow, reusing a layer's buffers for a later layer saves that cost per layer.
        """
        import torch.distributed.checkpoint as dcp

        buffers, offsets = {}, {}
        into = {} if into is None else into
        for key in keys:
            stored = self.main_key.get(key, key)
            size = tuple(self.metadata[stored].size)
            shape = (1, *size[1:]) if layer is not None else size
            dtype = self.metadata[stored].properties.dtype
            kept = into.get(stored)
            if kept is None or tuple(kept.shape) != shape or kept.dtype != dtype:
                into[stored] = kept = torch.empty(shape, dtype=dtype)
            buffers[stored] = kept
            offsets[stored] = (layer, *[0] * (len(size) - 1)) if layer is not None else (0,) * len(size)
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(buffers, storage_reader=self.reader, planner=_BoxLoadPlanner(offsets))
        return {key: buffers[self.main_key.get(key, key)][0 if layer is not None else ...] for key in keys}


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Reads one box of each requested tensor (e.g. one layer of a layer-stacked tensor) into a buffer of that box's
    shape, instead of the whole tensor: only the stored chunks that overlap the box are read from disk."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        requests = []
        for key, buffer in self.state_dict.items():
            box = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=buffer.size())
            requests += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [box])
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the box's buffer; the read items' destination offsets are box-relative


class _DirectFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader, reading each stored tensor's bytes straight into the buffer the
    planner asks for.

    The library's reader ``torch.load``s every stored item into a new tensor and copies it into the buffer: two
    passes over fresh memory per byte, which is most of an export's time (and on a VM whose first touch of memory
    is slow, more so). Here ``torch.load(map_location="meta")`` reads only the item's small pickle and gives the
    stored tensor's layout and its data's offset in the item; where the requested part of it and the destination
    are both contiguous (every item of this package's checkpoints), the bytes are read into the destination with one
    ``readinto``. Anything else (transformed or byte items, strided parts) goes through the library's own path.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        rest = []
        by_file: dict[str, list[tuple[int, ReadItem]]] = {}
        for item in plan.items:
            stored = self.storage_data[item.storage_index]
            if item.type != LoadItemType.TENSOR or stored.transform_descriptors:
                rest.append(item)
            else:
                by_file.setdefault(stored.relative_path, []).append((stored.offset, item))
        for relative_path, items in by_file.items():
            with open(os.path.join(str(self.path), relative_path), "rb", buffering=0) as file:
                for _, item in sorted(items, key=lambda pair: pair[0]):  # one forward pass over the file
                    if not self._read_direct(file, item, planner):
                        rest.append(item)
        if rest:
            return super().read_data(LoadPlan(rest, plan.storage_data), planner)
        done: TorchFuture[None] = TorchFuture()
        done.set_result(None)
        return done

    def _read_direct(self, file: io.RawIOBase, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read ``item`` into its destination with one ``readinto``; False (nothing read) where that is not possible."""
        stored = self.storage_data[item.storage_index]
        layout = torch.load(
            create_file_view(file, stored.offset, stored.length), map_location="meta", weights_only=True
        )
        # Where torch.load(mmap=True) would map the storage from. The bytes are taken as stored: torch.load would
        # byte-swap a storage saved on a big-endian host, but this package's checkpoints come from little-endian
        # GPU hosts (x86-64, aarch64).
        data_offset = getattr(layout.untyped_storage(), "_checkpoint_offset", None)
        part = narrow_tensor_by_index(layout, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if data_offset is None or not part.is_contiguous() or not target.is_contiguous():
            return False
        if target.dtype != part.dtype or target.size() != part.size():
            raise AssertionError(f"read item {item.storage_index}: {part.dtype} {part.size()} into {target.dtype} "
                                 f"{target.size()}")  # fmt: skip
        nbytes = part.numel() * part.element_size()
        file.seek(stored.offset + data_offset + part.storage_offset() * part.element_size())
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        done = 0
        while done < nbytes:  # a raw read may return fewer bytes than asked
            count = file.readinto(view[done:])
            if not count:
                raise CheckpointError(
                    f"{self.path}/{stored.relative_path} ends inside tensor {item.storage_index.fqn}."
                )
            done += count
        planner.commit_tensor(item, target)
        return True


def export_to_hf(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_fp8_weights: bool = False,
    overwrite: bool = False,
    chat_template: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """Write the training checkpoint ``checkpoint`` as a Hugging Face Llama directory ``output`` (BF16 safetensors).

    Everything is checked before anything is written (the checkpoint's completeness and shapes, the tokenizer,
    the output directory); the output appears under its name only when complete.

    ``chat_template`` (with ``tokenizer`` only) replaces the tokenizer's template, as ``llama-fp8 preprocess --chat
    --chat-template`` does: ``"llama3"`` (Llama 3's), a Jinja file, or a ``tokenizer_config.json`` holding one.
    """
    started = time.perf_counter()
    info = read_checkpoint_info(checkpoint)
    arch = checkpoint_arch(info)
    if chat_template is not None and tokenizer is None:
        raise HFConfigError(
            "A chat template goes with a tokenizer: pass --tokenizer too (or leave out --chat-template)."
        )
    tokenizer_source = _tokenizer_path(tokenizer) if tokenizer is not None else None
    tokenizer_files = _tokenizer_files(tokenizer_source) if tokenizer_source is not None else []
    given = _given_chat_template(tokenizer, chat_template) if tokenizer is not None and chat_template else None
    special = _special_tokens(tokenizer_files, given)
    _check_special_tokens_fit(special, arch.vocab_size, tokenizer_source)
    reads = [("the checkpoint", info.path)] + ([("the tokenizer", tokenizer_source)] if tokenizer_source else [])
    output = check_output_directory(output, reads, overwrite, not_replaceable=_not_an_earlier_export)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(output, "llama-fp8 convert"):
        # Again: another writer may have finished meanwhile.
        check_output_directory(output, reads, overwrite, not_replaceable=_not_an_earlier_export)
        tensors = _CheckpointTensors(info, arch, allow_fp8_weights)
        partial = fresh_partial_directory(output)
        try:
            writer = PlannedSafetensorsWriter(partial, _hf_layout(arch), max_shard_bytes)
            _check_free_space(partial, writer.total_bytes)
            try:
                _stream_weights(tensors, arch, writer)
            finally:
                writer.close()
            shards = writer.finish()
            _copy_tokenizer(tokenizer_files, partial, special)
            config = hf_config_from_llama(arch, bos_token_id=special.bos, eos_token_id=special.eos)
            (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _write_generation_config(tokenizer_files, partial, special)
            publish_directory(partial, output)
        except BaseException:
            remove_path(partial)  # the previous output, if any, is untouched until publish_directory
            raise
    return ExportReport(
        output=output,
        weights_source=tensors.source,
        shards=[shard.name for shard in shards],
        total_bytes=writer.total_bytes,
        seconds=time.perf_counter() - started,
        tokenizer_files=[file.name for file in tokenizer_files],
        chat_template=special.chat_template,
        stop_token_ids=special.stop_ids,
    )


def _not_an_earlier_export(output: Path) -> str | None:
    """Why ``--overwrite`` may not replace the non-empty directory ``output`` (``None``: it may): only an earlier
    Hugging Face export (``config.json`` beside ``*.safetensors``) holding no training checkpoint is replaced, so
    that ``convert CKPT OUT --overwrite`` cannot delete a run's checkpoints or anything else kept there."""
    checkpoints = []
    for directory, subdirectories, files in os.walk(output):  # links to directories are not followed
        inside = Path(directory) != output
        if INFO_FILENAME in files or (inside and directory.endswith(".ckpt")):
            checkpoints.append(str(Path(directory).relative_to(output)))
            subdirectories.clear()
    if checkpoints == ["."]:
        return f"is a training checkpoint (it has {INFO_FILENAME})"
    if checkpoints:
        return f"holds training checkpoints ({format_names(sorted(checkpoints))})"
    if not (output / "config.json").is_file() or not any(output.glob("*.safetensors")):
        return (
            "is not an earlier Hugging Face export (no config.json beside *.safetensors files), the only kind of "
            "directory --overwrite replaces"
        )
    return None


def _hf_layout(arch: LlamaConfig) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The exported tensors in the order :func:`_stream_weights` writes them (Hugging Face's), all BF16."""
    shapes = expected_hf_shapes(arch)
    names = [HF_MODEL_TENSORS["embedding"]]
    for layer in range(arch.num_layers):
        names += [hf_layer_name(layer, suffix) for kind in LAYER_TENSORS for suffix in HF_LAYER_TENSORS[kind]]
    names += [HF_MODEL_TENSORS["final_norm"]] + ([] if arch.tie_embeddings else [HF_MODEL_TENSORS["output"]])
    return [(name, torch.bfloat16, shapes[name]) for name in names]


def _stream_weights(tensors: _CheckpointTensors, arch: LlamaConfig, writer: PlannedSafetensorsWriter) -> None:
    """Embedding, then the layers one at a time, then the final norm and output layer, in Hugging Face's order.

    A writer thread writes one group of tensors while the next is read (file reads and writes release the GIL).
    Two sets of layer buffers alternate: layer ``i + 2`` is read into layer ``i``'s once layer ``i`` is written, and
    the output layer into the embedding's, so the export touches fresh memory for about two layers and one
    [vocab, hidden] matrix, whatever the number of layers; its peak memory is about that too.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-export-writer") as pool:
        pending: deque[Future[None]] = deque()

        def write(pieces: dict[str, list[torch.Tensor]], keep: int) -> None:
            pending.append(pool.submit(_write_pieces, writer, pieces))
            while len(pending) > keep:  # the buffers of all but the newest ``keep`` writes are free after this
                pending.popleft().result()  # re-raises the writer thread's error here

        embedding, vocab_rows = MODEL_TENSORS["embedding"], {}  # vocab_rows: the [vocab, hidden] buffer, reused
        loaded = tensors.read([embedding], None, vocab_rows)
        write(hf_tensor_pieces("embedding", None, loaded.pop(embedding), arch), keep=1)
        embedding_written = pending[-1]
        layer_keys = {kind: f"decoder.layers.{names[0]}" for kind, names in LAYER_TENSORS.items()}
        slots: list[dict[str, torch.Tensor]] = [{}, {}]
        for layer in range(arch.num_layers):
            loaded = tensors.read(list(layer_keys.values()), layer, slots[layer % 2])
            pieces = {}
            for kind, key in layer_keys.items():
                pieces.update(hf_tensor_pieces(kind, layer, loaded.pop(key), arch))
            write(pieces, keep=1)  # the previous layer's write is done: its slot can take the next layer
        slots.clear()
        tail = [MODEL_TENSORS["final_norm"]] + ([] if arch.tie_embeddings else [MODEL_TENSORS["output"]])
        # The output layer goes into the embedding's buffer, written long ago (writes run in order), while the last
        # layer is still being written.
        embedding_written.result()
        into = {tensors.main_key.get(MODEL_TENSORS["output"], MODEL_TENSORS["output"]): buffer
                for buffer in vocab_rows.values()}  # fmt: skip
        loaded = tensors.read(tail, None, into)
        pieces = {}
        for kind in ("final_norm", "output")[: len(tail)]:
            pieces.update(hf_tensor_pieces(kind, None, loaded[MODEL_TENSORS[kind]], arch))
        write(pieces, keep=0)


def _write_pieces(writer: PlannedSafetensorsWriter, pieces: dict[str, list[torch.Tensor]]) -> None:
    for name, parts in pieces.items():
        writer.write(name, parts)


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_path(tokenizer: str | os.PathLike[str]) -> Path:
    """``"llama3"`` names the bundled Llama 3 ``tokenizer.json`` (as for ``llama-fp8 preprocess``); else a path."""
    from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER, resolve_tokenizer

    if str(tokenizer) == DEFAULT_TOKENIZER and not Path(tokenizer).exists():
        return resolve_tokenizer(DEFAULT_TOKENIZER).path
    return Path(tokenizer)


def _tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files to copy from a directory, or the one ``tokenizer.json`` given (checked to load)."""
    from tokenizers import Tokenizer

    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not any(file.name in ("tokenizer.json", "tokenizer.model") for file in files):
            raise HFConfigError(f"Tokenizer directory {path} has no tokenizer.json (or tokenizer.model).")
        if (path / "generation_config.json").is_file():
            files.append(path / "generation_config.json")
    elif path.is_file():
        files = [path]
    else:
        raise HFConfigError(f"Tokenizer {path} does not exist (give a tokenizer.json or a directory with one).")
    json_file = next((file for file in files if file.name == "tokenizer.json" or file == path), None)
    if json_file is not None:
        try:
            Tokenizer.from_file(str(json_file))
        except Exception as err:  # the Rust library raises its own exception type
            raise HFConfigError(f"{json_file} is not a tokenizer the tokenizers library can load ({err}).") from err
    return files


@dataclass(frozen=True)
class _SpecialTokens:
    """The tokenizer's BOS/EOS and end-of-turn token (ids, texts), its chat template, and what generation stops at."""

    bos: int | None = None
    eos: int | None = None
    bos_text: str = LLAMA3_BOS
    eos_text: str = LLAMA3_EOS
    has_config: bool = False
    #: The ids of the tokenizer directory's generation_config.json (its eos_token_id), as found.
    generation_eos: tuple[int, ...] = ()
    #: Llama 3's end-of-turn token ``<|eot_id|>`` (None: the tokenizer has none).
    eot: int | None = None
    #: TEMPLATE_OWN, TEMPLATE_LLAMA3, TEMPLATE_GIVEN or None.
    chat_template: str | None = None
    #: The template to write into tokenizer_config.json (TEMPLATE_LLAMA3, TEMPLATE_GIVEN; empty: none to write).
    template_to_write: str = ""
    #: The special tokens the chat template writes, with their ids (all must exist in the model's vocabulary).
    template_tokens: tuple[tuple[str, int], ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What the exported generation_config.json stops at: the directory's own ids (else EOS), plus ``<|eot_id|>``.

        The end-of-turn id is added to a directory's own list too: a base model's generation_config.json (Llama 3 8B:
        ``<|end_of_text|>`` only) would let a model fine-tuned on chat run on past its answer, and a model that was
        not fine-tuned never emits ``<|eot_id|>``, so stopping there costs it nothing.
        """
        ids = list(self.generation_eos) or ([self.eos] if self.eos is not None else [])
        if self.eot is not None and self.eot not in ids:
            ids.append(self.eot)
        return tuple(ids)


def _special_tokens(files: list[Path], given_template: str | None = None) -> _SpecialTokens:
    """Read BOS/EOS, the end-of-turn token and the chat template from the tokenizer files about to be copied (no files:
    none); ``given_template`` replaces the tokenizer's own."""
    from tokenizers import Tokenizer

    if not files:
        return _SpecialTokens()
    json_file = next(
        (f for f in files if f.name == "tokenizer.json" or (len(files) == 1 and f.suffix == ".json")), None
    )
    tokenizer = Tokenizer.from_file(str(json_file)) if json_file is not None else None
    config_file = next((f for f in files if f.name == "tokenizer_config.json"), None)
    config = _read_json(config_file) if config_file is not None else {}
    bos_text = _token_text(config.get("bos_token")) or LLAMA3_BOS
    eos_text = _token_text(config.get("eos_token")) or LLAMA3_EOS
    generation_file = next((f for f in files if f.name == "generation_config.json"), None)
    generation = _read_json(generation_file) if generation_file is not None else {}
    stop = generation.get("eos_token_id")
    stop_ids = tuple(i for i in (stop if isinstance(stop, list) else [stop]) if isinstance(i, int))
    template_file = next((f for f in files if f.name == "chat_template.jinja"), None)
    own_template = _template_text(config.get("chat_template"))
    if template_file is not None:
        own_template += template_file.read_text(encoding="utf-8")
    template, template_text = None, ""
    if given_template is not None:
        template, template_text = TEMPLATE_GIVEN, given_template
    elif own_template:
        template, template_text = TEMPLATE_OWN, own_template
    elif tokenizer is not None and all(tokenizer.token_to_id(token) is not None for token in LLAMA3_CHAT_TOKENS):
        template, template_text = TEMPLATE_LLAMA3, LLAMA3_CHAT_TEMPLATE
    return _SpecialTokens(
        bos=tokenizer.token_to_id(bos_text) if tokenizer is not None else None,
        eos=tokenizer.token_to_id(eos_text) if tokenizer is not None else None,
        bos_text=bos_text,
        eos_text=eos_text,
        has_config=config_file is not None,
        generation_eos=stop_ids,
        eot=tokenizer.token_to_id(LLAMA3_EOT) if tokenizer is not None else None,
        chat_template=template,
        template_to_write=template_text if template in (TEMPLATE_GIVEN, TEMPLATE_LLAMA3) else "",
        template_tokens=_tokens_in_template(tokenizer, template_text) if tokenizer is not None else (),
    )


def _given_chat_template(tokenizer: str | os.PathLike[str], chat_template: str | os.PathLike[str]) -> str:
    """The text of the template given for ``tokenizer`` (read as ``llama-fp8 preprocess --chat-template`` reads it)."""
    from lightning_llama_fp8.data.chat import BUILTIN_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
    from lightning_llama_fp8.data.tokenizer import resolve_tokenizer

    try:
        spec = resolve_tokenizer(tokenizer)
        text = ChatTemplate.for_tokenizer(spec, chat_template).text
    except (ChatTemplateError, FileNotFoundError, ValueError) as err:
        raise HFConfigError(f"--chat-template {str(chat_template)!r}: {err}") from err
    if str(chat_template) == BUILTIN_CHAT_TEMPLATE:
        loaded = spec.load()
        missing = [token for token in LLAMA3_CHAT_TOKENS if loaded.token_to_id(token) is None]
        if missing:
            raise HFConfigError(
                f"--chat-template llama3: the tokenizer {spec.path} lacks Llama 3's chat tokens {', '.join(missing)}; "
                "give the template the corpus was rendered with (--chat-template FILE)."
            )
    return text


def _template_text(template: Any) -> str:
    """A ``chat_template`` entry's text: one template, or transformers' list of named ones (all of them)."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        return "".join(t.get("template", "") for t in template if isinstance(t, dict))
    return ""


def _tokens_in_template(tokenizer: Tokenizer, template: str) -> tuple[tuple[str, int], ...]:
    """The tokenizer's special tokens whose text the template writes (in the template's Jinja source), with ids."""
    added = tokenizer.get_added_tokens_decoder().values()
    found = {token.content for token in added if token.special and token.content and token.content in template}
    return tuple((text, tokenizer.token_to_id(text)) for text in sorted(found))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise HFConfigError(f"{file} is not readable JSON ({err}); restore it or give another tokenizer.") from err
    if not isinstance(record, dict):
        raise HFConfigError(f"{file} holds {type(record).__name__}, not a JSON object; restore it.")
    return record


def _check_special_tokens_fit(special: _SpecialTokens, vocab_size: int, tokenizer: Path | None) -> None:
    """Refuse a tokenizer whose BOS/EOS, end-of-turn token, generation stop ids or chat-template tokens lie past the
    model's embedding: transformers would fail with an IndexError at the first generated or prompted such token."""
    named = [("BOS", special.bos_text, special.bos), ("EOS", special.eos_text, special.eos)]
    named += [("end-of-turn", LLAMA3_EOT, special.eot)]
    named += [("chat template token", text, i) for text, i in special.template_tokens]
    named += [("generation_config.json eos_token_id", None, i) for i in special.generation_eos]
    beyond, seen = [], set()
    for what, text, i in named:
        if i is not None and i >= vocab_size and i not in seen:
            seen.add(i)
            beyond.append(f"{what} {text + ' ' if text else ''}= {i}")
    if beyond:
        raise HFConfigError(
            f"The tokenizer {tokenizer} does not fit this model: {', '.join(beyond)}, but the checkpoint's vocabulary "
            f"has {vocab_size} entries (ids 0..{vocab_size - 1}). Give the tokenizer the model was trained with "
            "(the one its corpus was preprocessed with), or leave out --tokenizer."
        )


def _copy_tokenizer(files: list[Path], output: Path, special: _SpecialTokens) -> None:
    """Copy the tokenizer into ``output``: a bare tokenizer.json gets the tokenizer_config.json transformers needs,
    and a tokenizer without a chat template of its own gets Llama 3's (see :func:`_special_tokens`)."""
    for file in files:
        if file.name == "generation_config.json":
            continue  # merged by _write_generation_config
        if file.name == "chat_template.jinja" and special.chat_template == TEMPLATE_GIVEN:
            continue  # transformers would take it before the given one in tokenizer_config.json
        target = "tokenizer.json" if file.suffix == ".json" and len(files) == 1 else file.name
        shutil.copyfile(file, output / target)
    if not files or not (output / "tokenizer.json").exists():
        return
    config_path = output / "tokenizer_config.json"
    if special.has_config:
        config = _read_json(config_path)
    else:
        # A bare tokenizer.json: tell transformers which class reads it (Llama 3's is a plain fast tokenizer), and
        # that decoding keeps the text as it was: the clean-up would drop the space before punctuation (" ,").
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update({"bos_token": special.bos_text if special.bos is not None else None})
        config.update({"eos_token": special.eos_text if special.eos is not None else None})
    if special.template_to_write:
        config["chat_template"] = special.template_to_write
    if not special.has_config or special.template_to_write:
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_generation_config(files: list[Path], output: Path, special: _SpecialTokens) -> None:
    """``generation_config.json``: the tokenizer directory's own (copied as is where it already stops at
    :attr:`_SpecialTokens.stop_ids`, else with those ids and its other settings kept) or BOS and EOS, stopping at
    ``stop_ids`` (one id is written as a number, several as a list, as transformers writes them)."""
    source = next((f for f in files if f.name == "generation_config.json"), None)
    stops = special.stop_ids
    if source is not None and stops == special.generation_eos:
        shutil.copyfile(source, output / "generation_config.json")
        return
    config = _read_json(source) if source is not None else {"bos_token_id": special.bos}
    config["eos_token_id"] = list(stops) if len(stops) > 1 else (stops[0] if stops else None)
    (output / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse before writing when the output's file system cannot hold the shards (with a small margin)."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.01 + 2**20:
        raise OSError(
            errno.ENOSPC,
            f"The export needs {format_bytes(needed_bytes)} but {directory.parent} has {format_bytes(free)} free; "
            "free space or choose an output on another file system",
        )


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # {"content": "<|begin_of_text|>", ...}
        return token.get("content")
    return token if isinstance(token, str) else None
