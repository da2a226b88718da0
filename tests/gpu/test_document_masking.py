"""Document masking on one GPU, on real text: each document of a packed sample attends only to itself.

A packed sample of ``SEQ`` tokens holds at least three real documents (Python source files of the installed
``lightning`` package, the kind of text the real-text example trains on, tokenized with the Llama 3 tokenizer and
ended with its end-of-document token, as ``llama-fp8 preprocess`` writes them); the last one is cut where the
sample ends. A 4-layer Llama (hidden 1024, vocabulary 128256, random weights) runs forward through
``model.forward_inputs``, the path of every training and validation step:

- Isolation: every token of the first document replaced, the logits of the other documents are bitwise unchanged,
  in BF16 and in FP8 with delayed scaling (both forwards under the same scales: set by a first forward of the
  sample with gradients on, since Transformer Engine updates delayed-scaling scales only then, and left alone by the
  two compared forwards, which run without gradients) and with blockwise scaling (1x128 activation blocks never mix
  tokens). FP8
  current scaling takes one scale per tensor, over every document of the sample, so a replaced document changes the
  others' quantization: recorded, not required to be bitwise. With masking off the other documents do change.
- Equivalence: each document's logits inside the packed sample against the same document run alone from position
  0, in BF16: the largest difference is at most twice the largest difference between BF16 and FP32 runs of the
  documents alone (the same weights; FP32 GEMMs without TF32, TE's unfused FP32 attention).

Writes ``document_masking_isolation.json`` into ``$GPU_RESULTS_DIR`` (the stage merges it into
``document_masking.json``).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.probes import megatron_on_one_gpu

# The FP32 reference needs FP32 GEMMs: cuBLAS honours this for every handle created after it is set (see
# test_hf_parity.py); BF16 and FP8 GEMMs are not affected.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

SEQ = 2048
DOCUMENT_TOKENS = (150, 700)  # documents of this many tokens (end-of-document token included) are used
ALONE_VS_PACKED_FACTOR = 2.0  # the bound: packed vs alone <= 2 x (BF16 vs FP32 alone)
# Megatron-Core sets these when a model asks for an attention backend and refuses a later "auto" model while they are
# set (the FP32 reference asks for TE's unfused attention): each test restores them.
ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")

RESULTS: dict[str, Any] = {"isolation": {}, "nvidia_tf32_override": os.environ["NVIDIA_TF32_OVERRIDE"]}


@pytest.fixture(autouse=True)
def _restore_attention_env() -> Any:
    saved = {name: os.environ.get(name) for name in ATTENTION_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def megatron_one_gpu() -> Any:
    """Megatron's parallel state on this one GPU (TP1, CP1) and its RNG tracker; writes the record at the end."""
    with megatron_on_one_gpu(port=29571):
        yield
    RESULTS["card"] = torch.cuda.get_device_name()
    print("[document_masking]", json.dumps(RESULTS)[:3000])
    out = os.environ.get("GPU_RESULTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "document_masking_isolation.json").write_text(json.dumps(RESULTS, indent=2))


@pytest.fixture(scope="module")
def documents() -> dict[str, Any]:
    """Real documents packed into one sample: ``tokens`` [SEQ], ``cu_seqlens``, their files, and a replacement for
    the first document (other real text of the same length, differing at every position)."""
    import lightning

    from lightning_llama_fp8.data import resolve_tokenizer

    spec = resolve_tokenizer("llama3")
    tokenizer = spec.load()
    assert spec.eod_id is not None
    root = Path(lightning.__file__).parent
    chosen: list[tuple[str, list[int]]] = []  # (file, tokens) of the documents packed, in order
    spare: list[int] | None = None  # a longer file's tokens: the first document's replacement
    for path in sorted((root / "pytorch").rglob("*.py")):
        ids = [*tokenizer.encode(path.read_text(encoding="utf-8")).ids, spec.eod_id]
        if spare is None and len(ids) > DOCUMENT_TOKENS[1]:
            spare = ids
        elif DOCUMENT_TOKENS[0] <= len(ids) <= DOCUMENT_TOKENS[1] and sum(len(d) for _, d in chosen) < SEQ:
            chosen.append((str(path.relative_to(root.parent)), ids))
        if spare is not None and sum(len(d) for _, d in chosen) >= SEQ:
            break
    lengths = [len(ids) for _, ids in chosen]
    assert spare is not None and sum(lengths) >= SEQ, "too few text files of the wanted size in the lightning package"
    assert len(chosen) >= 3, lengths  # the last one is cut where the sample ends
    tokens = torch.tensor([token for _, ids in chosen for token in ids][:SEQ])
    boundaries = [0]
    for length in lengths:
        boundaries.append(min(boundaries[-1] + length, SEQ))
    first = boundaries[1]
    replacement = torch.tensor(spare[:first])
    same = replacement == tokens[:first]
    replacement[same] = (replacement[same] + 1) % 128000  # every token of the first document replaced
    RESULTS["documents"] = [
        {"file": name, "tokens_in_sample": end - begin, "tokens": len(ids)}
        for (name, ids), begin, end in zip(chosen, boundaries[:-1], boundaries[1:], strict=True)
    ]
    RESULTS["tokenizer"] = {"name": spec.name, "sha256": spec.sha256}
    return {"tokens": tokens, "cu_seqlens": tuple(boundaries), "replacement": replacement}


def _arch() -> Any:
    from lightning_llama_fp8 import LlamaConfig

    return LlamaConfig(
        num_layers=4, hidden_size=1024, ffn_hidden_size=3584, num_attention_heads=8, num_query_groups=4,
        kv_channels=128, vocab_size=128256, seq_length=SEQ,
    )  # fmt: skip


def _build(precision: str, **overrides: Any) -> Any:
    from lightning_llama_fp8 import TEFP8Precision

    arch = _arch()
    kwargs: dict[str, Any] = {}
    if precision.startswith("fp8_"):
        kwargs = TEFP8Precision(recipe=precision.removeprefix("fp8_")).transformer_config_kwargs()
    torch.manual_seed(0)
    return arch.build_model(arch.transformer_config(**kwargs, **overrides)).cuda().eval()


def _micro_batch(tokens: torch.Tensor, cu_seqlens: tuple[int, ...] | None) -> dict[str, Any]:
    """One micro batch as the DataLoader gives it (micro batch size 1), with or without document boundaries."""
    tokens = tokens.cuda().view(1, -1)
    positions = torch.arange(tokens.shape[1], device="cuda")
    batch: dict[str, Any] = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "loss_mask": torch.ones_like(tokens, dtype=torch.float),
        "position_ids": positions.view(1, -1),
    }
    if cu_seqlens is not None:
        for begin, end in itertools.pairwise(cu_seqlens):  # as the dataset restarts them
            positions[begin:end] = torch.arange(end - begin, device="cuda")
        batch["cu_seqlens"] = cu_seqlens
    return batch


