"""``llama-fp8 convert``: a training checkpoint -> a Hugging Face Llama directory."""

from __future__ import annotations

import argparse
import sys

from lightning_llama_fp8.checkpoint.info import CheckpointError
from lightning_llama_fp8.hf.config import HFConfigError
from lightning_llama_fp8.hf.export import export_to_hf
from lightning_llama_fp8.hf.files import DEFAULT_MAX_SHARD_BYTES
from lightning_llama_fp8.validate import float_argument, format_bytes

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
Write a training checkpoint (a distributed checkpoint directory that MegatronCPStrategy saved, any TP/CP/DP
layout) as a Hugging Face Llama directory that transformers.AutoModelForCausalLM.from_pretrained and vLLM load:
config.json, generation_config.json, BF16 safetensors shards with their index, and the tokenizer when given.
It streams one layer at a time (CPU only, no GPU needed). Checkpoints of runs with FP8 weights export BF16 from
the fp32 main weights when the optimizer state is 'fully_reshardable' (see --allow-fp8-weights).

The tokenizer keeps its chat template; one without a template that has Llama 3's chat tokens ('llama3', a base
model's directory) gets Llama 3's, as `llama-fp8 preprocess --chat` rendered its conversations. generation_config.json
stops at <|end_of_text|> and at the end-of-turn token <|eot_id|> where the tokenizer has it, so that
transformers' generate ends after the answer:
  tokenizer = AutoTokenizer.from_pretrained(OUT_DIR); model = AutoModelForCausalLM.from_pretrained(OUT_DIR)
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
  model.generate(**prompt, max_new_tokens=256)

Hugging Face weights go the other way without a conversion step: train with
  llama-fp8 fit --config CONFIG.yaml --model.init_weights HF_DIR
(or LlamaLightningModule(init_weights=HF_DIR)); every rank reads its own shard of the safetensors.
"""


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-fp8 convert", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint directory saved by MegatronCPStrategy (e.g. .../last.ckpt)")
    parser.add_argument("output", help="the Hugging Face directory to write (must not exist or be empty)")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer to include: 'llama3' (the bundled Llama 3 one), a tokenizer.json, or a tokenizer directory",
    )
    parser.add_argument(
        "--chat-template",
        help="replace the tokenizer's chat template, as `llama-fp8 preprocess --chat --chat-template` did: 'llama3' "
        "(Llama 3's), a Jinja file, or a tokenizer_config.json holding one (default: the tokenizer's own, else Llama "
        "3's where the tokenizer has its chat tokens)",
    )
    parser.add_argument(
        "--max-shard-size-gb",
        type=float_argument(above=0),
        default=DEFAULT_MAX_SHARD_BYTES / 1e9,
        help="largest safetensors shard, in GB (10^9 bytes), > 0 (default 5; a tensor larger than that gets a shard "
        "of its own)",
    )
    parser.add_argument(
        "--allow-fp8-weights",
        action="store_true",
        help="for an FP8-weight checkpoint with 'dp_reshardable' optimizer state: export the FP8 weight values "
        "(lossy) instead of refusing",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export at the output (config.json beside *.safetensors); any other non-empty "
        "directory, one holding a training checkpoint above all, is never replaced",
    )
    args = parser.parse_args(argv)
    try:
        report = export_to_hf(
            args.checkpoint,
            args.output,
            tokenizer=args.tokenizer,
            max_shard_bytes=int(args.max_shard_size_gb * 1e9),
            allow_fp8_weights=args.allow_fp8_weights,
            overwrite=args.overwrite,
            chat_template=args.chat_template,
        )
    except (CheckpointError, HFConfigError, OSError) as err:  # OSError: the output (taken, a link, disk full)
        print(f"llama-fp8 convert: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"Wrote {report.output}: {len(report.shards)} safetensors shard(s), {format_bytes(report.total_bytes)}")
    print(f"Weights: {report.weights_source}")
    tokenizer = ", ".join(report.tokenizer_files) if report.tokenizer_files else "none (pass --tokenizer)"
    print(f"Tokenizer: {tokenizer}")
    if report.tokenizer_files:
        print(
            f"Chat template: {report.chat_template or 'none (the tokenizer has neither a template nor Llama 3 tokens)'}"
        )
        print(f"Generation stops at token ids: {', '.join(map(str, report.stop_token_ids)) or 'none'}")
    print(f"Took {report.seconds:.1f} s")
    return 0
