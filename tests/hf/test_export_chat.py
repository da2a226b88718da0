"""The exported tokenizer chats (hf/export.py): its chat template, or Llama 3's for a tokenizer without one, renders in
transformers as the training data was rendered; generation_config.json stops at the end-of-turn token; ids past the
model's vocabulary are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.data.chat_template import LLAMA3_CHAT_TEMPLATE
from lightning_llama_fp8.data.tokenizer import DEFAULT_TOKENIZER, resolve_tokenizer
from lightning_llama_fp8.hf import HFConfigError, export_to_hf
from lightning_llama_fp8.hf.export import (
    TEMPLATE_GIVEN,
    TEMPLATE_LLAMA3,
    TEMPLATE_OWN,
    _copy_tokenizer,
    _given_chat_template,
    _special_tokens,
    _tokenizer_files,
    _tokenizer_path,
    _write_generation_config,
)
from tests.helpers.small_tokenizer import (
    small_chat_tokenizer_dir,
    small_chat_tokenizer_json,
    small_tokenizer_json,
)

transformers = pytest.importorskip("transformers")

#: A conversation in the small chat tokenizer's words: system prompt, two user turns, two answers.
MESSAGES = [
    {"role": "system", "content": "w1 w2"},
    {"role": "user", "content": "w3"},
    {"role": "assistant", "content": "w4 w5"},
    {"role": "user", "content": "w6"},
    {"role": "assistant", "content": "w7"},
]
# The small chat tokenizer's ids (words=50): BOS 1, EOS 2, w<i> i+3, roles 53..55, headers 56/57, <|eot_id|> 58.
BOS, EOS, SYSTEM, USER, ASSISTANT, START, END, EOT = 1, 2, 53, 54, 55, 56, 57, 58
#: MESSAGES in Llama 3's format, written out by hand: BOS, then per message header, role, header end, text, end of turn.
MESSAGES_LLAMA3_IDS = [BOS, START, SYSTEM, END, 4, 5, EOT, START, USER, END, 6, EOT, START, ASSISTANT, END, 7, 8, EOT]
MESSAGES_LLAMA3_IDS += [START, USER, END, 9, EOT, START, ASSISTANT, END, 10, EOT]
#: A template of the tokenizer's own, unlike Llama 3's: no BOS, no header tokens around the role.
OWN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + '<|eot_id|>' }}{% endfor %}"
MESSAGES_OWN_IDS = [SYSTEM, 4, 5, EOT, USER, 6, EOT, ASSISTANT, 7, 8, EOT, USER, 9, EOT, ASSISTANT, 10, EOT]


def _chat_ids(directory: Path, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """``apply_chat_template`` token ids in transformers (a list, whatever the version returns)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _rendered_for_training(
    tokenizer: Path | str, messages: list[dict[str, str]], chat_template: str | None = None, **kwargs: Any
) -> list[int]:
    """The token ids ``llama-fp8 preprocess --chat [--chat-template T]`` writes for ``messages`` (data/chat.py)."""
    from lightning_llama_fp8.data.chat import ChatTemplate, ChatTokenizer
    from lightning_llama_fp8.data.tokenizer import resolve_tokenizer

    spec = resolve_tokenizer(tokenizer)
    template = ChatTemplate.for_tokenizer(spec, chat_template) if chat_template is not None else None
    return ChatTokenizer(spec, template).encode(messages, **kwargs).ids.tolist()


def _export_tokenizer(source: Path | str, out: Path, chat_template: str | None = None) -> Any:
    """The export's tokenizer part alone (what export_to_hf runs after the weights), into ``out``."""
    files = _tokenizer_files(_tokenizer_path(source))
    given = _given_chat_template(source, chat_template) if chat_template is not None else None
    special = _special_tokens(files, given)
    out.mkdir()
    _copy_tokenizer(files, out, special)
    _write_generation_config(files, out, special)
    return special


