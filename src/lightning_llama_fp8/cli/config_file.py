"""Reading ``llama-fp8`` configs: a LightningCLI YAML as plain data, and the training plan it describes.

Shared by ``fit``/``validate`` (their pre-flight check) and ``plan``; imports neither torch nor Lightning, so that
``llama-fp8 plan`` answers in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lightning_llama_fp8.checkpoint.info import CheckpointError, check_optimizer_sharding, read_checkpoint_info
from lightning_llama_fp8.config import (
    PRESETS,
    LlamaConfig,
    check_data_matches_arch,
    get_preset,
    llama_config_from_fields,
)
from lightning_llama_fp8.data.arguments import check_data_arguments
from lightning_llama_fp8.hf.arch import llama_config_from_hf, resolve_arch
from lightning_llama_fp8.parallel.layout import ParallelLayout, resolve_param_gather
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.parallel.optimizer_precision import (
    AUTO,
    OptimizerPrecision,
    OptimizerPrecisionSettings,
    resumed_settings,
)
from lightning_llama_fp8.parallel.optimizer_precision import check_setting as check_optimizer_precision_setting
from lightning_llama_fp8.plan import TrainingPlan, plan_training
from lightning_llama_fp8.validate import SettingError, as_bool, as_int, as_optional_int

#: Exit status of a command whose config (or machine) cannot run; nothing was built.
EXIT_CANNOT_TRAIN = 2
#: How errors name the strategy's arguments.
STRATEGY = "trainer.strategy.init_args"


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config as a mapping; ``ValueError`` in one sentence if it is missing, does not parse or is no mapping."""
    import yaml  # PyYAML: Lightning's dependency, a few hundred milliseconds to import

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"config file {path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}.") from None
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a {type(config).__name__}, not a mapping of sections"
        raise ValueError(f"config file {path} is {what} (expected keys such as trainer:, model:, data:).")
    return config


#: LightningCLI's config-file options (jsonargparse's ``--config`` and its short form).
CONFIG_OPTIONS = ("--config", "-c")
#: The command-line option of the model's architecture; ``--model.arch.FIELD`` sets one of its fields.
ARCH_OPTION = "--model.arch"


def config_paths(words: list[str]) -> list[Path]:
    """The files given to ``--config``/``-c`` (``--config X`` or ``--config=X``) on a command line, in order
    (inline YAML, which LightningCLI takes too, is not a path)."""
    return [
        Path(value)
        for _, flag, value in _options(words)
        if flag in CONFIG_OPTIONS and value is not None and not _looks_inline(value)
    ]


def _looks_inline(value: str) -> bool:
    """Whether a ``--config`` value is YAML given inline (a mapping) rather than a file's path."""
    return not Path(value).is_file() and ("\n" in value or ": " in value or value.lstrip().startswith("{"))


def _options(words: list[str]) -> list[tuple[int, str, str | None]]:
    """(position, option, value) of each ``--option value`` / ``--option=value`` word; value None where none
    follows."""
    options = []
    for index, word in enumerate(words):
        if not word.startswith("-"):
            continue
        flag, equals, inline = word.partition("=")
        following = words[index + 1] if index + 1 < len(words) and not words[index + 1].startswith("--") else None
        options.append((index, flag, inline if equals else following))
    return options


#: LightningCLI's option that sets the whole model section from a file or inline YAML, and the one of the weights.
MODEL_OPTION = "--model"
INIT_WEIGHTS_OPTION = "--model.init_weights"
#: What an option does to ``model.arch``: names it, gives (some of) its fields, or cannot be read here.
_NAMES, _GIVES_FIELDS, _UNKNOWN = "names", "gives fields", "unknown"