def _logits(model: Any, tokens: torch.Tensor, cu_seqlens: tuple[int, ...] | None, grad: bool = False) -> torch.Tensor:
    """The model's logits [tokens, vocab] (fp32) through forward_inputs, the training step's own inputs; without
    gradients unless ``grad`` (with them, Transformer Engine updates its delayed-scaling scales afterwards)."""
    from megatron.core import parallel_state

    from lightning_llama_fp8.model import forward_inputs

    inputs, _ = forward_inputs(
        _micro_batch(tokens, cu_seqlens), parallel_state.get_context_parallel_group(), with_labels=False
    )
    with torch.set_grad_enabled(grad):
        logits = model(**inputs)
    return logits.detach()[0, :, :128256].float()


@pytest.mark.parametrize("precision", ["bf16", "fp8_delayed", "fp8_blockwise", "fp8_current"])
def test_other_documents_do_not_see_the_first(megatron_one_gpu: Any, documents: dict[str, Any], precision: str) -> None:
    if precision != "bf16":
        from lightning_llama_fp8.fp8.support import fp8_support

        ok, reason = fp8_support(precision.removeprefix("fp8_"))
        if not ok:
            pytest.skip(reason)
    model = _build(precision)
    tokens, cu_seqlens = documents["tokens"], documents["cu_seqlens"]
    replaced = tokens.clone()
    first = cu_seqlens[1]
    replaced[:first] = documents["replacement"]
    # Delayed scaling: the scales come from this sample's amaxes (TE updates them after a forward with gradients
    # only); the compared forwards below run without gradients, so both use these same scales.
    _logits(model, tokens, cu_seqlens, grad=True)
    original, changed = _logits(model, tokens, cu_seqlens), _logits(model, replaced, cu_seqlens)
    others = float((original[first:] - changed[first:]).abs().max())
    first_changed = float((original[:first] - changed[:first]).abs().max())
    unmasked = float((_logits(model, tokens, None)[first:] - _logits(model, replaced, None)[first:]).abs().max())
    RESULTS["isolation"][precision] = {
        "other_documents_max_abs_diff": others,
        "other_documents_bitwise_equal": bool(torch.equal(original[first:], changed[first:])),
        "first_document_max_abs_change": first_changed,
        "unmasked_other_documents_max_abs_change": unmasked,
        "replaced_tokens": first,
    }
    assert torch.isfinite(original).all() and torch.isfinite(changed).all()
    assert first_changed > 0 and unmasked > 0  # the replacement matters, and without masking it reaches the others
    if precision != "fp8_current":  # per-tensor current scaling shares one scale over all documents (docstring)
        assert torch.equal(original[first:], changed[first:]), others