def test_a_bare_llama3_tokenizer_gets_llama3s_template_and_stops_at_end_of_turn(tmp_path: Path) -> None:
    """``--tokenizer llama3``: the written tokenizer_config.json renders Llama 3's format in transformers, and
    generation stops at <|end_of_text|> and <|eot_id|>. (A Llama 3 vocabulary model is too large for a CPU test, so the
    tokenizer part of the export runs alone.)"""
    from tokenizers import Tokenizer

    source = resolve_tokenizer(DEFAULT_TOKENIZER).path
    special = _export_tokenizer("llama3", tmp_path / "out")
    assert special.chat_template == TEMPLATE_LLAMA3 and special.stop_ids == (128001, 128009)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == LLAMA3_CHAT_TEMPLATE and config["clean_up_tokenization_spaces"] is False
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}

    messages = [
        {"role": "system", "content": "Answer with the result only."},
        {"role": "user", "content": "Sort these numbers: 31, 4, 159"},
        {"role": "assistant", "content": "  4, 31, 159\n"},  # Llama 3's template trims the text
    ]
    text = Tokenizer.from_file(str(source))
    text.encode_special_tokens = True

    def encode(piece: str) -> list[int]:
        return text.encode(piece, add_special_tokens=False).ids

    expected = [128000]
    for message in messages:
        expected += [128006, *encode(message["role"]), 128007, *encode("\n\n" + message["content"].strip()), 128009]
    assert _chat_ids(tmp_path / "out", messages) == expected == _rendered_for_training("llama3", messages)
    prompt = expected[: -len(encode("\n\n4, 31, 159")) - 1] + encode("\n\n")  # up to the assistant's header
    assert _chat_ids(tmp_path / "out", messages[:2], add_generation_prompt=True) == prompt
    assert _rendered_for_training("llama3", messages[:2], add_generation_prompt=True) == prompt
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    answer = [*encode("4, 31, 159"), 128009]
    assert tokenizer.decode(answer, skip_special_tokens=True) == "4, 31, 159"  # the answer comes back exactly


def test_a_tokenizer_directorys_own_template_and_generation_config_are_kept(tmp_path: Path) -> None:
    """The directory's tokenizer_config.json is copied as it is; its generation_config.json keeps its settings and
    gains <|eot_id|> (a base model's config stops at <|end_of_text|> only)."""
    source = small_chat_tokenizer_dir(tmp_path / "source", chat_template=OWN_TEMPLATE, generation_eos=EOS)
    special = _export_tokenizer(source, tmp_path / "out")
    assert special.chat_template == TEMPLATE_OWN
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
    assert _chat_ids(out, MESSAGES) == MESSAGES_OWN_IDS == _rendered_for_training(source, MESSAGES)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [EOS, EOT], "temperature": 0.6, "top_p": 0.9}


def test_a_generation_config_that_stops_at_end_of_turn_already_is_copied_byte_for_byte(tmp_path: Path) -> None:
    source = small_chat_tokenizer_dir(tmp_path / "source", chat_template=OWN_TEMPLATE, generation_eos=[EOT, EOS])
    special = _export_tokenizer(source, tmp_path / "out")
    assert special.stop_ids == (EOT, EOS)
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (
        source / "generation_config.json"
    ).read_bytes()


def test_a_template_saved_as_chat_template_jinja_is_carried(tmp_path: Path) -> None:
    """transformers 5 saves a tokenizer's template in chat_template.jinja, not in tokenizer_config.json."""
    small_chat_tokenizer_dir(tmp_path / "source", chat_template=OWN_TEMPLATE)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "source").save_pretrained(tmp_path / "saved")
    if not (tmp_path / "saved" / "chat_template.jinja").is_file():
        pytest.skip("this transformers keeps the template in tokenizer_config.json")
    special = _export_tokenizer(tmp_path / "saved", tmp_path / "out")
    assert special.chat_template == TEMPLATE_OWN and (tmp_path / "out" / "chat_template.jinja").is_file()
    assert (
        _chat_ids(tmp_path / "out", MESSAGES)
        == MESSAGES_OWN_IDS
        == _rendered_for_training(tmp_path / "saved", MESSAGES)
    )


def test_transformers_loads_the_exported_llama3_tokenizer_without_a_mistral_regex_warning(tmp_path: Path) -> None:
    """transformers 5 warns ("incorrect regex pattern") for a large local tokenizer whose config.json names no
    transformers version; the exported config.json names the format it is written in."""
    import logging

    from lightning_llama_fp8 import get_preset
    from lightning_llama_fp8.hf.arch import hf_config_from_llama

    special = _export_tokenizer("llama3", tmp_path / "out")
    config = hf_config_from_llama(get_preset("llama3_8b"), special.bos, list(special.stop_ids))

    def warnings_on_loading() -> list[str]:
        (tmp_path / "out" / "config.json").write_text(json.dumps(config))
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # type: ignore[method-assign]
        library = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
        library.addHandler(handler)
        try:
            transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
        finally:
            library.removeHandler(handler)
        return [record.getMessage() for record in records]

    assert not [message for message in warnings_on_loading() if "regex" in message]
    del config["transformers_version"]  # what the warning needs: it is what the field prevents
    assert any("incorrect regex pattern" in message for message in warnings_on_loading())


