"""A small real tokenizer (the tokenizers library's WordLevel model) for models with a small vocabulary; with
Llama 3's chat tokens and a chat template for chat tests."""

from __future__ import annotations

import json
from pathlib import Path

SMALL_BOS, SMALL_EOS = "<|begin_of_text|>", "<|end_of_text|>"
#: Llama 3's header and end-of-turn tokens, special tokens of the chat tokenizer.
SMALL_START_HEADER, SMALL_END_HEADER, SMALL_EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
#: Words of the chat tokenizer besides ``w0``...: the roles.
SMALL_ROLES = ("system", "user", "assistant")


def small_tokenizer_json(path: Path, words: int = 50) -> Path:
    """A ``tokenizer.json`` with ``<unk>`` (0), Llama 3's BOS (1) and EOS (2) and ``words`` words ``w0``..., ids below
    ``words + 3``; written to ``path``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, SMALL_BOS: 1, SMALL_EOS: 2} | {f"w{i}": i + 3 for i in range(words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([SMALL_BOS, SMALL_EOS])
    tokenizer.save(str(path))
    return path


def small_chat_tokenizer_json(path: Path, words: int = 50) -> Path:
    """:func:`small_tokenizer_json` plus the roles (ids ``words + 3``...) and Llama 3's ``<|start_header_id|>``,
    ``<|end_header_id|>`` and ``<|eot_id|>`` as special tokens (the last three ids, up to ``words + 8``)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    specials = (SMALL_START_HEADER, SMALL_END_HEADER, SMALL_EOT)
    vocab = {"<unk>": 0, SMALL_BOS: 1, SMALL_EOS: 2} | {f"w{i}": i + 3 for i in range(words)}
    vocab |= {role: words + 3 + i for i, role in enumerate(SMALL_ROLES)}
    vocab |= {token: words + 6 + i for i, token in enumerate(specials)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([SMALL_BOS, SMALL_EOS, *specials])
    tokenizer.save(str(path))
    return path


def small_chat_tokenizer_dir(
    directory: Path,
    words: int = 50,
    chat_template: str | None = None,
    generation_eos: int | list[int] | None = None,
) -> Path:
    """A Hugging Face tokenizer directory around :func:`small_chat_tokenizer_json`: ``tokenizer_config.json`` with
    BOS, EOS and ``chat_template`` (none: no template), and ``generation_config.json`` with ``generation_eos`` as its
    ``eos_token_id`` (none: no such file)."""
    directory.mkdir(parents=True, exist_ok=True)
    small_chat_tokenizer_json(directory / "tokenizer.json", words)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SMALL_BOS, "eos_token": SMALL_EOS}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if generation_eos is not None:
        generation = {"bos_token_id": 1, "eos_token_id": generation_eos, "temperature": 0.6, "top_p": 0.9}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory
