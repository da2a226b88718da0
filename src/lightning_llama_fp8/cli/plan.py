"""``llama-fp8 plan``: validate a layout and print its parameters, memory per GPU and FLOPs, on any machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lightning_llama_fp8.cli.config_file import (
    EXIT_CANNOT_TRAIN,
    class_name,
    plan_from_config,
    precision_from,
    read_config_file,
)
from lightning_llama_fp8.parallel.layout import LayoutError
from lightning_llama_fp8.plan import format_plan
from lightning_llama_fp8.plan.estimate import GIB
from lightning_llama_fp8.validate import float_argument, int_argument

#: Exit status of ``--gpu-memory-gib N`` when the plan needs more than N GiB per GPU (a scriptable "no").
EXIT_DOES_NOT_FIT = 1
#: argparse types of the whole-number flags (``validate``'s rules: ``--tp 2.5`` or ``--gpus 0`` are refused).
POSITIVE, NON_NEGATIVE = int_argument(at_least=1), int_argument(at_least=0)


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-fp8 plan", description="Validate a layout and print its cost.")
    parser.add_argument("--config", type=Path, help="a LightningCLI YAML (examples/configs/*.yaml)")
    parser.add_argument("--gpus", type=POSITIVE, help="number of GPUs (default: trainer.devices x num_nodes)")
    parser.add_argument("--arch", help="preset name, overriding the config's model.arch")
    parser.add_argument("--tp", type=POSITIVE, help="tensor_model_parallel_size")
    parser.add_argument("--cp", type=POSITIVE, help="context_parallel_size")
    parser.add_argument("--pp", type=POSITIVE, help="pipeline_model_parallel_size")
    parser.add_argument("--vpp", type=NON_NEGATIVE, help="virtual_pipeline_model_parallel_size (0: none)")
    parser.add_argument("--first-stage-layers", type=POSITIVE, help="num_layers_in_first_pipeline_stage")
    parser.add_argument("--last-stage-layers", type=POSITIVE, help="num_layers_in_last_pipeline_stage")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--global-batch-size", type=POSITIVE)
    parser.add_argument("--micro-batch-size", type=POSITIVE)
    parser.add_argument("--precision", choices=("fp8", "bf16"))
    parser.add_argument("--recompute", choices=("off", "selective", "full"), help="activation recompute granularity")
    parser.add_argument("--recompute-method", choices=("uniform", "block"), help="full recompute only")
    parser.add_argument("--recompute-num-layers", type=POSITIVE, help="full recompute: layers per chunk / checkpointed")
    parser.add_argument("--recompute-modules", nargs="+", help="selective recompute: core_attn, mlp, layernorm")
    parser.add_argument(
        "--optimizer-offload-fraction",
        type=float_argument(at_least=0, at_most=1),
        help="share of the optimizer state on the CPU (0: off)",
    )
    parser.add_argument(
        "--optimizer-precision",
        choices=("auto", "off", "bf16", "fp32"),
        help="Megatron's precision-aware optimizer with Adam moments in this dtype (off: Megatron's default optimizer; "
        "auto: the strategy's default, fp32 moments where the precision-aware optimizer runs)",
    )
    parser.add_argument(
        "--fp8-param-gather",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FP8 runs: keep the weights in FP8 (TEFP8Precision.fp8_param_gather)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float_argument(above=0),
        help=f"say whether the plan fits GPUs of this size (exit status {EXIT_DOES_NOT_FIT} where it does not)",
    )
    args = parser.parse_args(argv)

    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            config = read_config_file(args.config)
        except ValueError as err:
            print(f"llama-fp8 plan: {err}", file=sys.stderr)
            return EXIT_CANNOT_TRAIN
    _apply_overrides(config, args)
    strategy = class_name(config["trainer"]["strategy"])
    if strategy not in ("MegatronCPStrategy", "megatron_cp"):
        print(
            f"llama-fp8 plan: trainer.strategy is {strategy!r}; the plan covers MegatronCPStrategy runs (megatron_cp).",
            file=sys.stderr,
        )
        return EXIT_CANNOT_TRAIN
    try:
        plan = plan_from_config(config, gpus=args.gpus)
    except (LayoutError, ValueError, TypeError) as err:  # TypeError: an unknown key in model.arch
        print(f"llama-fp8 plan: {err}", file=sys.stderr)
        return EXIT_CANNOT_TRAIN
    print(format_plan(plan, gpu_memory_gib=args.gpu_memory_gib))
    if args.gpu_memory_gib is not None and plan.memory.total / GIB > args.gpu_memory_gib:
        return EXIT_DOES_NOT_FIT
    return 0


def _apply_overrides(config: dict[str, Any], args: argparse.Namespace) -> None:
    trainer = config.setdefault("trainer", {})
    strategy = trainer.get("strategy")
    if strategy is None or strategy == "megatron_cp":
        strategy = trainer["strategy"] = {
            "class_path": "lightning_llama_fp8.MegatronCPStrategy",
            "init_args": {},
        }
    strategy_args = strategy.setdefault("init_args", {}) if isinstance(strategy, dict) else {}
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
    elif args.precision == "fp8" and precision_from(trainer)[0] != "fp8":
        trainer["plugins"] = [{"class_path": "lightning_llama_fp8.TEFP8Precision"}]
    if args.fp8_param_gather is not None:
        if precision_from(trainer)[0] != "fp8":
            raise SystemExit("llama-fp8 plan: --fp8-param-gather applies to FP8 runs only (--precision fp8).")
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        for index, plugin in enumerate(plugins):
            if class_name(plugin) == "TEFP8Precision":
                if not isinstance(plugin, dict):  # a bare class path
                    plugin = plugins[index] = {"class_path": "lightning_llama_fp8.TEFP8Precision"}
                plugin.setdefault("init_args", {})["fp8_param_gather"] = args.fp8_param_gather
        trainer["plugins"] = plugins


def _apply_memory_overrides(strategy_args: dict[str, Any], args: argparse.Namespace) -> None:
    """``--recompute*``, ``--optimizer-offload-fraction`` and ``--optimizer-precision`` into the strategy's
    init_args."""
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
    if args.optimizer_precision == "off":
        strategy_args["optimizer_precision"] = None
    elif args.optimizer_precision == "auto":
        strategy_args["optimizer_precision"] = "auto"
    elif args.optimizer_precision is not None:
        given = strategy_args.get("optimizer_precision")
        strategy_args["optimizer_precision"] = {  # the config's other fields (store_param_remainders) stay
            **(given if isinstance(given, dict) else {}),
            "exp_avg_dtype": args.optimizer_precision,
            "exp_avg_sq_dtype": args.optimizer_precision,
        }
    if args.optimizer_offload_fraction == 0:
        strategy_args["optimizer_offload"] = None
    elif args.optimizer_offload_fraction is not None:
        offload = strategy_args.get("optimizer_offload")
        strategy_args["optimizer_offload"] = {
            **(offload if isinstance(offload, dict) else {}),
            "fraction": args.optimizer_offload_fraction,
        }
