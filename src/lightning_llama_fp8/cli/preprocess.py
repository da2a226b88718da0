"""``llama-fp8 preprocess``: text files to a Megatron corpus, or with ``--chat`` conversations to a fine-tuning
corpus with a loss mask (``lightning_llama_fp8.data.preprocess``).

Parses its arguments before importing the tokenizer and the writer, so that ``preprocess --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER
from lightning_llama_fp8.validate import int_argument, usable_cpus

#: Options of a text corpus that a chat corpus has no use for (their defaults are None, so that giving one is seen).
_TEXT_ONLY = {
    "json_key": "--json-key",
    "text_split": "--text-split",
    "eod_token": "--eod-token",
    "append_eod": "--append-eod/--no-append-eod",
    "add_special_tokens": "--add-special-tokens/--no-add-special-tokens",
    "parse_special_tokens": "--parse-special-tokens",
}
#: Options of a chat corpus only.
_CHAT_ONLY = {"max_seq_length": "--max-seq-length", "too_long": "--too-long", "chat_template": "--chat-template"}


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """``llama-fp8 preprocess``: text files to a Megatron corpus (exit status 2 on bad input, nothing written)."""
    parser = argparse.ArgumentParser(
        prog="llama-fp8 preprocess",
        description=(
            "Tokenize text into a Megatron corpus (<prefix>.bin + <prefix>.idx + <prefix>.corpus.json) for "
            "IndexedDataModule; the same bytes as Megatron-LM's tools/preprocess_data.py with --append-eod. With "
            "--chat: conversations (JSON Lines or Parquet records with 'messages' [{role, content}, ...], or "
            "'prompt' and 'response' with an optional 'system') rendered with the tokenizer's chat template into a "
            "fine-tuning corpus, one conversation per document, with <prefix>.loss_mask.bin (1 = an answer token)."
        ),
    )
    parser.add_argument("--input", nargs="+", required=True, help="files or globs: .jsonl/.parquet/.txt, or .gz")
    parser.add_argument("--output-prefix", required=True, help="corpus prefix, e.g. data/wiki_text_document")
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="'llama3' (bundled Llama 3 tokenizer, the default), a tokenizer.json, or a Hugging Face tokenizer dir",
    )
    parser.add_argument("--json-key", help="text field of JSON Lines / column of Parquet (default: text)")
    parser.add_argument("--input-format", choices=("jsonl", "parquet", "text"), help="default: from the file name")
    parser.add_argument(
        "--text-split", choices=("file", "paragraph", "line"), help="plain text: one document per (default: file)"
    )
    parser.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's eos_token)")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        help="append the end-of-document token to every document (default: yes, as Megatron-LM's --append-eod)",
    )
    parser.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        help="let the tokenizer add its special tokens, e.g. Llama 3's <|begin_of_text|> (default: yes)",
    )
    parser.add_argument(
        "--parse-special-tokens",
        action="store_const",
        const=True,
        help="read special-token strings in the text (<|eot_id|>, <|image|>) as those tokens, as Megatron-LM does "
        "(default: encode them as text; recorded in <prefix>.corpus.json)",
    )
    chat = parser.add_argument_group("conversations (--chat)")
    chat.add_argument(
        "--chat",
        action="store_true",
        help="the input is conversations: write a fine-tuning corpus with a loss mask (the text options above do "
        "not apply; special-token strings in messages are encoded as text)",
    )
    chat.add_argument(
        "--max-seq-length",
        type=int_argument(at_least=1),
        help="with --chat, required: the most tokens a conversation may have, the training sequence length (e.g. 8192)",
    )
    chat.add_argument(
        "--too-long",
        choices=("drop", "truncate"),
        help="a conversation longer than --max-seq-length is left out (drop, the default) or cut to its first "
        "tokens (truncate); counted in the summary either way",
    )
    chat.add_argument(
        "--chat-template",
        help="'llama3' (Llama 3's template), or a .jinja file / tokenizer_config.json (default: the tokenizer's own "
        "chat_template.jinja or tokenizer_config.json chat_template, else Llama 3's)",
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
    if args.chat:
        given = [flag for name, flag in _TEXT_ONLY.items() if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: for text corpora only, not used with --chat; leave it out")
        if args.max_seq_length is None:
            parser.error(
                "--chat needs --max-seq-length N: the training sequence length (e.g. 8192 for Llama 3 8B); longer "
                "conversations are dropped or truncated (--too-long)"
            )
        if args.input_format == "text":
            parser.error("--chat reads JSON Lines or Parquet, not --input-format text")
    else:
        given = [flag for name, flag in _CHAT_ONLY.items() if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: for --chat only; add --chat to read conversations")
    from lightning_llama_fp8.data.corpus import CorpusInputError
    from lightning_llama_fp8.data.preprocess import PreprocessSummary, preprocess, preprocess_chat

    summary: PreprocessSummary
    try:
        if args.chat:
            summary = preprocess_chat(
                args.input,
                args.output_prefix,
                args.tokenizer,
                max_seq_length=args.max_seq_length,
                too_long=args.too_long or "drop",
                chat_template=args.chat_template,
                input_format=args.input_format,
                workers=args.workers,
                skip_bad_lines=args.skip_bad_lines,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        else:
            summary = preprocess(
                args.input,
                args.output_prefix,
                args.tokenizer,
                json_key=args.json_key or "text",
                input_format=args.input_format,
                text_split=args.text_split or "file",
                eod_token=args.eod_token,
                append_eod=args.append_eod is not False,
                add_special_tokens=args.add_special_tokens is not False,
                parse_special_tokens=bool(args.parse_special_tokens),
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