def test_a_directory_without_a_template_gets_llama3s_when_it_has_the_chat_tokens(tmp_path: Path) -> None:
    source = small_chat_tokenizer_dir(tmp_path / "source")
    special = _export_tokenizer(source, tmp_path / "out")
    assert special.chat_template == TEMPLATE_LLAMA3
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config == {
        **json.loads((source / "tokenizer_config.json").read_text()),
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    assert _chat_ids(tmp_path / "out", MESSAGES) == MESSAGES_LLAMA3_IDS == _rendered_for_training(source, MESSAGES)


def test_a_tokenizer_without_chat_tokens_gets_no_template_and_stops_at_eos(tmp_path: Path) -> None:
    small_tokenizer_json(tmp_path / "tokenizer.json")
    special = _export_tokenizer(tmp_path / "tokenizer.json", tmp_path / "out")
    assert special.chat_template is None and special.eot is None
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_a_given_template_replaces_the_tokenizers_own(tmp_path: Path) -> None:
    """``--chat-template`` as preprocess took it: Llama 3's over a directory's own, or a Jinja file over a
    chat_template.jinja (which is then not copied: transformers would take it first)."""
    source = small_chat_tokenizer_dir(tmp_path / "source", chat_template=OWN_TEMPLATE)
    special = _export_tokenizer(source, tmp_path / "llama3", chat_template="llama3")
    assert special.chat_template == TEMPLATE_GIVEN
    assert (
        json.loads((tmp_path / "llama3" / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3_CHAT_TEMPLATE
    )
    assert _chat_ids(tmp_path / "llama3", MESSAGES) == MESSAGES_LLAMA3_IDS
    assert _rendered_for_training(source, MESSAGES, chat_template="llama3") == MESSAGES_LLAMA3_IDS

    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "saved")  # chat_template.jinja
    (tmp_path / "mine.jinja").write_text(LLAMA3_CHAT_TEMPLATE)
    _export_tokenizer(tmp_path / "saved", tmp_path / "file", chat_template=str(tmp_path / "mine.jinja"))
    assert not (tmp_path / "file" / "chat_template.jinja").exists()
    assert _chat_ids(tmp_path / "file", MESSAGES) == MESSAGES_LLAMA3_IDS


def test_a_given_template_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    small_tokenizer_json(tmp_path / "tokenizer.json")  # no chat tokens
    with pytest.raises(HFConfigError, match=r"lacks Llama 3's chat tokens <\|start_header_id\|>"):
        _given_chat_template(tmp_path / "tokenizer.json", "llama3")
    with pytest.raises(HFConfigError, match="not found"):
        _given_chat_template(tmp_path / "tokenizer.json", str(tmp_path / "missing.jinja"))


@pytest.mark.multiprocess  # llama_checkpoint: saved by a gloo process
def test_export_cli_round_trip_of_the_chat_template(
    llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare tokenizer.json with Llama 3's chat tokens through ``llama-fp8 convert``: transformers renders Llama 3's
    format with the exported tokenizer, and the exported model's generation config stops at <|eot_id|>."""
    from lightning_llama_fp8.cli import main

    tokenizer_json = small_chat_tokenizer_json(tmp_path / "tokenizer.json")
    out = tmp_path / "hf"
    assert main(["convert", str(llama_checkpoint), str(out), "--tokenizer", str(tokenizer_json)]) == 0
    printed = capsys.readouterr().out
    assert f"Chat template: {TEMPLATE_LLAMA3}" in printed and "Generation stops at token ids: 2, 58" in printed
    # transformers with the exported tokenizer == the ids preprocess --chat trains on == Llama 3's format by hand
    assert _chat_ids(out, MESSAGES) == _rendered_for_training(tokenizer_json, MESSAGES) == MESSAGES_LLAMA3_IDS
    prompt = _chat_ids(out, MESSAGES[:2], add_generation_prompt=True)
    assert prompt == _rendered_for_training(tokenizer_json, MESSAGES[:2], add_generation_prompt=True)
    assert prompt == [BOS, START, SYSTEM, END, 4, 5, EOT, START, USER, END, 6, EOT, START, ASSISTANT, END]
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [EOS, EOT]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)


@pytest.mark.multiprocess
def test_export_refuses_an_end_of_turn_token_past_the_vocabulary(llama_checkpoint: Path, tmp_path: Path) -> None:
    """BOS and EOS fit the 1024-entry model, but <|eot_id|> and the header tokens of the chat template do not:
    transformers would fail with an IndexError at the first prompt or the end of the first answer."""
    tokenizer_json = small_chat_tokenizer_json(tmp_path / "tokenizer.json", words=1020)
    with pytest.raises(HFConfigError) as refused:
        export_to_hf(llama_checkpoint, tmp_path / "out", tokenizer=tokenizer_json)
    message = str(refused.value)
    assert "end-of-turn <|eot_id|> = 1028" in message and "chat template token <|start_header_id|> = 1026" in message
    assert "BOS" not in message and "1024 entries" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(HFConfigError, match="pass --tokenizer too"):
        export_to_hf(llama_checkpoint, tmp_path / "out", chat_template="llama3")
