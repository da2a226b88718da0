"""Conversations to token ids and a loss mask, rendered with a chat template the way ``transformers`` renders it.

The template is the tokenizer's own (``chat_template.jinja`` beside its ``tokenizer.json``, else the
``chat_template`` of ``tokenizer_config.json``, as ``transformers`` 5 looks them up), or, for a tokenizer without one
(the bundled ``llama3``, a base model's directory), Llama 3's (``data/chat_template.py``). It is rendered as
``apply_chat_template`` renders it: Jinja's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text and ``<>&'`` as they
are, the ``{% generation %}`` block, the configuration's special tokens (``bos_token``, ``eos_token``, ...) as
variables, ``add_generation_prompt`` false for training data.

Token ids: those of ``apply_chat_template(messages, tokenize=True)`` for the same conversation, with one difference
on purpose: special-token strings inside a message's text (``<|eot_id|>``, ``<|start_header_id|>``) are encoded as
the characters they are, never as the control tokens they name. ``transformers`` tokenizes the rendered string as a
whole, so a user message holding ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>`` would end the turn and
forge an answer. Here only the template's own markup becomes control tokens.

How the text and the markup are told apart: the conversation is rendered once with each message's text replaced by
a placeholder, which leaves the template's markup between the placeholders, and once as it is; the texts as the
template writes them (Llama 3's template strips surrounding whitespace) lie between the markup. When neither the
texts as given nor all of them stripped fill those gaps exactly, each text is found by a render of its own with the
others as placeholders. A template whose markup depends on the texts themselves, or that writes a text twice, cannot
be split so, and the conversation is refused with a message that says why.

The loss mask: 1 for every token that overlaps an assistant message's text, and for the markup after it up to and
including its first control token (Llama 3: ``<|eot_id|>``; ChatML: ``<|im_end|>``), which a model must learn to
emit to end its answer; 0 for system and user messages, headers and the BOS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lightning_llama_fp8.data.chat_template import LLAMA3_CHAT_TEMPLATE, LLAMA3_CHAT_TOKENS
from lightning_llama_fp8.data.corpus import CorpusInputError
from lightning_llama_fp8.data.tokenizer import TokenizerSpec

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ChatEncoding",
    "ChatLayout",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatTokenizer",
    "ConversationError",
    "RenderedChat",
]

#: The name that selects Llama 3's template (``--chat-template llama3``).
BUILTIN_CHAT_TEMPLATE = "llama3"
BUILTIN_SOURCE = "built-in Llama 3 template (lightning_llama_fp8.data.chat_template)"
#: Where ``transformers`` 5 saves a tokenizer's template, taking it before ``tokenizer_config.json``'s.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: The special tokens of ``tokenizer_config.json`` that ``transformers`` hands a template as variables.
TEMPLATE_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LLAMA3_BOS = "<|begin_of_text|>"
# A message's text while the markup is found: private-use characters that no template writes and trim keeps.
_PLACEHOLDER = "\ue000{}\ue001"


class ChatTemplateError(CorpusInputError):
    """The chat template cannot be found, read or compiled, or does not fit the tokenizer; the message says the fix."""


class ConversationError(ValueError):
    """One conversation cannot be rendered: the template refused it, or its markup cannot be told from the text."""


# ---------------------------------------------------------------------------------------------------- rendering
class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``, with which some templates mark assistant text for
    ``transformers``' ``return_assistant_tokens_mask``: rendered as its body (the mask here comes from the message
    boundaries, for every template)."""

    tags = {"generation"}  # Jinja's Extension API reads this class attribute

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates (and transformers) want the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compiled(text: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(text)


@dataclass(frozen=True)
class ChatLayout:
    """A rendered conversation as the template's markup around the messages' texts:
    ``markups[0] + contents[0] + markups[1] + ... + contents[-1] + markups[-1]``.

    Attributes:
        markups: the template's text before, between and after the messages' texts (one more than ``contents``).
        contents: each rendered message's text as the template wrote it (Llama 3's: stripped), in rendered order.
        messages: the index in the conversation of each of ``contents`` (a message the template leaves out has none).
        roles: the role of each of ``contents``.
    """

    markups: tuple[str, ...]
    contents: tuple[str, ...]
    messages: tuple[int, ...]
    roles: tuple[str, ...]

    @property
    def text(self) -> str:
        return _interleave(self.markups, self.contents)


def _interleave(markups: Sequence[str], contents: Sequence[str]) -> str:
    parts = [markups[0]]
    for content, markup in zip(contents, markups[1:], strict=True):
        parts += [content, markup]
    return "".join(parts)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template (Jinja text) with the variables ``transformers`` would give it.

    Attributes:
        text: the Jinja template.
        source: where it came from (a file, or :data:`BUILTIN_SOURCE`).
        variables: ``bos_token``, ``eos_token``, ... of the tokenizer's configuration.
    """

    text: str
    source: str
    variables: Mapping[str, str] = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN_SOURCE

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def identity(self) -> dict[str, str]:
        """What a corpus's sidecar records: where the template came from, its SHA-256 and its text (which an export
        writes beside the model, so that it is prompted as it was trained)."""
        return {"source": self.source, "sha256": self.sha256, "template": self.text}

    @classmethod
    def for_tokenizer(cls, spec: TokenizerSpec, chat_template: str | Path | None = None) -> ChatTemplate:
        """The template to render conversations for the tokenizer ``spec`` with.

        Args:
            spec: the tokenizer; its ``tokenizer_config.json`` gives the variables (and the template).
            chat_template: ``None``: the tokenizer's own (``chat_template.jinja`` beside its ``tokenizer.json``,
                else ``tokenizer_config.json``'s ``chat_template``), else Llama 3's; ``"llama3"``: Llama 3's; else a
                file: Jinja text, or a ``tokenizer_config.json`` whose ``chat_template`` to take.

        Raises:
            ChatTemplateError: the file is missing, unreadable, not a template, or does not compile.
        """
        directory = spec.path.parent
        config = _read_config(directory / TOKENIZER_CONFIG)
        variables = {name: token for name in TEMPLATE_TOKEN_VARIABLES if (token := _token_text(config.get(name)))}
        if chat_template is None:
            if (directory / CHAT_TEMPLATE_FILE).is_file():
                text, source = _read_template_file(directory / CHAT_TEMPLATE_FILE), str(directory / CHAT_TEMPLATE_FILE)
            elif config.get("chat_template") is not None:
                text, source = _config_template(config, directory / TOKENIZER_CONFIG), str(directory / TOKENIZER_CONFIG)
            else:
                text, source = LLAMA3_CHAT_TEMPLATE, BUILTIN_SOURCE
        elif str(chat_template) == BUILTIN_CHAT_TEMPLATE:
            text, source = LLAMA3_CHAT_TEMPLATE, BUILTIN_SOURCE
        else:
            path = Path(chat_template).expanduser()
            if not path.is_file():
                raise ChatTemplateError(
                    f"Chat template {str(chat_template)!r} not found: give 'llama3' (Llama 3's), a Jinja file or a "
                    "tokenizer_config.json that holds one."
                )
            json_config = path.suffix == ".json"
            text = _config_template(_read_config(path), path) if json_config else _read_template_file(path)
            source = str(path.resolve())
        if source == BUILTIN_SOURCE:
            variables.setdefault("bos_token", LLAMA3_BOS)
        try:
            _compiled(text)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(
                f"The chat template of {source} is not valid Jinja (line {err.lineno}: {err.message}); fix it or "
                "choose another with --chat-template."
            ) from err
        return cls(text, source, variables)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text ``apply_chat_template(messages, tokenize=False)`` gives.

        Raises:
            ConversationError: the template refused the conversation (``raise_exception``) or failed on it.
        """
        try:
            return _compiled(self.text).render(
                messages=[dict(message) for message in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.variables,
            )
        except jinja2.TemplateError as err:
            raise ConversationError(f"the chat template refuses it: {err}") from err
        except Exception as err:  # a template is a program: any error of its own is this conversation's problem
            raise ConversationError(f"the chat template fails on it ({type(err).__name__}: {err})") from err

    def layout(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> ChatLayout:
        """The rendered conversation split into the template's markup and the messages' texts (module docstring).

        Raises:
            ConversationError: the template refuses the conversation, writes a message's text more than once, or
                writes markup that depends on the texts.
        """
        marks = [_PLACEHOLDER.format(i) for i in range(len(messages))]
        marked = [{**message, "content": mark} for message, mark in zip(messages, marks, strict=True)]
        skeleton = self.render(marked, add_generation_prompt)
        found = []
        for index, mark in enumerate(marks):
            count = skeleton.count(mark)
            if count > 1:
                raise ConversationError(
                    f"the chat template writes the text of message {index + 1} {count} times, so its tokens cannot "
                    "be told apart from the template's; use a template that writes each message once"
                )
            if count == 1:
                found.append((skeleton.index(mark), index))
        found.sort()
        order = [index for _, index in found]
        markups, position = [], 0
        for start, index in found:
            markups.append(skeleton[position:start])
            position = start + len(marks[index])
        markups.append(skeleton[position:])
        rendered = self.render(messages, add_generation_prompt)
        texts = [str(messages[index]["content"]) for index in order]
        for contents in (texts, [text.strip() for text in texts]):
            # Exact whenever the template writes each text as given or each one stripped: the markup is fixed, and
            # stripping only shortens, so no other split fills the same gaps.
            if _interleave(markups, contents) == rendered:
                break
        else:
            contents = [self._content_alone(messages, marked, markups, order, k) for k in range(len(order))]
            if _interleave(markups, contents) != rendered:
                raise ConversationError(
                    "the chat template writes markup that depends on the messages' text, so the text's tokens cannot "
                    f"be told apart from the template's ({self.source}); use a template whose markup does not"
                )
        roles = tuple(str(messages[index]["role"]) for index in order)
        return ChatLayout(tuple(markups), tuple(contents), tuple(order), roles)

    def _content_alone(
        self,
        messages: Sequence[Mapping[str, Any]],
        marked: list[dict[str, Any]],
        markups: list[str],
        order: list[int],
        k: int,
    ) -> str:
        """The text of the ``k``-th rendered message as the template writes it, from a render in which every other
        message is a placeholder."""
        index = order[k]
        alone = self.render([*marked[:index], dict(messages[index]), *marked[index + 1 :]])
        marks = [marked[i]["content"] for i in order]
        before = _interleave(markups[: k + 1], marks[:k])
        after = _interleave(markups[k + 1 :], marks[k + 1 :])
        if not (alone.startswith(before) and alone.endswith(after) and len(alone) >= len(before) + len(after)):
            raise ConversationError(
                "the chat template writes markup that depends on the messages' text, so the text's tokens cannot be "
                f"told apart from the template's ({self.source}); use a template whose markup does not"
            )
        return alone[len(before) : len(alone) - len(after)]


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ChatTemplateError(f"{path} cannot be read as JSON ({err}); fix it.") from err
    return config if isinstance(config, dict) else {}


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # older configs store an AddedToken as a dict
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatTemplateError(f"Chat template {path} cannot be read ({err}).") from err


def _config_template(config: Mapping[str, Any], path: Path) -> str:
    """The ``chat_template`` of a tokenizer configuration: a string, or named templates of which ``default``."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: transformers' default is "default"
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
        if template is None:
            raise ChatTemplateError(
                f"{path} has chat templates named {', '.join(map(repr, named))} and none named 'default'; save the "
                "one to train with as a .jinja file and pass it with --chat-template."
            )
    if not isinstance(template, str):
        raise ChatTemplateError(f"{path} has no chat_template text; pass one with --chat-template.")
    return template


# ---------------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered for tokenizing (:meth:`ChatTokenizer.render`).

    Attributes:
        text: the rendered conversation.
        markup_tokens: ``(start, end, id)`` of each control token the template's markup writes.
        answer_spans: ``(start, end)`` character ranges whose tokens are learned (an answer and what closes it).
        text_has_control_strings: whether the text holds control-token strings outside the markup (then it is
            tokenized piece by piece between the markup's control tokens, the pieces as plain text).
    """

    text: str
    markup_tokens: tuple[tuple[int, int, int], ...]
    answer_spans: tuple[tuple[int, int], ...]
    text_has_control_strings: bool


@dataclass(frozen=True)
class ChatEncoding:
    """A tokenized conversation.

    Attributes:
        ids: token ids (int64).
        loss_mask: uint8, one per token: 1 = a token the model learns to predict (module docstring).
    """

    ids: numpy.ndarray
    loss_mask: numpy.ndarray

    @property
    def answer_tokens(self) -> int:
        return int(self.loss_mask.sum())


class ChatTokenizer:
    """Renders conversations with a chat template and tokenizes them with their loss mask.

    ``encode(messages)`` for one conversation; ``render`` (Python: Jinja) and ``tokenize`` (a batch, in Rust, without
    the GIL) separately for many. ``encode(messages, add_generation_prompt=True)`` gives the ids of a prompt as
    ``apply_chat_template(messages, add_generation_prompt=True)`` does, to generate an answer from.

    Args:
        spec: the tokenizer.
        template: the chat template; ``None``: :meth:`ChatTemplate.for_tokenizer`.

    Raises:
        ChatTemplateError: Llama 3's template with a tokenizer that lacks Llama 3's chat tokens.
    """

    def __init__(self, spec: TokenizerSpec, template: ChatTemplate | None = None) -> None:
        self.spec = spec
        self.template = template if template is not None else ChatTemplate.for_tokenizer(spec)
        self._parsing = spec.load(parse_special_tokens=True)  # the rendered text as transformers tokenizes it
        #: The tokenizer, special-token strings encoded as text (pieces between the markup's control tokens); what to
        #: decode ids with.
        self.tokenizer = spec.load(parse_special_tokens=False)
        decoder = self.tokenizer.get_added_tokens_decoder()
        self._control_ids = {token.content: token_id for token_id, token in decoder.items() if token.special}
        self._control_pattern = _longest_match_pattern(self._control_ids) if self._control_ids else None
        if self.template.builtin:
            needed = (self.template.variables.get("bos_token", LLAMA3_BOS), *LLAMA3_CHAT_TOKENS)
            missing = [token for token in needed if token not in self._control_ids]
            if missing:
                raise ChatTemplateError(
                    f"The tokenizer {spec.path} has no chat template (no {CHAT_TEMPLATE_FILE}, no chat_template in "
                    f"{TOKENIZER_CONFIG}) and lacks Llama 3's control tokens {', '.join(missing)}, so Llama 3's "
                    "template cannot be used: pass the model's template with --chat-template FILE."
                )

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> RenderedChat:
        """Render one conversation and find its control tokens and answers (Python; no tokenizing yet).

        Raises:
            ConversationError: as :meth:`ChatTemplate.layout`.
        """
        layout = self.template.layout(messages, add_generation_prompt)
        markup_tokens: list[tuple[int, int, int]] = []
        answers: list[tuple[int, int]] = []
        position = 0
        for k, markup in enumerate(layout.markups):
            controls = self._controls(markup)
            markup_tokens += [(position + start, position + end, token_id) for start, end, token_id in controls]
            if k > 0 and layout.roles[k - 1] == "assistant" and controls:
                # The answer goes on through the first control token after it: the end of turn the model must emit.
                answers[-1] = (answers[-1][0], position + controls[0][1])
            position += len(markup)
            if k < len(layout.contents):
                if layout.roles[k] == "assistant":
                    answers.append((position, position + len(layout.contents[k])))
                position += len(layout.contents[k])
        text = layout.text
        everywhere = [(start, end) for start, end, _ in self._controls(text)]
        in_markup = [(start, end) for start, end, _ in markup_tokens]
        return RenderedChat(text, tuple(markup_tokens), tuple(answers), everywhere != in_markup)

    def _controls(self, text: str) -> list[tuple[int, int, int]]:
        if self._control_pattern is None:
            return []
        return [(m.start(), m.end(), self._control_ids[m.group()]) for m in self._control_pattern.finditer(text)]

    def tokenize(self, batch: Sequence[RenderedChat]) -> list[ChatEncoding]:
        """Token ids and loss masks of rendered conversations (one ``tokenizers`` batch call per kind of text)."""
        plain = [i for i, chat in enumerate(batch) if not chat.text_has_control_strings]
        # Without control-token strings in the messages, the rendered text tokenized whole is exactly what
        # transformers' apply_chat_template gives (it splits at the control tokens, as the pieces below do).
        whole = self._parsing.encode_batch([batch[i].text for i in plain], add_special_tokens=False)
        results: list[ChatEncoding | None] = [None] * len(batch)
        for i, encoding in zip(plain, whole, strict=True):
            starts, ends = _offset_arrays(encoding.offsets)
            results[i] = _encoding(numpy.asarray(encoding.ids, dtype=numpy.int64), starts, ends, batch[i].answer_spans)
        guarded = [i for i, chat in enumerate(batch) if chat.text_has_control_strings]
        pieces: list[str] = []
        layouts: list[list[tuple[int, int, int | None]]] = []  # per chat: (start, end, control id or None: a piece)
        for i in guarded:
            segments: list[tuple[int, int, int | None]] = []
            position = 0
            for start, end, token_id in [*batch[i].markup_tokens, (len(batch[i].text), len(batch[i].text), None)]:
                if start > position:
                    segments.append((position, start, None))
                    pieces.append(batch[i].text[position:start])
                if token_id is not None:
                    segments.append((start, end, token_id))
                position = end
            layouts.append(segments)
        encoded = iter(self.tokenizer.encode_batch(pieces, add_special_tokens=False))
        for i, segments in zip(guarded, layouts, strict=True):
            ids: list[int] = []
            starts: list[int] = []
            ends: list[int] = []
            for start, end, token_id in segments:
                if token_id is not None:
                    ids.append(token_id)
                    starts.append(start)
                    ends.append(end)
                    continue
                piece = next(encoded)
                ids += piece.ids
                starts += [start + offset[0] for offset in piece.offsets]
                ends += [start + offset[1] for offset in piece.offsets]
            results[i] = _encoding(
                numpy.asarray(ids, dtype=numpy.int64),
                numpy.asarray(starts, dtype=numpy.int64),
                numpy.asarray(ends, dtype=numpy.int64),
                batch[i].answer_spans,
            )
        return [result for result in results if result is not None]

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> ChatEncoding:
        """One conversation's token ids and loss mask (with ``add_generation_prompt``: a prompt to answer)."""
        return self.tokenize([self.render(messages, add_generation_prompt)])[0]


def _longest_match_pattern(strings: Iterable[str]) -> re.Pattern[str]:
    """A regex matching any of ``strings``, the longest where several start at one place (as ``tokenizers`` matches
    added tokens), shaped as a trie: Llama 3's 256 control tokens all start with ``<|``, and a flat alternation would
    try each one at every ``<``."""
    trie: dict[str, Any] = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}  # a string ends here

    def branch(node: dict[str, Any]) -> str:
        # Longer first: every continuation is tried before the string that ends at this node.
        options = [re.escape(char) + branch(child) for char, child in sorted(node.items()) if char]
        if "" in node:
            options.append("")
        return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"

    return re.compile(branch(trie))


def _offset_arrays(offsets: Sequence[tuple[int, int]]) -> tuple[numpy.ndarray, numpy.ndarray]:
    array = numpy.asarray(offsets, dtype=numpy.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _encoding(
    ids: numpy.ndarray, starts: numpy.ndarray, ends: numpy.ndarray, answers: Sequence[tuple[int, int]]
) -> ChatEncoding:
    """The mask: a token is learned if its characters overlap an answer span (a token of no characters: if it lies
    inside one)."""
    learned = numpy.zeros(len(ids), dtype=bool)
    empty = starts == ends
    for start, end in answers:
        learned |= (starts < end) & (ends > start)
        learned |= empty & (starts >= start) & (starts < end)
    return ChatEncoding(ids, learned.astype(numpy.uint8))