def expand_arch_before_field_overrides(words: list[str]) -> list[str]:
    """The command line with a named architecture written out as its fields before options that give fields.

    jsonargparse applies fields given after a name (``--model.arch.num_layers 4``, or a later config file's
    ``model.arch`` mapping) to a fresh :class:`LlamaConfig`, whose defaults are Llama 3 8B's, whenever
    ``model.arch`` so far is a name (a preset such as ``llama3_2_1b``, or a Hugging Face directory; with no arch, the
    directory of ``model.init_weights``): the named architecture would be dropped without a word and another model
    trained. Writing the named architecture's fields as ``--model.arch={...}`` just before the first option that
    gives fields makes it change fields of the architecture the config names, as a user reads it.
    """
    named: str | None = None  # model.arch so far, where it names an architecture
    arch_given = False
    init_weights: str | None = None
    insert_at: dict[int, str] = {}
    for index, flag, value in _options(words):
        effect, arch, weights = _arch_effect(flag, value)
        init_weights = weights if weights is not None else init_weights
        if effect == _NAMES:
            named, arch_given = arch, True
        elif effect == _GIVES_FIELDS:
            source = named if arch_given else init_weights
            fields = _named_arch_fields(source) if source is not None else None
            if fields is not None:
                insert_at[index] = f"{ARCH_OPTION}={json.dumps(fields)}"
            named, arch_given = None, True
        elif effect == _UNKNOWN:
            named, arch_given = None, True
    expanded: list[str] = []
    for index, word in enumerate(words):
        if index in insert_at:
            expanded.append(insert_at[index])
        expanded.append(word)
    return expanded


def _arch_effect(flag: str, value: str | None) -> tuple[str | None, Any, str | None]:
    """(what the option does to model.arch, the name it gives, the model.init_weights it gives)."""
    if flag.startswith(ARCH_OPTION + "."):
        return _GIVES_FIELDS, None, None
    if flag == ARCH_OPTION:
        return (_GIVES_FIELDS if value is None or value.lstrip().startswith("{") else _NAMES), value, None
    if flag == INIT_WEIGHTS_OPTION:
        return None, None, value
    if flag not in (*CONFIG_OPTIONS, MODEL_OPTION) or value is None:
        return None, None, None
    try:  # a file, or YAML given inline
        content = read_config_file(Path(value)) if Path(value).is_file() else _inline_yaml(value)
    except ValueError:
        return _UNKNOWN, None, None
    model = content.get("model") if flag in CONFIG_OPTIONS else content
    if not isinstance(model, dict):
        return None, None, None
    model = {**model, **init_args(model)}
    weights = model.get("init_weights")
    if "arch" not in model:
        return None, None, weights
    arch = model["arch"]
    return (_NAMES if isinstance(arch, str) or arch is None else _GIVES_FIELDS), arch, weights


def _inline_yaml(text: str) -> dict[str, Any]:
    import yaml

    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"not YAML: {text!r}") from None
    if not isinstance(content, dict):
        raise ValueError(f"not a mapping: {text!r}")
    return content


def _named_arch_fields(name: str) -> dict[str, Any] | None:
    """The fields of the preset or Hugging Face directory ``name`` (None for anything else, e.g. inline JSON)."""
    if name in PRESETS:
        return dataclasses.asdict(get_preset(name))
    if os.path.isdir(name):
        return dataclasses.asdict(llama_config_from_hf(name))
    return None


def init_args(value: Any) -> dict[str, Any]:
    """``init_args`` of a ``{class_path, init_args}`` entry (or {} for a bare class name / None)."""
    if isinstance(value, dict):
        return dict(value.get("init_args") or {})
    return {}


def class_name(value: Any) -> str:
    """The class of a ``{class_path, init_args}`` entry or of a bare class path, without its module
    (``lightning_llama_fp8.TEFP8Precision`` -> ``TEFP8Precision``); a registered name (``megatron_cp``) as it is."""
    path = value.get("class_path", "") if isinstance(value, dict) else value or ""
    return str(path).rsplit(".", 1)[-1]


def check_strategy_entry(value: Any) -> None:
    """Refuse ``trainer.strategy`` written as a bare class path: Lightning reads a string as a registered strategy
    name (``megatron_cp``, ``ddp``) and fails on a dotted one only after the run has started."""
    if isinstance(value, str) and "." in value:
        raise ValueError(
            f"trainer.strategy {value!r} is read by Lightning as a registered strategy name, not a class path: write "
            f"it as a mapping (strategy: {{class_path: {value}, init_args: {{...}}}}) or use the name megatron_cp."
        )


def arch_from(model: dict[str, Any]) -> LlamaConfig:
    args = {**model, **init_args(model)} if model else {}
    arch = args.get("arch")
    if isinstance(arch, dict):
        arch = llama_config_from_fields(arch)
    return resolve_arch(arch, args.get("init_weights"))


