"""``llama-fp8 preprocess``: text files to a Megatron corpus (``lightning_llama_fp8.data.preprocess``).

Parses its arguments before importing the tokenizer and the writer, so that ``preprocess --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER
from lightning_llama_fp8.validate import int_argument, usable_cpus


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """``llama-fp8 preprocess``: text files to a Megatron corpus (exit status 2 on bad input, nothing written)."""
    parser = argparse.ArgumentParser(
        prog="llama-fp8 preprocess",
        description=(
            "Tokenize text into a Megatron corpus (<prefix>.bin + <prefix>.idx + <prefix>.corpus.json) for "
            "IndexedDataModule; the same bytes as Megatron-LM's tools/preprocess_data.py with --append-eod."
        ),
    )
    parser.add_argument("--input", nargs="+", required=True, help="files or globs: .jsonl/.parquet/.txt, or .gz")
    parser.add_argument("--output-prefix", required=True, help="corpus prefix, e.g. data/wiki_text_document")
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="'llama3' (bundled Llama 3 tokenizer, the default), a tokenizer.json, or a Hugging Face tokenizer dir",
    )
    parser.add_argument("--json-key", default="text", help="text field of JSON Lines / column of Parquet (text)")
    parser.add_argument("--input-format", choices=("jsonl", "parquet", "text"), help="default: from the file name")
    parser.add_argument(
        "--text-split", choices=("file", "paragraph", "line"), default="file", help="plain text: one document per"
    )
    parser.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's eos_token)")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the end-of-document token to every document (default: yes, as Megatron-LM's --append-eod)",
    )
    parser.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the tokenizer add its special tokens, e.g. Llama 3's <|begin_of_text|> (default: yes)",
    )
    parser.add_argument(
        "--parse-special-tokens",
        action="store_true",
        help="read special-token strings in the text (<|eot_id|>, <|image|>) as those tokens, as Megatron-LM does "
        "(default: encode them as text; recorded in <prefix>.corpus.json)",
    )
    parser.add_argument(
        "--workers",
        type=int_argument(at_least=1),
        default=min(8, usable_cpus()),
        help="tokenizer threads, at most the CPUs this process may use (default: those CPUs, at most 8)",
    )
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) invalid records")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus of that prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from lightning_llama_fp8.data.corpus import CorpusInputError
    from lightning_llama_fp8.data.preprocess import preprocess

    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_key=args.json_key,
            input_format=args.input_format,
            text_split=args.text_split,
            eod_token=args.eod_token,
            append_eod=args.append_eod,
            add_special_tokens=args.add_special_tokens,
            parse_special_tokens=args.parse_special_tokens,
            workers=args.workers,  # preprocess cuts it to the CPUs this process may use, with a note
            skip_bad_lines=args.skip_bad_lines,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (CorpusInputError, FileNotFoundError, ValueError) as err:
        print(f"llama-fp8 preprocess: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llama-fp8 preprocess: interrupted; no corpus was written.", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0
