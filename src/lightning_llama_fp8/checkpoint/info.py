"""The checkpoint format: what a checkpoint directory holds, its info file, and the cheap checks that it is complete.

A checkpoint is a directory, written by every rank at once:

- the Megatron model and the distributed optimizer as Megatron's sharded state dicts (keys ``model`` and
  ``optimizer``, as Megatron-LM names them), in Megatron-Core's ``torch_dist`` format (``*.distcp`` shards,
  ``.metadata``, ``metadata.json``); the model part reshards to any TP/CP/DP layout on load, the optimizer part
  to any DP size (``dp_reshardable``, Megatron-LM's default) or to any layout (``fully_reshardable``);
- ``lightning.pt``: the rest of Lightning's checkpoint (loops, callbacks, LR scheduler, hyper-parameters, data
  position, and any parameters of the LightningModule outside the Megatron model), written by rank 0;
- ``lightning_llama_fp8.json``: what wrote it (architecture, layout, step), readable without torch, written last.

:func:`read_checkpoint_info` checks a directory cheaply (no tensor is read) before anything expensive happens: that it
exists, is complete, that every shard file its index names is there and long enough, that every file is the one the
save wrote (sizes and sampled digests recorded in ``lightning_llama_fp8.json``), and that the weight shapes in the
shard index are those of the architecture the JSON names. Whether it fits this run is ``resume.py``; how it is
written is ``directories.py`` and ``state_io.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lightning_llama_fp8.storage.paths import PathOutsideFolderError, path_inside
from lightning_llama_fp8.validate import format_names

__all__ = [
    "INFO_FILENAME",
    "LIGHTNING_FILENAME",
    "CheckpointError",
    "CheckpointInfo",
    "OptimizerSharding",
    "check_optimizer_sharding",
    "read_checkpoint_info",
]

FORMAT = "lightning_llama_fp8/megatron-torch_dist/1"
INFO_FILENAME = "lightning_llama_fp8.json"
LIGHTNING_FILENAME = "lightning.pt"
MEGATRON_METADATA_FILENAME = "metadata.json"  # written last by dist_checkpointing.save

#: The info file's layer counts of the first and last pipeline stage (None: not set in that run).
PIPELINE_STAGE_LAYER_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")

OptimizerSharding = Literal["dp_reshardable", "fully_reshardable"]


def check_optimizer_sharding(value: Any) -> OptimizerSharding:
    """``checkpoint_optimizer_sharding`` as given, or ``ValueError`` naming the two it accepts."""
    if value not in ("dp_reshardable", "fully_reshardable"):
        raise ValueError(
            f"checkpoint_optimizer_sharding must be 'dp_reshardable' (each rank writes its own shard; resume with the "
            f"same TP and CP) or 'fully_reshardable' (gathered on save; resume with any layout), got {value!r}."
        )
    return value


#: Architecture fields that decide the shape of some weight; a checkpoint only loads into a model that agrees.
SHAPE_FIELDS: tuple[str, ...] = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "tie_embeddings",
)

#: Files up to this size are digested whole; larger ones (shards) by :data:`DIGEST_BLOCKS` blocks spread over them.
DIGEST_WHOLE_FILE_BYTES = 8 * 2**20
DIGEST_BLOCKS, DIGEST_BLOCK_BYTES = 16, 256 * 2**10


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``lightning_llama_fp8.json`` says about a checkpoint directory."""

    path: Path
    global_step: int
    tensor_model_parallel_size: int
    context_parallel_size: int
    world_size: int
    arch: dict[str, Any] = field(default_factory=dict)
    #: The pipeline split: (PP, virtual PP, layers of the first stage, of the last stage); None: not split there.
    #: Checkpoints written before pipeline parallelism existed have none: (1, None, None, None).
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    #: How the optimizer state is sharded; ``None``: the checkpoint has no optimizer state.
    optimizer_sharding: str | None = None
    #: What the data module needs to continue the same samples (``GPTDataModule.checkpoint_info()``: the global
    #: batch size and the training sample index the run was built with), and whether it masked documents
    #: (``document_masking``; absent in older checkpoints: off); empty for other data modules.
    data: dict[str, Any] = field(default_factory=dict)
    #: The module's optimizer settings (``LlamaLightningModule.optim``), to refuse changed learning rates early.
    optimizer_settings: dict[str, Any] = field(default_factory=dict)
    #: The dtypes of the saved optimizer state (``OptimizerPrecisionSettings.checkpoint_record()``, or
    #: ``DEFAULT_OPTIMIZER_PRECISION_RECORD`` for Megatron's default optimizer); empty in older checkpoints (default).
    optimizer_state: dict[str, Any] = field(default_factory=dict)
    #: Every other file of the checkpoint: ``{name: {"size": bytes, "digest": hex}}`` (see :func:`file_digest`).
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pipeline_split(self) -> tuple[int, int | None, int | None, int | None]:
        """(PP, virtual PP, first-stage layers, last-stage layers) the checkpoint was saved with."""
        from lightning_llama_fp8.parallel.layout import PIPELINE_FIELDS

        return tuple(getattr(self, name) for name in PIPELINE_FIELDS)  # type: ignore[return-value]

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = None  # a checkpoint may be moved; the path is where it is read from
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True)


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Check that ``path`` is a complete checkpoint of this package and return what it holds; reads no tensor.

    Raises:
        CheckpointError: with the reason and a fix, if the path is missing, a file, incomplete (an interrupted
            save), written by something else, or if a shard file is missing or shorter than its index says.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"Checkpoint {path} is a link to {os.readlink(path)}, which does not exist (deleted or moved?)."
        )
    if not path.exists():
        replaced = path.with_name(path.name + ".replaced")
        saving = path.with_name(path.name + ".saving")
        hint = ""
        if replaced.is_dir():
            hint = (
                f" A save that was replacing it stopped half-way: the previous version is intact at {replaced}; "
                f"rename it back to {path.name}."
            )
        elif saving.exists():
            hint = f" An unfinished save of it is at {saving} (interrupted; not usable)."
        raise CheckpointError(f"Checkpoint {path} does not exist.{hint} Check the path (ckpt_path).")
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a file, but MegatronCPStrategy checkpoints are directories (Megatron distributed "
            "checkpoints, one shard per rank). A single-file Lightning checkpoint cannot restore Megatron's "
            "distributed optimizer; resume from a checkpoint that MegatronCPStrategy saved."
        )
    info_file = path / INFO_FILENAME
    if not info_file.is_file():
        inside = sorted(entry.name for entry in path.glob("*.ckpt") if entry.is_dir() or entry.is_symlink())
        if inside:
            raise CheckpointError(
                f"{path} is a folder of checkpoints, not a checkpoint: give one of: {format_names(inside, limit=8)}."
            )
        if (path / MEGATRON_METADATA_FILENAME).is_file():
            why = "it has Megatron's metadata.json but no lightning_llama_fp8.json: not written by this package"
        else:
            why = "its save did not finish (no metadata) or it is not a checkpoint at all"
        raise CheckpointError(
            f"Checkpoint {path} is not a complete lightning_llama_fp8 checkpoint: {why}. Resume from another one."
        )
    try:
        data = json.loads(info_file.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"Checkpoint {path}: {INFO_FILENAME} is unreadable ({err}); it is damaged.") from err
    info = _info_from_record(path, data)
    for required in (MEGATRON_METADATA_FILENAME, LIGHTNING_FILENAME):
        if not (path / required).is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {required} is missing. Resume from another one.")
    _check_recorded_files(path, info.files)
    metadata = _check_shard_files(path)
    _check_shapes_match_arch(path, metadata, info)
    return info


