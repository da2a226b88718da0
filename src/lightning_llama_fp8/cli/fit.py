"""The ``llama-fp8`` command: LightningCLI ``fit`` / ``validate``, plus ``plan``.

``llama-fp8 fit --config examples/configs/llama3_8b_h100_fp8.yaml`` trains. Before any Trainer, process group
or model exists it checks the layout and the GPU: on a machine that cannot train the config (no CUDA GPU, or
a GPU without FP8 while the config asks for FP8) it prints the plan for that config, says what is missing,
and exits with status 2.

``llama-fp8 plan --config <yaml> [--gpus N] [...]`` runs anywhere (CPU only): it validates the layout and
prints parameters, memory per GPU and FLOPs per step.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_llama_fp8.checkpoint.info import (
    CheckpointError,
    check_can_resume,
    load_lightning_state,
    read_checkpoint_info,
    resolve_last_checkpoint,
)
from lightning_llama_fp8.config import LlamaConfig, resolve_arch
from lightning_llama_fp8.data import GPTDataModule
from lightning_llama_fp8.data.base import check_val_check_interval
from lightning_llama_fp8.data.indexed import IndexedDataModule
from lightning_llama_fp8.model import LlamaLightningModule, OptimizerSettings, check_data_matches_arch
from lightning_llama_fp8.parallel.layout import LayoutError, ParallelLayout
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.plan.estimate import TrainingPlan, format_plan, plan_training
from lightning_llama_fp8.precision import check_bf16_layers, fp8_support

EXIT_CANNOT_TRAIN = 2


class LlamaCLI(LightningCLI):
    """LightningCLI with the fit/validate subcommands and a pre-flight check before anything is built."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then refuse a ``ckpt_path`` that is a file before LightningCLI reads hyper-parameters from it.

        LightningCLI ``torch.load``s a file ``ckpt_path`` right after parsing (to read its hyper-parameters), which
        for a large file loads all of it and for a foreign one fails with an unpickling error; this package's
        checkpoints are directories, so a file gets the checkpoint check's own message instead.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            try:
                read_checkpoint_info(path)
            except CheckpointError as err:
                _refuse(err, fitting=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        config = (self.config[self.subcommand] if self.subcommand else self.config).as_dict()
        fitting = self.subcommand in (None, "fit")
        if fitting and config.get("ckpt_path") == "last":
            # Lightning takes a dangling last.ckpt link for "no checkpoint" and starts a new run; find the newest
            # complete checkpoint instead, and hand Lightning its path.
            config["ckpt_path"] = resolve_last_from_config(config)
            (self.config[self.subcommand] if self.subcommand else self.config)["ckpt_path"] = config["ckpt_path"]
        preflight(config, fitting=fitting)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with :class:`StepProgressBar` (steps of ``max_steps``) unless the config has a progress bar.

        Lightning's default bar counts batches per epoch (``Epoch 0/-2`` for a ``max_steps`` run); a progress bar
        in ``trainer.callbacks`` or ``trainer.enable_progress_bar: false`` is left as configured.
        """
        from lightning.pytorch.callbacks import ProgressBar

        from lightning_llama_fp8.callbacks.progress import StepProgressBar

        trainer = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)


# ---------------------------------------------------------------------- reading a config
def _init_args(value: Any) -> dict[str, Any]:
    """``init_args`` of a ``{class_path, init_args}`` entry (or {} for a bare class name / None)."""
    if isinstance(value, dict):
        return dict(value.get("init_args") or {})
    return {}


def _class_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("class_path", "")).rsplit(".", 1)[-1]
    return str(value or "")


def _arch_from(model: dict[str, Any]) -> LlamaConfig:
    args = {**model, **_init_args(model)} if model else {}
    arch = args.get("arch")
    return resolve_arch(LlamaConfig(**arch) if isinstance(arch, dict) else arch, args.get("init_weights"))


def _precision_from(trainer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("fp8" | "bf16", the FP8 plugin's init_args) from trainer.plugins."""
    plugins = trainer.get("plugins") or []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        if _class_name(plugin) == "TEFP8Precision":
            return "fp8", _init_args(plugin)
    return "bf16", {}


def _gpus_from(trainer: dict[str, Any]) -> int | None:
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
    strategy = _init_args(trainer.get("strategy"))
    data = _init_args(config.get("data")) or dict(config.get("data") or {})
    precision, fp8_args = _precision_from(trainer)
    world_size = gpus if gpus is not None else _gpus_from(trainer)
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
        _arch_from(config.get("model") or {}),
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


def preflight(config: dict[str, Any], fitting: bool = True) -> None:
    """Stop before any expensive work if this machine cannot run ``config``; print the plan when it cannot."""
    trainer = config.get("trainer") or {}
    if _class_name(trainer.get("strategy")) not in ("MegatronCPStrategy", "megatron_cp"):
        return
    try:
        plan = plan_from_config(config)  # raises LayoutError for layouts that cannot work
        check_model_against_config(config, fitting)
        if config.get("weights_only") and config.get("ckpt_path"):
            raise CheckpointError(
                "weights_only=True cannot load MegatronCPStrategy checkpoints: they hold pickled data "
                "(torch.distributed.checkpoint's index, Transformer Engine's FP8 state, Lightning's state). Load only "
                "checkpoints you trust, without --weights_only."
            )
    except (ValueError, TypeError) as err:  # a config that cannot work on any machine
        _refuse(err, fitting)
    check_checkpoint_from_config(config, plan.layout, fitting)
    check_data_from_config(config)  # a corpus that cannot work is worth knowing on any machine
    precision, fp8_args = _precision_from(trainer)
    ok, reason = fp8_support(fp8_args.get("recipe", "delayed"), bool(fp8_args.get("fp8_attention")))
    import torch

    if torch.cuda.is_available() and (ok or precision == "bf16" or fp8_args.get("fallback") == "bf16"):
        if torch.cuda.device_count() < plan.world_size // int(trainer.get("num_nodes", 1) or 1):
            _cannot_train(plan, f"the config needs {plan.world_size} GPUs but {torch.cuda.device_count()} are visible.")
        if _arch_from(config.get("model") or {}).transformer_impl == "transformer_engine" and not te_importable():
            _cannot_train(
                plan,
                "model.arch.transformer_impl is 'transformer_engine' (the default, in BF16 too) but Transformer Engine "
                "does not import here. Install it (pip install 'lightning-llama-fp8[te]', or NVIDIA's PyTorch "
                "container) or set model.arch.transformer_impl: local (BF16 only, no context parallelism).",
            )
        return
    what = "FP8 training needs" if precision == "fp8" else "Training needs"
    _cannot_train(plan, f"{reason} {what} NVIDIA GPUs (FP8: compute capability >= 8.9, e.g. H100/H200/B200).")


def te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def check_model_against_config(config: dict[str, Any], fitting: bool) -> None:
    """The model's data shape and LR schedule against the data and trainer settings (raises ValueError)."""
    data = _init_args(config.get("data")) or dict(config.get("data") or {})
    seq_length, vocab_size = data.get("seq_length"), data.get("vocab_size")
    arch = _arch_from(config.get("model") or {})
    check_data_matches_arch(
        arch,
        None if seq_length is None else int(seq_length),
        None if vocab_size is None else int(vocab_size),
    )
    _, fp8 = _precision_from(config.get("trainer") or {})
    strategy = _init_args((config.get("trainer") or {}).get("strategy"))
    check_bf16_layers(
        int(fp8.get("bf16_first_layers", 0)),
        int(fp8.get("bf16_last_layers", 0)),
        arch.num_layers,
        int(strategy.get("pipeline_model_parallel_size", 1)),
    )
    if fitting:
        trainer = config.get("trainer") or {}
        max_steps = int(trainer.get("max_steps") or -1)
        _optimizer_settings(config).check_schedule(max_steps)
        batch, samples = int(data.get("global_batch_size") or 128), data.get("train_samples")
        train_batches = int(samples) // batch if samples is not None else max_steps
        if train_batches > 0:
            check_val_check_interval(
                trainer.get("val_check_interval"),
                train_batches,
                trainer.get("limit_train_batches"),
                trainer.get("check_val_every_n_epoch", 1),
                trainer.get("limit_val_batches"),
            )


def _optimizer_settings(config: dict[str, Any]) -> OptimizerSettings:
    model_args = _init_args(config.get("model")) or dict(config.get("model") or {})
    optimizer = model_args.get("optimizer")
    if isinstance(optimizer, OptimizerSettings):
        return optimizer
    return OptimizerSettings(**optimizer) if isinstance(optimizer, dict) else OptimizerSettings()


def check_data_from_config(config: dict[str, Any]) -> None:
    """Refuse an ``IndexedDataModule`` whose corpus files are missing or damaged (exit status 2, nothing built)."""
    data = config.get("data")
    if _class_name(data) != "IndexedDataModule":
        return
    try:
        IndexedDataModule(**{"data_path": [], **_init_args(data)}).check_files()  # building it reads nothing
    except (FileNotFoundError, ValueError) as err:
        _refuse(err, fitting=True)


def check_checkpoint_from_config(config: dict[str, Any], layout: ParallelLayout, fitting: bool) -> None:
    """Refuse a ``ckpt_path`` that is missing, damaged, or does not fit the model and layout (exit status 2).

    ``last``/``best``/``hpc``/``registry`` are resolved by Lightning later; the strategy checks those when loading.
    """
    path = config.get("ckpt_path")
    if not path or str(path) in ("last", "best", "hpc", "registry"):
        return
    data = _init_args(config.get("data")) or dict(config.get("data") or {})
    try:
        info = read_checkpoint_info(path)
        check_can_resume(
            info,
            _arch_from(config.get("model") or {}),
            layout.tensor_model_parallel_size,
            layout.context_parallel_size,
            with_optimizer=fitting,
            pipeline=layout.pipeline_split,
            global_batch_size=int(data["global_batch_size"]) if fitting and data.get("global_batch_size") else None,
            optimizer_settings=asdict(_optimizer_settings(config)) if fitting else None,
        )
        load_lightning_state(Path(path))  # small; a damaged or unloadable one is found now, not after the build
    except CheckpointError as err:
        _refuse(err, fitting)


def resolve_last_from_config(config: dict[str, Any]) -> str | None:
    """``ckpt_path: last`` as the newest complete checkpoint in the config's ``ModelCheckpoint`` dirpaths (exit
    status 2 when checkpoints are there but none is complete); ``"last"`` if no dirpath is set (Lightning's own
    lookup, which the strategy checks); None when there is no checkpoint yet (a new run)."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    directories = [
        Path(_init_args(cb)["dirpath"])
        for cb in (callbacks if isinstance(callbacks, list) else [callbacks])
        if _class_name(cb) == "ModelCheckpoint" and _init_args(cb).get("dirpath")
    ]
    if not directories:
        return "last"
    try:
        newest = resolve_last_checkpoint(directories)
    except CheckpointError as err:
        _refuse(err, fitting=True)
    if newest is None:
        print(f"ckpt_path 'last': no checkpoint in {', '.join(map(str, directories))} yet; starting a new run.")
        return None
    print(f"ckpt_path 'last': resuming from {newest} (step {read_checkpoint_info(newest).global_step}).")
    return str(newest)


def _refuse(err: Exception, fitting: bool) -> NoReturn:
    """Say why the config cannot run and exit with status 2 (nothing has been built)."""
    print(f"Not {'training' if fitting else 'validating'}: {err}", file=sys.stderr)
    raise SystemExit(EXIT_CANNOT_TRAIN) from None


def _cannot_train(plan: TrainingPlan, why: str) -> None:
    print(format_plan(plan))
    print(f"\nNot training: {why}", file=sys.stderr)
    print(
        "The plan above is what this config would use; run the same command on a machine that has them.",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_CANNOT_TRAIN)


# ---------------------------------------------------------------------- plan subcommand
def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-fp8 plan", description="Validate a layout and print its cost.")
    parser.add_argument("--config", type=Path, help="a LightningCLI YAML (examples/configs/*.yaml)")
    parser.add_argument("--gpus", type=int, help="number of GPUs (default: trainer.devices x num_nodes)")
    parser.add_argument("--arch", help="preset name, overriding the config's model.arch")
    parser.add_argument("--tp", type=int, help="tensor_model_parallel_size")
    parser.add_argument("--cp", type=int, help="context_parallel_size")
    parser.add_argument("--pp", type=int, help="pipeline_model_parallel_size")
    parser.add_argument("--vpp", type=int, help="virtual_pipeline_model_parallel_size (0: none)")
    parser.add_argument("--first-stage-layers", type=int, help="num_layers_in_first_pipeline_stage")
    parser.add_argument("--last-stage-layers", type=int, help="num_layers_in_last_pipeline_stage")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--precision", choices=("fp8", "bf16"))
    parser.add_argument("--recompute", choices=("off", "selective", "full"), help="activation recompute granularity")
    parser.add_argument("--recompute-method", choices=("uniform", "block"), help="full recompute only")
    parser.add_argument("--recompute-num-layers", type=int, help="full recompute: layers per chunk / checkpointed")
    parser.add_argument("--recompute-modules", nargs="+", help="selective recompute: core_attn, mlp, layernorm")
    parser.add_argument(
        "--optimizer-offload-fraction", type=float, help="share of the optimizer state on the CPU (0: off)"
    )
    parser.add_argument("--gpu-memory-gib", type=float, help="say whether the plan fits GPUs of this size")
    args = parser.parse_args(argv)

    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            config = read_config_file(args.config)
        except ValueError as err:
            print(f"llama-fp8 plan: {err}", file=sys.stderr)
            return EXIT_CANNOT_TRAIN
    _apply_overrides(config, args)
    try:
        plan = plan_from_config(config, gpus=args.gpus)
    except (LayoutError, ValueError, TypeError) as err:  # TypeError: an unknown key in model.arch
        print(f"llama-fp8 plan: {err}", file=sys.stderr)
        return EXIT_CANNOT_TRAIN
    print(format_plan(plan, gpu_memory_gib=args.gpu_memory_gib))
    return 0


def _apply_overrides(config: dict[str, Any], args: argparse.Namespace) -> None:
    trainer = config.setdefault("trainer", {})
    strategy = trainer.get("strategy")
    if not isinstance(strategy, dict):
        strategy = trainer["strategy"] = {
            "class_path": "lightning_llama_fp8.MegatronCPStrategy",
            "init_args": {},
        }
    strategy_args = strategy.setdefault("init_args", {})
    data = config.setdefault("data", {"init_args": {}})
    data_args = data.setdefault("init_args", {})
    if args.arch:
        config["model"] = {"arch": args.arch}
    for key, value in (
        ("tensor_model_parallel_size", args.tp),
        ("context_parallel_size", args.cp),
        ("sequence_parallel", args.sequence_parallel),
        ("pipeline_model_parallel_size", args.pp),
        ("num_layers_in_first_pipeline_stage", args.first_stage_layers),
        ("num_layers_in_last_pipeline_stage", args.last_stage_layers),
    ):
        if value is not None:
            strategy_args[key] = value
    if args.vpp is not None:
        strategy_args["virtual_pipeline_model_parallel_size"] = args.vpp or None
    _apply_memory_overrides(strategy_args, args)
    if args.global_batch_size is not None:
        data_args["global_batch_size"] = args.global_batch_size
    if args.micro_batch_size is not None:
        data_args["micro_batch_size"] = args.micro_batch_size
    if args.precision == "bf16":
        trainer["plugins"] = [{"class_path": "lightning_llama_fp8.MegatronPrecision"}]
    elif args.precision == "fp8" and _precision_from(trainer)[0] != "fp8":
        trainer["plugins"] = [{"class_path": "lightning_llama_fp8.TEFP8Precision"}]


def _apply_memory_overrides(strategy_args: dict[str, Any], args: argparse.Namespace) -> None:
    """``--recompute*`` and ``--optimizer-offload-fraction`` into the strategy's init_args."""
    if args.recompute == "off":
        strategy_args["activation_recompute"] = None
    elif args.recompute is not None:
        strategy_args["activation_recompute"] = {"granularity": args.recompute}
    given = {
        "method": args.recompute_method,
        "num_layers": args.recompute_num_layers,
        "modules": args.recompute_modules,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        recompute = strategy_args.get("activation_recompute")
        if not isinstance(recompute, dict):
            raise SystemExit("llama-fp8 plan: --recompute-method/-num-layers/-modules need --recompute selective|full.")
        recompute.update(given)
    if args.optimizer_offload_fraction == 0:
        strategy_args["optimizer_offload"] = None
    elif args.optimizer_offload_fraction is not None:
        offload = strategy_args.get("optimizer_offload")
        strategy_args["optimizer_offload"] = {
            **(offload if isinstance(offload, dict) else {}),
            "fraction": args.optimizer_offload_fraction,
        }


# ---------------------------------------------------------------------- entry point
DESCRIPTION = (
    "Train Megatron-Core Llama 3 with Transformer Engine FP8 through Lightning: `llama-fp8 fit|validate --config "
    "CONFIG.yaml`. Also `llama-fp8 plan --config CONFIG.yaml` (or `plan --help`): the layout check, parameters, "
    "memory per GPU and FLOPs of a config, on any machine; `llama-fp8 convert CHECKPOINT HF_DIR` (or "
    "`convert --help`): a checkpoint as Hugging Face weights; `llama-fp8 preprocess --input FILE... "
    "--output-prefix PREFIX` (or `preprocess --help`): text (JSON Lines, Parquet, plain text) as an indexed "
    "corpus for IndexedDataModule."
)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config as a mapping; ``ValueError`` in one sentence if it is missing, does not parse or is no mapping."""
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


def _config_paths(words: list[str]) -> list[Path]:
    """The files given to ``--config`` (``--config X`` or ``--config=X``) on a command line."""
    paths = [Path(word.split("=", 1)[1]) for word in words if word.startswith("--config=")]
    return paths + [Path(value) for flag, value in itertools.pairwise(words) if flag == "--config"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama-fp8``; ``argv`` defaults to the command line."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] != "plan":  # plan reads its own; LightningCLI would print its whole usage first
        for path in _config_paths(words):
            try:
                read_config_file(path)
            except ValueError as err:
                print(f"llama-fp8 {words[0]}: {err}", file=sys.stderr)
                return EXIT_CANNOT_TRAIN
    if words and words[0] == "plan":
        return plan_main(words[1:])
    if words and words[0] == "convert":
        from lightning_llama_fp8.cli.convert import convert_main

        return convert_main(words[1:])
    if words and words[0] == "preprocess":
        from lightning_llama_fp8.data.preprocess import main as preprocess_main

        return preprocess_main(words[1:])
    LlamaCLI(
        LlamaLightningModule,
        GPTDataModule,  # any of its subclasses by class_path: MockDataModule, IndexedDataModule, your own
        subclass_mode_data=True,
        args=argv,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
