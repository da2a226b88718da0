"""Reading ``llama-fp8`` configs: a LightningCLI YAML as plain data, and the training plan it describes.

Shared by ``fit``/``validate`` (their pre-flight check) and ``plan``; imports neither torch nor Lightning, so that
``llama-fp8 plan`` answers in well under a second.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf.arch import resolve_arch
from lightning_llama_fp8.parallel.layout import ParallelLayout
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.plan import TrainingPlan, plan_training

#: Exit status of a command whose config (or machine) cannot run; nothing was built.
EXIT_CANNOT_TRAIN = 2


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


def config_paths(words: list[str]) -> list[Path]:
    """The files given to ``--config`` (``--config X`` or ``--config=X``) on a command line."""
    paths = [Path(word.split("=", 1)[1]) for word in words if word.startswith("--config=")]
    return paths + [Path(value) for flag, value in itertools.pairwise(words) if flag == "--config"]


def init_args(value: Any) -> dict[str, Any]:
    """``init_args`` of a ``{class_path, init_args}`` entry (or {} for a bare class name / None)."""
    if isinstance(value, dict):
        return dict(value.get("init_args") or {})
    return {}


def class_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("class_path", "")).rsplit(".", 1)[-1]
    return str(value or "")


def arch_from(model: dict[str, Any]) -> LlamaConfig:
    args = {**model, **init_args(model)} if model else {}
    arch = args.get("arch")
    return resolve_arch(LlamaConfig(**arch) if isinstance(arch, dict) else arch, args.get("init_weights"))


def precision_from(trainer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("fp8" | "bf16", the FP8 plugin's init_args) from trainer.plugins."""
    plugins = trainer.get("plugins") or []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        if class_name(plugin) == "TEFP8Precision":
            return "fp8", init_args(plugin)
    return "bf16", {}


def gpus_from(trainer: dict[str, Any]) -> int | None:
    """GPUs of all nodes as Lightning reads ``trainer.devices``; None for "all visible" ("auto", -1) without a GPU."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": a list of GPU ids
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, list):
        return len(devices) * nodes
    if devices == -1 or devices == "auto":
        import torch

        return torch.cuda.device_count() * nodes if torch.cuda.is_available() else None
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"trainer.devices must be >= 1, a list of GPU ids, -1 or 'auto'; got {devices}.")
        return devices * nodes
    return None


def plan_from_config(config: dict[str, Any], gpus: int | None = None) -> TrainingPlan:
    """Build the :class:`TrainingPlan` of a LightningCLI config (a parsed or raw YAML dict)."""
    trainer = config.get("trainer") or {}
    strategy = init_args(trainer.get("strategy"))
    data = init_args(config.get("data")) or dict(config.get("data") or {})
    precision, fp8_args = precision_from(trainer)
    world_size = gpus if gpus is not None else gpus_from(trainer)
    if world_size is None:
        raise ValueError(
            "The config does not fix the GPU count (trainer.devices is 'auto' or -1 and no GPU is visible): set "
            "trainer.devices to a number, or pass --gpus N to `llama-fp8 plan`."
        )
    layout = ParallelLayout(
        tensor_model_parallel_size=int(strategy.get("tensor_model_parallel_size", 1)),
        context_parallel_size=int(strategy.get("context_parallel_size", 1)),
        sequence_parallel=bool(strategy.get("sequence_parallel", False))
        and int(strategy.get("tensor_model_parallel_size", 1)) > 1,
        cp_comm_type=strategy.get("cp_comm_type", "p2p"),
        pipeline_model_parallel_size=int(strategy.get("pipeline_model_parallel_size", 1)),
        virtual_pipeline_model_parallel_size=_optional_int(strategy.get("virtual_pipeline_model_parallel_size")),
        num_layers_in_first_pipeline_stage=_optional_int(strategy.get("num_layers_in_first_pipeline_stage")),
        num_layers_in_last_pipeline_stage=_optional_int(strategy.get("num_layers_in_last_pipeline_stage")),
    )
    return plan_training(
        arch_from(config.get("model") or {}),
        layout,
        world_size,
        global_batch_size=int(data.get("global_batch_size", 128)),
        micro_batch_size=int(data.get("micro_batch_size", 1)),
        precision=precision,  # type: ignore[arg-type]
        use_distributed_optimizer=bool(strategy.get("use_distributed_optimizer", True)),
        grad_reduce_in_fp32=bool(strategy.get("grad_reduce_in_fp32", False)),
        fp8_param_gather=bool(fp8_args.get("fp8_param_gather", False)),
        recompute=_settings(RecomputeSettings, strategy.get("activation_recompute")),
        optimizer_offload=_settings(OptimizerOffloadSettings, strategy.get("optimizer_offload")),
        fp8_recipe=str(fp8_args.get("recipe", "delayed")),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _settings(cls: Any, value: Any) -> Any:
    """A settings dataclass from its YAML mapping (``None``: not set); raises ValueError/TypeError when bad."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__} must be a mapping of its fields, got {value!r}.")
    return cls(**value)