def _info_from_record(path: Path, data: Any) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of the parsed info file ``data``, every field checked for its kind, so that a
    damaged file is a :class:`CheckpointError` here rather than a traceback later (fields of a newer version: said so).
    """
    from lightning_llama_fp8.config import LlamaConfig

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"Checkpoint {path}: {INFO_FILENAME} is damaged: {why}. Resume from another checkpoint.")

    if not isinstance(data, dict):
        raise damaged(f"it holds {type(data).__name__}, not a JSON object")
    if (
        isinstance(data.get("format"), str)
        and data["format"].startswith("lightning_llama_fp8/")
        and (data["format"] != FORMAT)
    ):
        raise CheckpointError(
            f"Checkpoint {path}: its {INFO_FILENAME} has format {data['format']!r}; this version of "
            f"lightning-llama-fp8 reads {FORMAT!r}. Load it with the lightning-llama-fp8 that wrote it."
        )
    if data.get("format") != FORMAT:
        raise damaged(f"its format is {data.get('format')!r}, not {FORMAT!r}")
    known = _field_names(CheckpointInfo) - {"path"}
    newer = sorted(set(data) - known - {"format", "path"})
    arch = data.get("arch")
    newer += sorted(f"arch.{name}" for name in set(arch if isinstance(arch, dict) else ()) - _field_names(LlamaConfig))
    if newer:
        raise CheckpointError(
            f"Checkpoint {path}: its {INFO_FILENAME} has fields this version of lightning-llama-fp8 does not know "
            f"({', '.join(newer)}): it was written by a newer lightning-llama-fp8. Upgrade lightning-llama-fp8 to "
            "load it."
        )
    try:
        info = CheckpointInfo(path=path, **{name: value for name, value in data.items() if name in known})
    except TypeError as err:  # a required field is missing
        raise damaged(str(err).replace("CheckpointInfo.__init__() ", "")) from err
    counts = {"global_step": 0, "tensor_model_parallel_size": 1, "context_parallel_size": 1, "world_size": 1}
    counts["pipeline_model_parallel_size"] = 1
    optional = ("virtual_pipeline_model_parallel_size", *PIPELINE_STAGE_LAYER_FIELDS)
    for name in (*counts, *optional):
        value, least = getattr(info, name), counts.get(name, 1)
        if not (value is None and name in optional) and (type(value) is not int or value < least):  # bool: no
            raise damaged(f"{name} is {value!r}, not a whole number >= {least}")
    for name in ("arch", "data", "optimizer_settings", "optimizer_state", "files"):
        if not isinstance(getattr(info, name), dict):
            raise damaged(f"{name} is {getattr(info, name)!r}, not a JSON object")
    if not (info.optimizer_sharding is None or isinstance(info.optimizer_sharding, str)):
        raise damaged(f"optimizer_sharding is {info.optimizer_sharding!r}, not a name")
    for name, recorded in info.files.items():
        if not (
            isinstance(recorded, dict)
            and type(recorded.get("size")) is int
            and recorded["size"] >= 0
            and isinstance(recorded.get("digest"), str)
        ):
            raise damaged(f"files[{name!r}] is {recorded!r}, not {{'size': bytes, 'digest': text}}")
    return info


def _field_names(cls: Any) -> set[str]:
    return {f.name for f in fields(cls)}


def file_digest(path: Path) -> str:
    """A cheap fingerprint of a file: BLAKE2b of its size and contents, whole up to 8 MiB, else of 16 blocks of
    256 KiB spread evenly over it (first and last included).

    Reading 4 MiB per shard keeps the check at load time to a fraction of a second per file, and it finds the
    damage that happens to whole files (overwritten with other or zero bytes of the same size, a copy of another
    checkpoint's file, a half-copied file); a flipped byte between the sampled blocks goes unnoticed.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        if size <= DIGEST_WHOLE_FILE_BYTES:
            digest.update(fh.read())
        else:
            last = size - DIGEST_BLOCK_BYTES
            for index in range(DIGEST_BLOCKS):
                fh.seek(last * index // (DIGEST_BLOCKS - 1))
                digest.update(fh.read(DIGEST_BLOCK_BYTES))
    return digest.hexdigest()


def record_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and :func:`file_digest` of every file in ``directory`` but the info file (what the info JSON records)."""
    return {
        entry.name: {"size": entry.stat().st_size, "digest": file_digest(entry)}
        for entry in sorted(directory.iterdir())
        if entry.is_file() and entry.name != INFO_FILENAME
    }


def _check_recorded_files(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Each file the save recorded is there, with its size and digest (checkpoints written before this: skipped)."""
    for name, recorded in sorted(files.items()):
        file = _listed_file(path, name, INFO_FILENAME)
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {name} is missing. Resume from another checkpoint.")
        size = file.stat().st_size
        if size != recorded["size"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {name} has {size} bytes, the save wrote {recorded['size']}. Resume "
                "from another checkpoint."
            )
        if file_digest(file) != recorded["digest"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {name} is not the file the save wrote (same size, other contents: "
                f"overwritten, or copied from another checkpoint?). Resume from another checkpoint."
            )


def _listed_file(path: Path, name: object, listed_in: str) -> Path:
    """``path / name`` for a file name read from the checkpoint's own files, refused if it leaves the checkpoint."""
    try:
        return path_inside(path, name, path / listed_in)
    except PathOutsideFolderError as err:
        raise CheckpointError(f"Checkpoint {path} is damaged or unsafe: {err}") from err


def _check_shard_files(path: Path) -> Any:
    """Every byte range that torch.distributed.checkpoint's index points at must exist (cheap: no data read).

    Returns the index (torch.distributed.checkpoint ``Metadata``).
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata raises whatever unpickling raises
        raise CheckpointError(
            f"Checkpoint {path} is damaged: its shard index (.metadata) cannot be read ({type(err).__name__}: "
            f"{err}). Resume from another checkpoint."
        ) from err
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = _listed_file(path, name, ".metadata")
        if not shard.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: shard {name} is missing. Resume from another one.")
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: shard {name} has {shard.stat().st_size} bytes, its index needs "
                f"{size} (truncated copy?). Resume from another checkpoint."
            )
    return metadata


def expected_weight_shapes(arch: dict[str, Any], tensor_model_parallel_size: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of the main weights of a Megatron GPTModel of ``arch`` (a ``LlamaConfig`` as a dict), as its
    sharded state dict names them (the transformer layers stacked on a leading layer axis)."""
    from lightning_llama_fp8.config import LlamaConfig

    config = LlamaConfig(**arch)
    layers, hidden, ffn = config.num_layers, config.hidden_size, config.ffn_hidden_size
    vocab = config.padded_vocab_size(tensor_model_parallel_size)
    query = config.num_attention_heads * config.kv_channels
    qkv = query + 2 * config.num_query_groups * config.kv_channels
    shapes = {
        "embedding.word_embeddings.weight": (vocab, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, query),
        "decoder.layers.mlp.linear_fc1.weight": (layers, 2 * ffn, hidden),  # SwiGLU: gate and up projections
        "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, ffn),
    }
    if not config.tie_embeddings:
        shapes["output_layer.weight"] = (vocab, hidden)
    return shapes


def _check_shapes_match_arch(path: Path, metadata: Any, info: CheckpointInfo) -> None:
    """The shard index's weight shapes must be those of the architecture the info JSON names, or the architecture
    check before building means nothing (a JSON copied from or edited to another model would pass it)."""
    if not info.arch:
        return
    try:
        expected = expected_weight_shapes(info.arch, info.tensor_model_parallel_size)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {path}: the architecture in {INFO_FILENAME} is invalid ({err}).") from err
    saved = metadata.state_dict_metadata
    different = [
        f"{key} {tuple(saved[key].size)} (the JSON's architecture gives {shape})"
        for key, shape in expected.items()
        if key in saved and getattr(saved[key], "size", None) is not None and tuple(saved[key].size) != shape
    ]
    if different:
        raise CheckpointError(
            f"Checkpoint {path}: its shards do not hold the architecture its {INFO_FILENAME} names: "
            + "; ".join(different)
            + f". The {INFO_FILENAME} was edited or copied from another checkpoint; resume from another checkpoint."
        )
