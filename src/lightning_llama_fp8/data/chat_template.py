"""Llama 3's chat format: its special tokens and its chat template (Jinja, as ``transformers`` renders it).

A tokenizer without a chat template of its own (a bare Llama 3 ``tokenizer.json``, a base model's directory) has its
conversations rendered in this format by ``llama-fp8 preprocess --chat``, and ``llama-fp8 convert`` writes this
template into the exported ``tokenizer_config.json``, so that ``apply_chat_template`` in ``transformers`` renders a
prompt exactly as the training data was rendered.

The format: ``<|begin_of_text|>``, then per message ``<|start_header_id|>ROLE<|end_header_id|>`` + two newlines + the
message's text without surrounding whitespace + ``<|eot_id|>``; a generation prompt is the assistant's header and the
two newlines.
"""

from __future__ import annotations

__all__ = ["LLAMA3_CHAT_TEMPLATE", "LLAMA3_CHAT_TOKENS", "LLAMA3_END_HEADER", "LLAMA3_EOT", "LLAMA3_START_HEADER"]

LLAMA3_START_HEADER = "<|start_header_id|>"
LLAMA3_END_HEADER = "<|end_header_id|>"
#: The end-of-turn token closing every message: a model fine-tuned on chat emits it after its answer.
LLAMA3_EOT = "<|eot_id|>"
#: The tokens the template writes besides BOS: a tokenizer without a template of its own can use Llama 3's only when
#: it has them all.
LLAMA3_CHAT_TOKENS = (LLAMA3_START_HEADER, LLAMA3_END_HEADER, LLAMA3_EOT)

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '" + LLAMA3_START_HEADER + "' + message['role'] + '" + LLAMA3_END_HEADER + "\n\n' "
    "+ message['content'] | trim + '" + LLAMA3_EOT + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + LLAMA3_START_HEADER + "assistant" + LLAMA3_END_HEADER + "\n\n' -}}"
    "{%- endif -%}"
)