def precision_from(trainer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("fp8" | "bf16", the FP8 plugin's init_args) from trainer.plugins."""
    plugins = trainer.get("plugins") or []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        if class_name(plugin) == "TEFP8Precision":
            return "fp8", init_args(plugin)
    return "bf16", {}


def gpus_from(trainer: dict[str, Any]) -> int | None:
    """GPUs of all nodes as Lightning reads ``trainer.devices``; None for "all visible" ("auto", -1) without a GPU."""
    devices = trainer.get("devices", "auto")
    num_nodes = trainer.get("num_nodes")
    nodes = 1 if num_nodes is None else as_int(num_nodes, "trainer.num_nodes", at_least=1)
    if isinstance(devices, str) and "," in devices:  # "0,1": a list of GPU ids
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, list):
        return len(devices) * nodes
    if devices == -1 or devices == "auto":
        import torch

        return torch.cuda.device_count() * nodes if torch.cuda.is_available() else None
    try:
        return as_int(devices, "trainer.devices", at_least=1) * nodes
    except SettingError:
        raise SettingError(f"trainer.devices must be >= 1, a list of GPU ids, -1 or 'auto'; got {devices!r}.") from None


def plan_from_config(config: dict[str, Any], gpus: int | None = None) -> TrainingPlan:
    """Build the :class:`TrainingPlan` of a LightningCLI config (a parsed or raw YAML dict).

    Every number is checked as the strategy and the data module check it (``validate``; ``data.arguments``): a
    whole number in range, named by its place in the config, so a value that training would refuse or misread
    (``tensor_model_parallel_size: 2.5``, ``data.seq_length: -1``) is refused here too.
    """
    trainer = config.get("trainer") or {}
    check_strategy_entry(trainer.get("strategy"))
    strategy = init_args(trainer.get("strategy"))
    data = init_args(config.get("data")) or dict(config.get("data") or {})
    data_numbers = check_data_arguments(data)
    arch = arch_from(config.get("model") or {})
    check_data_matches_arch(arch, data_numbers.get("seq_length"), data_numbers.get("vocab_size"))
    precision, fp8_args = precision_from(trainer)
    world_size = gpus if gpus is not None else gpus_from(trainer)
    if world_size is None:
        raise ValueError(
            "The config does not fix the GPU count (trainer.devices is 'auto' or -1 and no GPU is visible): set "
            "trainer.devices to a number, or pass --gpus N to `llama-fp8 plan`."
        )

    def size(name: str, default: int | None) -> int | None:
        return as_optional_int(strategy.get(name, default), f"{STRATEGY}.{name}")

    def switch(name: str, default: bool) -> bool:
        return as_bool(strategy.get(name, default), f"{STRATEGY}.{name}")

    use_distributed_optimizer = switch("use_distributed_optimizer", True)
    resolve_param_gather(
        use_distributed_optimizer,
        None if strategy.get("overlap_param_gather") is None else switch("overlap_param_gather", True),
        switch("align_param_gather", False),
    )
    tp = size("tensor_model_parallel_size", 1)
    layout = ParallelLayout(
        tensor_model_parallel_size=tp,
        context_parallel_size=size("context_parallel_size", 1),
        sequence_parallel=switch("sequence_parallel", False) and tp is not None and tp > 1,
        cp_comm_type=strategy.get("cp_comm_type", "p2p"),
        pipeline_model_parallel_size=size("pipeline_model_parallel_size", 1),
        virtual_pipeline_model_parallel_size=size("virtual_pipeline_model_parallel_size", None),
        num_layers_in_first_pipeline_stage=size("num_layers_in_first_pipeline_stage", None),
        num_layers_in_last_pipeline_stage=size("num_layers_in_last_pipeline_stage", None),
    )
    return plan_training(
        arch,
        layout,
        world_size,
        global_batch_size=data_numbers.get("global_batch_size", 128),
        micro_batch_size=data_numbers.get("micro_batch_size", 1),
        precision=precision,  # type: ignore[arg-type]
        use_distributed_optimizer=use_distributed_optimizer,
        grad_reduce_in_fp32=switch("grad_reduce_in_fp32", False),
        fp8_param_gather=as_bool(fp8_args.get("fp8_param_gather", False), "TEFP8Precision.fp8_param_gather"),
        recompute=settings_from_yaml(RecomputeSettings, strategy.get("activation_recompute")),
        optimizer_offload=settings_from_yaml(OptimizerOffloadSettings, strategy.get("optimizer_offload")),
        optimizer_precision=optimizer_precision_of_run(config),
        checkpoint_optimizer_sharding=check_optimizer_sharding(
            strategy.get("checkpoint_optimizer_sharding", "dp_reshardable")
        ),
        bf16_first_layers=as_int(fp8_args.get("bf16_first_layers", 0), "TEFP8Precision.bf16_first_layers", at_least=0),
        bf16_last_layers=as_int(fp8_args.get("bf16_last_layers", 0), "TEFP8Precision.bf16_last_layers", at_least=0),
        fp8_recipe=str(fp8_args.get("recipe", "delayed")),
        # SFTDataModule always masks documents (its samples pack conversations); it refuses document_masking: false.
        document_masking=class_name(config.get("data")) == "SFTDataModule"
        or as_bool(data.get("document_masking", False), "data.document_masking"),
        fp8_attention=as_bool(fp8_args.get("fp8_attention", False), "TEFP8Precision.fp8_attention"),
    )


def optimizer_precision_from_yaml(value: Any) -> OptimizerPrecision:
    """``optimizer_precision`` of a strategy's init_args: ``"auto"``, ``None`` or the settings' mapping."""
    if isinstance(value, (str, bool)):  # YAML's `off` is false
        check_optimizer_precision_setting(value)
    return value if value == AUTO else settings_from_yaml(OptimizerPrecisionSettings, value)


def resumed_checkpoint(config: dict[str, Any]) -> str | None:
    """The config's ``ckpt_path`` where it names a checkpoint directory (not ``last``/``best``/``hpc``/``registry``,
    which Lightning resolves later)."""
    path = config.get("ckpt_path")
    if not path or str(path) in ("last", "best", "hpc", "registry"):
        return None
    return str(path)


def optimizer_precision_of_run(config: dict[str, Any]) -> OptimizerPrecision:
    """The config's ``optimizer_precision``; ``"auto"`` resuming a named checkpoint is that checkpoint's own optimizer
    state (an unreadable checkpoint is left to the checkpoint checks, which say what is wrong with it)."""
    strategy = init_args((config.get("trainer") or {}).get("strategy"))
    setting = optimizer_precision_from_yaml(strategy.get("optimizer_precision", AUTO))
    checkpoint = resumed_checkpoint(config)
    if setting != AUTO or checkpoint is None:
        return setting
    try:
        record = read_checkpoint_info(checkpoint).optimizer_state
        return resumed_optimizer_settings(config, checkpoint, record, needs_transformer_engine_here=False)
    except (CheckpointError, ValueError):
        return setting  # the checkpoint checks say what is wrong


def resumed_optimizer_settings(
    config: dict[str, Any], checkpoint: str, record: dict[str, Any], needs_transformer_engine_here: bool = True
) -> OptimizerPrecisionSettings | None:
    """What the config's ``optimizer_precision: auto`` run keeps resuming ``checkpoint`` (its ``record``); raises
    ``ValueError`` (naming the fix) where it cannot keep it; see ``resumed_settings``."""
    strategy = init_args((config.get("trainer") or {}).get("strategy"))
    _, fp8_args = precision_from(config.get("trainer") or {})
    return resumed_settings(
        checkpoint,
        record,
        use_distributed_optimizer=as_bool(strategy.get("use_distributed_optimizer", True), "use_distributed_optimizer"),
        fp8_param_gather=as_bool(fp8_args.get("fp8_param_gather", False), "TEFP8Precision.fp8_param_gather"),
        optimizer_offloaded=strategy.get("optimizer_offload") is not None,
        checkpoint_optimizer_sharding=str(strategy.get("checkpoint_optimizer_sharding", "dp_reshardable")),
        needs_transformer_engine_here=needs_transformer_engine_here,
    )


def settings_from_yaml(cls: Any, value: Any) -> Any:
    """A settings dataclass from its YAML mapping (``None``: not set); raises ValueError/TypeError when bad."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__} must be a mapping of its fields, got {value!r}.")
    return cls(**value)
