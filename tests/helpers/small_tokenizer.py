"""A small real tokenizer (the tokenizers library's WordLevel model) for models with a small vocabulary."""

from __future__ import annotations

from pathlib import Path

SMALL_BOS, SMALL_EOS = "<|begin_of_text|>", "<|end_of_text|>"


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
