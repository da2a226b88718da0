"""``llama-fp8 fit`` / ``validate``: LightningCLI, with a pre-flight check before anything is built.

``llama-fp8 fit --config examples/configs/llama3_8b_h100_fp8.yaml`` trains. Before any Trainer, process group
or model exists it checks the layout, the model against its data, the checkpoint to resume and the GPU: on a
machine that cannot train the config (no CUDA GPU, or a GPU without FP8 while the config asks for FP8) it prints the
plan for that config, says what is missing, and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningCLI

from lightning_llama_fp8.checkpoint.info import CheckpointError, read_checkpoint_info
from lightning_llama_fp8.checkpoint.resume import (
    HPC_CHECKPOINT_PATTERN,
    check_can_resume,
    resolve_last_checkpoint,
)
from lightning_llama_fp8.checkpoint.state_io import load_lightning_state
from lightning_llama_fp8.cli.config_file import (
    EXIT_CANNOT_TRAIN,
    arch_from,
    class_name,
    init_args,
    optimizer_precision_from_yaml,
    plan_from_config,
    precision_from,
    resumed_checkpoint,
    resumed_optimizer_settings,
)
from lightning_llama_fp8.data.base import GPTDataModule, check_val_check_interval
from lightning_llama_fp8.data.indexed import IndexedDataModule
from lightning_llama_fp8.fp8.recipes import check_bf16_layers
from lightning_llama_fp8.fp8.support import fp8_support
from lightning_llama_fp8.model import LlamaLightningModule, OptimizerSettings
from lightning_llama_fp8.parallel.layout import ParallelLayout
from lightning_llama_fp8.parallel.optimizer_precision import AUTO, state_record
from lightning_llama_fp8.plan import TrainingPlan, format_plan
from lightning_llama_fp8.plan.machine import host_memory_problem

# Registers the strategy's name ("megatron_cp") with Lightning before a config names it.
from lightning_llama_fp8.strategy import (  # noqa: F401
    TRANSFORMER_ENGINE_MISSING,
    MegatronCPStrategy,
    check_trainer_settings,
)
from lightning_llama_fp8.validate import available_host_memory


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
        if config.get("ckpt_path") == "last":
            # Lightning takes the newest last*.ckpt by modification time (a dangling link: none, and a new run) and
            # ignores its own SLURM requeue saves; find the newest complete checkpoint by step instead, and hand
            # Lightning its path.
            config["ckpt_path"] = resolve_last_from_config(config, fitting)
            (self.config[self.subcommand] if self.subcommand else self.config)["ckpt_path"] = config["ckpt_path"]
        preflight(config, fitting=fitting)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with :class:`StepProgressBar` (steps of ``max_steps``) unless the config has a progress bar,
        and :class:`PreemptionCheckpoint` unless the config lists one.

        Lightning's default bar counts batches per epoch (``Epoch 0/-2`` for a ``max_steps`` run); a progress bar
        in ``trainer.callbacks`` or ``trainer.enable_progress_bar: false`` is left as configured.
        """
        from lightning.pytorch.callbacks import ProgressBar

        from lightning_llama_fp8.callbacks.preemption import PreemptionCheckpoint
        from lightning_llama_fp8.callbacks.progress import StepProgressBar

        trainer = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            # SIGTERM / SIGUSR1 save a checkpoint and stop with status 75; list one to configure it (signals: [] off).
            callbacks.append(PreemptionCheckpoint())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def preflight(config: dict[str, Any], fitting: bool = True) -> None:
    """Stop before any expensive work if this machine cannot run ``config``; print the plan when it cannot."""
    trainer = config.get("trainer") or {}
    if class_name(trainer.get("strategy")) not in ("MegatronCPStrategy", "megatron_cp"):
        return
    try:
        plan = plan_from_config(config)  # raises LayoutError for layouts that cannot work
        check_trainer_settings(trainer.get("accumulate_grad_batches"), trainer.get("gradient_clip_val"))
        check_model_against_config(config, fitting)
        if config.get("weights_only") and config.get("ckpt_path"):
            raise CheckpointError(
                "weights_only=True cannot load MegatronCPStrategy checkpoints: they hold pickled data "
                "(torch.distributed.checkpoint's index, Transformer Engine's FP8 state, Lightning's state). Load only "
                "checkpoints you trust, without --weights_only."
            )
        model_args = init_args(config.get("model")) or dict(config.get("model") or {})
        if not fitting and not config.get("ckpt_path") and not model_args.get("init_weights"):
            raise ValueError(
                "validate needs weights: --ckpt_path CHECKPOINT (or ckpt_path: last), or model.init_weights (a "
                "Hugging Face directory); without them it would validate randomly initialised weights."
            )
    except (ValueError, TypeError) as err:  # a config that cannot work on any machine
        _refuse(err, fitting)
    check_checkpoint_from_config(config, plan.layout, fitting)
    check_data_from_config(config)  # a corpus that cannot work is worth knowing on any machine
    precision, fp8_args = precision_from(trainer)
    ok, reason = fp8_support(fp8_args.get("recipe", "delayed"), bool(fp8_args.get("fp8_attention")))
    import torch

    if torch.cuda.is_available() and (ok or precision == "bf16" or fp8_args.get("fallback") == "bf16"):
        if torch.cuda.device_count() < plan.world_size // int(trainer.get("num_nodes", 1) or 1):
            _cannot_train(
                plan, f"the config needs {plan.world_size} GPUs but {torch.cuda.device_count()} are visible.", fitting
            )
        if arch_from(config.get("model") or {}).transformer_impl == "transformer_engine" and not te_importable():
            _cannot_train(plan, TRANSFORMER_ENGINE_MISSING, fitting)
        nodes = int(trainer.get("num_nodes") or 1)  # checked by plan_from_config
        host_problem = host_memory_problem(plan, max(plan.world_size // nodes, 1), available_host_memory())
        if host_problem:
            _cannot_train(plan, host_problem, fitting)
        return
    what = ("FP8 " if precision == "fp8" else "") + ("training" if fitting else "validation")
    what = what[0].upper() + what[1:]
    _cannot_train(
        plan, f"{reason} {what} needs NVIDIA GPUs (FP8: compute capability >= 8.9, e.g. H100/H200/B200).", fitting
    )


def te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def check_model_against_config(config: dict[str, Any], fitting: bool) -> None:
    """The model's layers and LR schedule against the precision, data and trainer settings (raises ValueError; the
    data's shape against the model is ``plan_from_config``'s, which the pre-flight check runs first)."""
    data = init_args(config.get("data")) or dict(config.get("data") or {})
    arch = arch_from(config.get("model") or {})
    _, fp8 = precision_from(config.get("trainer") or {})
    strategy = init_args((config.get("trainer") or {}).get("strategy"))
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


def _optimizer_state(config: dict[str, Any]) -> dict[str, Any] | None:
    """The optimizer-state record (checkpoints' ``optimizer_state``) of the config's strategy; ``None`` for
    ``optimizer_precision: auto`` (the default), which resumes a checkpoint's own (the strategy checks it can)."""
    value = optimizer_precision_from_yaml(
        init_args((config.get("trainer") or {}).get("strategy")).get("optimizer_precision", AUTO)
    )
    return None if value == AUTO else state_record(value)  # type: ignore[arg-type]


def _optimizer_settings(config: dict[str, Any]) -> OptimizerSettings:
    model_args = init_args(config.get("model")) or dict(config.get("model") or {})
    optimizer = model_args.get("optimizer")
    if isinstance(optimizer, OptimizerSettings):
        return optimizer
    return OptimizerSettings(**optimizer) if isinstance(optimizer, dict) else OptimizerSettings()


def check_data_from_config(config: dict[str, Any]) -> None:
    """Refuse an ``IndexedDataModule`` whose corpus files are missing or damaged (exit status 2, nothing built)."""
    data = config.get("data")
    if class_name(data) != "IndexedDataModule":
        return
    try:
        IndexedDataModule(**{"data_path": [], **init_args(data)}).check_files()  # building it reads nothing
    except (FileNotFoundError, ValueError) as err:
        _refuse(err, fitting=True)


def check_checkpoint_from_config(config: dict[str, Any], layout: ParallelLayout, fitting: bool) -> None:
    """Refuse a ``ckpt_path`` that is missing, damaged, or does not fit the model and layout (exit status 2).

    ``last``/``best``/``hpc``/``registry`` are resolved by Lightning later; the strategy checks those when loading.
    """
    path = resumed_checkpoint(config)
    if path is None:
        return
    data = init_args(config.get("data")) or dict(config.get("data") or {})
    optimizer_state = _optimizer_state(config) if fitting else None
    try:
        info = read_checkpoint_info(path)
        check_can_resume(
            info,
            arch_from(config.get("model") or {}),
            layout.tensor_model_parallel_size,
            layout.context_parallel_size,
            with_optimizer=fitting,
            pipeline=layout.pipeline_split,
            global_batch_size=int(data["global_batch_size"]) if fitting and data.get("global_batch_size") else None,
            optimizer_settings=asdict(_optimizer_settings(config)) if fitting else None,
            optimizer_state=optimizer_state,
        )
        if fitting and optimizer_state is None:  # "auto": it keeps the checkpoint's, if this run can
            try:
                resumed_optimizer_settings(config, path, info.optimizer_state)
            except ValueError as err:
                raise CheckpointError(str(err)) from err
        load_lightning_state(Path(path))  # small; a damaged or unloadable one is found now, not after the build
    except CheckpointError as err:
        _refuse(err, fitting)


def resolve_last_from_config(config: dict[str, Any], fitting: bool = True) -> str | None:
    """``ckpt_path: last`` as the newest complete checkpoint, by step, in the config's ``ModelCheckpoint`` (and
    ``OnExceptionCheckpoint``) dirpaths and among the ``hpc_ckpt_*.ckpt`` that Lightning's SLURM requeue saved into
    ``trainer.default_root_dir`` (exit status 2 when checkpoints are there but none is complete); ``"last"`` if
    neither holds one and no dirpath is set (Lightning's own lookup, which the strategy checks); None when there is
    no checkpoint yet (a new run; ``validate`` refuses)."""
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    directories = [  # where the run's checkpoint callbacks save (Lightning's "last" looks there too)
        Path(init_args(cb)["dirpath"])
        for cb in (callbacks if isinstance(callbacks, list) else [callbacks])
        if class_name(cb) in ("ModelCheckpoint", "OnExceptionCheckpoint") and init_args(cb).get("dirpath")
    ]
    run_directory = Path(trainer.get("default_root_dir") or os.getcwd())
    try:
        newest = resolve_last_checkpoint(directories, run_directories=[run_directory])
    except CheckpointError as err:
        _refuse(err, fitting=fitting)
    where = ", ".join([*map(str, directories), f"{run_directory} ({HPC_CHECKPOINT_PATTERN})"])
    if newest is None and not directories:
        return "last"
    if newest is None:
        if not fitting:
            _refuse(CheckpointError(f"ckpt_path 'last': no checkpoint in {where} to validate."), fitting=False)
        print(f"ckpt_path 'last': no checkpoint in {where} yet; starting a new run.")
        return None
    what = "resuming from" if fitting else "validating"
    print(f"ckpt_path 'last': {what} {newest} (step {read_checkpoint_info(newest).global_step}).")
    return str(newest)


def _refuse(err: Exception, fitting: bool) -> NoReturn:
    """Say why the config cannot run and exit with status 2 (nothing has been built)."""
    print(f"Not {'training' if fitting else 'validating'}: {err}", file=sys.stderr)
    raise SystemExit(EXIT_CANNOT_TRAIN) from None


def _cannot_train(plan: TrainingPlan, why: str, fitting: bool) -> None:
    print(format_plan(plan))
    print(f"\nNot {'training' if fitting else 'validating'}: {why}", file=sys.stderr)
    print(
        "The plan above is what this config would use; run the same command on a machine that has them.",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_CANNOT_TRAIN)


DESCRIPTION = (
    "Train Megatron-Core Llama 3 with Transformer Engine FP8 through Lightning: `llama-fp8 fit|validate --config "
    "CONFIG.yaml`. Also `llama-fp8 plan --config CONFIG.yaml` (or `plan --help`): the layout check, parameters, "
    "memory per GPU and FLOPs of a config, on any machine; `llama-fp8 convert CHECKPOINT HF_DIR` (or "
    "`convert --help`): a checkpoint as Hugging Face weights; `llama-fp8 preprocess --input FILE... "
    "--output-prefix PREFIX` (or `preprocess --help`): text (JSON Lines, Parquet, plain text) as an indexed "
    "corpus for IndexedDataModule."
)


def run(argv: list[str] | None = None) -> int:
    """``llama-fp8 fit|validate``: LightningCLI with the pre-flight check; ``argv`` None reads the command line."""
    LlamaCLI(
        LlamaLightningModule,
        GPTDataModule,  # any of its subclasses by class_path: MockDataModule, IndexedDataModule, your own
        subclass_mode_data=True,
        # Megatron's optimizer is built from model.optimizer (OptimizerSettings) once the model exists; LightningCLI's
        # --optimizer/--lr_scheduler would replace configure_optimizers with torch's, on parameters not yet built.
        auto_configure_optimizers=False,
        args=argv,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
    return 0
