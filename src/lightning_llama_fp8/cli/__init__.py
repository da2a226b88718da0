"""The ``llama-fp8`` command line: ``fit``, ``validate``, ``plan``, ``preprocess`` and ``convert``.

Each subcommand lives in its own module and is imported only when it runs: ``plan`` and ``preprocess`` need neither
torch nor Lightning nor megatron-core, and ``--help`` of the command itself needs nothing at all.
"""

from __future__ import annotations

import sys

USAGE = """\
usage: llama-fp8 {fit,validate,plan,preprocess,convert} [--help] ...

Train Megatron-Core Llama 3 with Transformer Engine FP8 through Lightning.

commands:
  fit         train: llama-fp8 fit --config CONFIG.yaml [--trainer.max_steps N ...] (LightningCLI; fit --help)
  validate    validate a checkpoint: llama-fp8 validate --config CONFIG.yaml --ckpt_path CKPT
  plan        layout check, parameters, memory per GPU and FLOPs of a config, on any machine:
              llama-fp8 plan --config CONFIG.yaml [--gpus N] (plan --help)
  preprocess  text (JSON Lines, Parquet, plain text) as an indexed corpus for IndexedDataModule:
              llama-fp8 preprocess --input FILE... --output-prefix PREFIX (preprocess --help)
  convert     a training checkpoint as Hugging Face weights: llama-fp8 convert CHECKPOINT HF_DIR (convert --help)
"""

#: The LightningCLI subcommands (``cli/fit.py``).
LIGHTNING_COMMANDS = ("fit", "validate")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama-fp8``; ``argv`` defaults to the command line."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = words[0] if words else None
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command == "plan":
        from lightning_llama_fp8.cli.plan import plan_main

        return plan_main(words[1:])
    if command == "preprocess":
        from lightning_llama_fp8.cli.preprocess import preprocess_main

        return preprocess_main(words[1:])
    if command == "convert":
        from lightning_llama_fp8.cli.convert import convert_main

        return convert_main(words[1:])
    if command not in LIGHTNING_COMMANDS:
        print(USAGE, file=sys.stderr)
        print(
            f"llama-fp8: unknown command {command!r}" if command else "llama-fp8: a command is needed", file=sys.stderr
        )
        return 2
    from lightning_llama_fp8.cli.config_file import (
        EXIT_CANNOT_TRAIN,
        config_paths,
        expand_arch_before_field_overrides,
        read_config_file,
    )

    try:
        for path in config_paths(words):  # a broken file gets one sentence, not LightningCLI's whole usage
            read_config_file(path)
        expanded = expand_arch_before_field_overrides(words)
    except ValueError as err:
        print(f"llama-fp8 {command}: {err}", file=sys.stderr)
        return EXIT_CANNOT_TRAIN
    if expanded != words:
        if argv is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = expanded
        else:
            argv = expanded
    from lightning_llama_fp8.cli.fit import run

    return run(argv)
