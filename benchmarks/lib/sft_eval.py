"""Answering the held-out conversations of the fine-tuning evidence in transformers, as a user of an exported model
does: ``apply_chat_template(add_generation_prompt=True)`` and greedy ``generate``, which stops at the
``generation_config.json`` of the export (``<|eot_id|>`` among its ids); graded by exact match.

The untrained model is the exported architecture at a random initialisation (``from_config``, seeded), answered with
the same tokenizer and generation config. Besides accuracy the record says how many answers ended at an end-of-turn
or end-of-text token (rather than running into ``max_new_tokens``), and whether transformers' rendering of the first
training conversations equals the token ids ``llama-fp8 preprocess --chat`` wrote for them (the model is asked in
the format it was trained on).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.lib.sft_task import exact_match, prompt_messages

#: Answers kept in the record per model, for reading.
SAMPLE_ANSWERS = 8


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """``apply_chat_template`` token ids as a list (transformers 5 returns a BatchEncoding, 4 a list)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def answer_heldout(
    model_dir: Path,
    records: list[dict[str, Any]],
    *,
    untrained_seed: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    device: str = "cuda",
) -> dict[str, Any]:
    """Greedy answers of the model in ``model_dir`` (or, with ``untrained_seed``, of its architecture freshly
    initialised with that seed) to ``records``' prompts; their exact-match accuracy and a few samples."""
    import torch
    import transformers

    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # a batch's prompts end together, where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = transformers.GenerationConfig.from_pretrained(model_dir)
    generation.update(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    generation.update(temperature=None, top_p=None, top_k=None)
    if untrained_seed is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        torch.manual_seed(untrained_seed)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(device).eval()
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    answers: list[str] = []
    stopped = 0
    for begin in range(0, len(records), batch_size):
        batch = [prompt_messages(record) for record in records[begin : begin + batch_size]]
        inputs = tokenizer.apply_chat_template(
            batch, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=generation)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        for tokens in new_tokens:
            stopped += any(token in stops for token in tokens)
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
    expected = [record["answer"] for record in records]
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for record, answer in zip(records, answers, strict=True):
        kind = "sort" if "," in record["answer"] else "reverse"
        by_kind.setdefault(kind, []).append((answer, record["answer"]))
    return {
        "model": str(model_dir)
        if untrained_seed is None
        else f"{model_dir} architecture, random init seed {untrained_seed}",
        "conversations": len(records),
        "exact_match": exact_match(answers, expected),
        "exact_match_by_kind": {
            kind: exact_match([a for a, _ in pairs], [e for _, e in pairs]) for kind, pairs in sorted(by_kind.items())
        },
        "stopped_at_stop_token": stopped / len(records),
        "stop_token_ids": stops,
        "samples": [
            {"prompt": prompt_messages(record)[-1]["content"], "answer": answer, "expected": record["answer"]}
            for record, answer in list(zip(records, answers, strict=True))[:SAMPLE_ANSWERS]
        ],
        "seconds": time.perf_counter() - started,
    }


def template_matches_corpus(
    model_dir: Path, prefix: str, conversations: list[dict[str, Any]], count: int = 200
) -> dict[str, Any]:
    """Whether transformers renders the first ``count`` training conversations (``apply_chat_template`` of the
    exported tokenizer) as the token ids of the chat corpus ``prefix`` (one conversation per document, in input
    order). The corpus is read with numpy: megatron-core would load Transformer Engine's cuDNN after transformers
    loaded torch's, which fails (undefined cuDNN symbols) on the GPU machine."""
    import numpy
    import transformers

    from lightning_llama_fp8.data.corpus import bin_path, idx_path, read_index

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dtype, lengths, pointers = read_index(idx_path(prefix))
    tokens = numpy.memmap(bin_path(prefix), dtype=dtype, mode="r")
    checked = min(count, len(conversations), len(lengths))
    equal = 0
    first_difference = None
    for index in range(checked):
        rendered = _chat_ids(tokenizer, conversations[index]["messages"])
        start = int(pointers[index]) // dtype.itemsize
        stored = tokens[start : start + int(lengths[index])].tolist()
        if rendered == stored:
            equal += 1
        elif first_difference is None:
            first_difference = {"conversation": index, "transformers": rendered, "corpus": stored}
    return {"checked": checked, "equal": equal, "first_difference": first_difference}