def test_each_document_as_if_alone(megatron_one_gpu: Any, documents: dict[str, Any]) -> None:
    from megatron.core.transformer.enums import AttnBackend

    tokens, cu_seqlens = documents["tokens"], documents["cu_seqlens"]
    bf16 = _build("bf16")
    packed = _logits(bf16, tokens, cu_seqlens)
    documents_alone = list(itertools.pairwise(cu_seqlens))
    alone_bf16s = [_logits(bf16, tokens[begin:end], None) for begin, end in documents_alone]
    # The FP32 reference: the same weights (BF16 values, exact in FP32), FP32 compute, TE's unfused attention (its
    # fused kernels take 16-bit inputs only). Megatron refuses to build it while the BF16 model's "auto" backend
    # variables are set, and TE reads them at each forward: so every BF16 forward runs first, then they are cleared.
    for name in ATTENTION_ENV:
        os.environ.pop(name, None)
    fp32 = _build("fp32", bf16=False, params_dtype=torch.float32, attention_backend=AttnBackend.unfused)
    with torch.no_grad():
        for (name, weight), (other, reference) in zip(bf16.named_parameters(), fp32.named_parameters(), strict=True):
            assert name == other
            reference.copy_(weight.float())
    per_document = []
    for (begin, end), alone_bf16 in zip(documents_alone, alone_bf16s, strict=True):
        alone_fp32 = _logits(fp32, tokens[begin:end], None)
        per_document.append(
            {
                "tokens": end - begin,
                "alone_vs_packed_max_abs_diff": float((packed[begin:end] - alone_bf16).abs().max()),
                "bf16_vs_fp32_alone_max_abs_diff": float((alone_bf16 - alone_fp32).abs().max()),
                "logit_std": float(alone_fp32.std()),
            }
        )
    packed_diff = max(doc["alone_vs_packed_max_abs_diff"] for doc in per_document)
    precision_diff = max(doc["bf16_vs_fp32_alone_max_abs_diff"] for doc in per_document)
    RESULTS.update(
        alone_vs_packed_max_abs_diff=packed_diff,
        bf16_vs_fp32_alone_max_abs_diff=precision_diff,
        alone_vs_packed_per_document=per_document,
    )
    assert precision_diff > 0
    assert packed_diff <= ALONE_VS_PACKED_FACTOR * precision_diff, (packed_diff, precision_diff)
