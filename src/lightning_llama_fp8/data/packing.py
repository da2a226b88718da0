"""Document masking: each document of a packed sample attends only to itself, with positions restarting per document.

Megatron's ``GPTDataset`` fills every sample with consecutive documents. Under one causal mask a token then sees the
tail of unrelated documents before it, and RoPE positions run on across document boundaries. With
``GPTDatasetConfig(inter_document_masking=True)`` (Megatron-LM's ``--dataloader-inter-document-masking``) each sample
also carries ``cu_seqlens``: where its documents start, padded to ``seq_length + 1`` entries with copies of
``seq_length``. This module turns those into what Transformer Engine's attention needs for the packed (``thd``)
layout:

- :func:`merge_document_boundaries`: the boundaries of one micro batch, its samples laid end to end (the model sees
  a micro batch as one sequence of ``micro_batch_size * seq_length`` tokens), padding stripped, as Python ints. They
  travel with the micro batch through the DataLoader and Megatron's schedule and stay on the host, so building the
  attention's arguments needs no device-to-host copy (no wait for the GPU) in the training step.
- :func:`packed_seq_params`: Megatron-Core's ``PackedSeqParams(qkv_format="thd")`` for one micro batch. Attention
  then runs per document (TE maps the causal mask to ``padding_causal``) and RoPE restarts at every document
  (Megatron's THD rotary embedding), which is what the dataset's per-document ``position_ids`` describe.
- :func:`document_masking_problems`: the settings with which no kernel can run packed sequences (or would attend
  across documents), refused before anything is built.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where they run: ``llama-fp8 plan`` checks document masking without torch.
    import numpy
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

__all__ = [
    "check_document_masking",
    "document_masking_problems",
    "longest_document",
    "merge_document_boundaries",
    "packed_seq_params",
]

#: What document masking does, for the log line and ``llama-fp8 plan``.
DESCRIPTION = "each document of a packed sample attends only to itself, positions restart per document"


def merge_document_boundaries(samples: Sequence[torch.Tensor | numpy.ndarray], seq_length: int) -> tuple[int, ...]:
    """The document boundaries of ``samples`` laid end to end, as ``cu_seqlens`` of one packed sequence.

    Args:
        samples: each sample's ``cu_seqlens`` as ``GPTDataset`` returns it with ``inter_document_masking``: starting
            at 0, non-decreasing, reaching ``seq_length`` and padded after that with copies of ``seq_length``.
        seq_length: tokens per sample.

    Returns:
        ``(0, ..., len(samples) * seq_length)``, strictly increasing: sample ``i``'s boundaries shifted by
        ``i * seq_length``, its padding and any empty document (a repeated boundary) dropped.

    Raises:
        ValueError: a sample's boundaries are not of that form (the message says which sample and why).
    """
    import numpy

    merged = [0]
    for index, sample in enumerate(samples):
        row = numpy.asarray(sample, dtype=numpy.int64).reshape(-1)
        ends = numpy.flatnonzero(row == seq_length)
        problem = None
        if row.size == 0 or row[0] != 0:
            problem = "does not start at 0"
        elif ends.size == 0:
            problem = f"never reaches seq_length {seq_length}"
        elif numpy.any(numpy.diff(row[: ends[0] + 1]) < 0):
            problem = "decreases"
        if problem is not None:
            raise ValueError(
                f"Sample {index} of the micro batch has document boundaries (cu_seqlens) that {problem}: "
                f"{row[:8].tolist()}{' ...' if row.size > 8 else ''}. Document masking needs megatron-core's "
                "GPTDataset with inter_document_masking=True (the data module sets it with document_masking=True)."
            )
        offset = index * seq_length
        for boundary in row[1 : ends[0] + 1].tolist():
            if boundary + offset > merged[-1]:
                merged.append(boundary + offset)
    return tuple(merged)


def longest_document(cu_seqlens: Sequence[int]) -> int:
    """The length of the longest document that ``cu_seqlens`` delimits."""
    return max(end - start for start, end in itertools.pairwise(cu_seqlens))


def packed_seq_params(cu_seqlens: Sequence[int], device: torch.device) -> PackedSeqParams:
    """Megatron-Core's packed-sequence parameters for one micro batch whose documents ``cu_seqlens`` delimits
    (:func:`merge_document_boundaries`), with ``cu_seqlens`` as an int32 tensor on ``device``.

    The host-to-device copy is asynchronous (from pinned memory on CUDA), and the longest document is computed on the
    host, so nothing here waits for the GPU. No padded boundaries (``cu_seqlens_*_padded``): documents are not padded
    without context parallelism.
    """
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    if len(cu_seqlens) < 2 or cu_seqlens[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and delimit at least one document; got {list(cu_seqlens)[:8]}.")
    boundaries = torch.tensor(cu_seqlens, dtype=torch.int32)
    if device.type == "cuda":
        boundaries = boundaries.pin_memory().to(device, non_blocking=True)
    else:
        boundaries = boundaries.to(device)
    longest = longest_document(cu_seqlens)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=boundaries,
        cu_seqlens_kv=boundaries,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def document_masking_problems(
    *,
    context_parallel_size: int = 1,
    transformer_impl: str = "transformer_engine",
    attention_backend: str = "auto",
    fp8_attention: bool = False,
    masking_optional: bool = True,
) -> list[str]:
    """Why document masking cannot run with these settings (empty: it can), each naming the setting to change
    (and, where ``masking_optional``, that turning document masking off is the other way out).

    - Context parallelism: Transformer Engine splits a packed sequence over the CP ranks document by document (each
      document cut into 2 x CP equal chunks) and so needs every document padded to a multiple of 2 x CP tokens;
      megatron-core's dataset packs documents without that padding, and splitting the whole sample instead (what
      Megatron-LM's ``--dataloader-inter-document-masking`` does with CP > 1) hands each rank chunks that TE's
      per-document attention does not expect.
    - Megatron-Core's own attention (``transformer_impl: local`` or ``attention_backend: local``) takes no packed
      sequences.
    - FP8 attention: cuDNN's FP8 attention takes only the padded ``[batch, seq]`` layouts, not packed sequences, on
      every recipe and card (TE 2.20's backend selection); TE's only FP8 packed kernel (FlashAttention 3) is
      inference only. FP8 GEMMs with BF16 attention run packed sequences on every recipe.
    """
    problems = []
    off = ", or data.document_masking: false" if masking_optional else ""
    if context_parallel_size > 1:
        problems.append(
            f"data.document_masking with context_parallel_size {context_parallel_size}: Transformer Engine splits "
            f"packed sequences over the CP ranks document by document and needs every document padded to a multiple "
            f"of 2 x CP = {2 * context_parallel_size} tokens, which megatron-core's dataset does not do (splitting "
            "the whole sample instead would hand each rank chunks its per-document attention does not expect). "
            "Set the strategy's context_parallel_size: 1 (tensor, pipeline or data parallelism for the GPUs)" + off
        )
    if transformer_impl != "transformer_engine":
        problems.append(
            f"data.document_masking with model.arch.transformer_impl {transformer_impl!r}: Megatron-Core's own "
            "attention takes no packed sequences. Set transformer_impl: transformer_engine" + off
        )
    elif attention_backend == "local":
        problems.append(
            "data.document_masking with model.arch.attention_backend 'local': Megatron-Core's own attention takes no "
            "packed sequences. Set attention_backend: auto, fused or flash" + off
        )
    if fp8_attention:
        problems.append(
            "data.document_masking with FP8 attention (TEFP8Precision fp8_attention: true): cuDNN's FP8 attention "
            "takes only padded [batch, seq] layouts, not packed sequences, and Transformer Engine has no other FP8 "
            "attention kernel for training, so none could run it. Set fp8_attention: false (FP8 GEMMs with BF16 "
            "attention run packed sequences with every recipe)" + off
        )
    return problems


def check_document_masking(**settings: Any) -> None:
    """Raise ``ValueError`` with every one of :func:`document_masking_problems` (nothing when there is none)."""
    problems = document_masking_problems(**settings)
    if problems:
        raise ValueError("; ".join(problems) + ".")
