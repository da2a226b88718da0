"""SFTDataModule on one GPU: packed conversations through LlamaLightningModule, in BF16 and FP8.

- Isolation: in a micro batch of two packed samples (each: several conversations, then padding), every token of one
  conversation replaced, and every padding token too, the per-token losses of all other conversations are bitwise
  unchanged, in BF16 and in FP8 with delayed scaling (both forwards under the same scales: set by a forward with
  gradients first, see test_document_masking.py).
- Training: 60 FP8 steps of a small Llama on conversations whose answers are the prompt reversed, its tokens drawn
  from 32 ids: the loss, over answer tokens only, falls from about ln(vocab) = 6.9 below ln(32) = 3.5, and the
  validation loss (answer tokens of the held-out conversations) follows.

Records ``sft_isolation_<precision>.json`` and ``sft_training.json`` into ``$GPU_RESULTS_DIR``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy
import pytest
import torch

from tests.gpu.probes import StepProbe, megatron_on_one_gpu, one_gpu_trainer
from tests.helpers.corpora import chat_corpus

SEQ, VOCAB, GBS, MBS = 512, 1024, 8, 2
ANSWER_IDS = (500, 532)  # prompt and answer tokens: 32 ids


def _reverse_task(count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Conversations ``[BOS, prompt..., SEP, reversed prompt..., EOT]``; the mask covers the answer and EOT."""
    generator = numpy.random.default_rng(seed)
    chats = []
    for _ in range(count):
        prompt = generator.integers(*ANSWER_IDS, int(generator.integers(4, 60))).tolist()
        ids = [1, *prompt, 3, *prompt[::-1], 4]
        chats.append((ids, [0] * (len(prompt) + 2) + [1] * (len(prompt) + 1)))
    return chats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chat_corpus(tmp_path_factory.mktemp("sft") / "reverse", _reverse_task(2000, seed=0))


@pytest.fixture
def megatron_one_gpu() -> Iterator[None]:
    """Megatron's parallel state on this GPU for a model built without a Trainer; gone afterwards, so that the
    Trainer of the training test starts its own."""
    with megatron_on_one_gpu(port=29573):
        yield
    torch.distributed.destroy_process_group()


def _arch() -> Any:
    from lightning_llama_fp8 import LlamaConfig

    return LlamaConfig(
        num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8, num_query_groups=4,
        kv_channels=64, vocab_size=VOCAB, seq_length=SEQ,
    )  # fmt: skip


def _data(prefix: str, **overrides: Any) -> Any:
    from lightning_llama_fp8 import SFTDataModule

    settings: dict[str, Any] = dict(
        seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, micro_batch_size=MBS, split="95,5,0", num_workers=0
    )
    return SFTDataModule(prefix, **{**settings, **overrides})


def _losses(model: Any, micro_batch: dict[str, Any], grad: bool = False) -> torch.Tensor:
    """The model's per-token losses of one micro batch ([mbs * seq], fp32) through forward_inputs."""
    from megatron.core import parallel_state

    from lightning_llama_fp8.model import forward_inputs

    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in micro_batch.items()}
    inputs, _ = forward_inputs(batch, parallel_state.get_context_parallel_group())
    with torch.set_grad_enabled(grad):
        losses = model(**inputs)
    return losses.detach().reshape(-1).float()


@pytest.mark.parametrize("precision", ["bf16", "fp8_delayed"])
def test_conversations_do_not_see_each_other_or_the_padding(
    megatron_one_gpu: None, corpus: str, precision: str, record: Any
) -> None:
    from lightning_llama_fp8 import TEFP8Precision
    from lightning_llama_fp8.data.base import MicrobatchCollate

    data = _data(corpus, train_samples=100)
    data.setup("fit")
    dataset = data.train_dataset
    assert dataset is not None
    padded = [dataset[i] for i in range(len(dataset)) if not dataset[i]["tokens"][-1]][:MBS]  # a padded end
    batch = MicrobatchCollate(MBS, 1, document_masking=True)(padded)
    micro = {key: value[0] for key, value in batch.items()}  # one micro batch: MBS samples laid end to end
    boundaries = list(micro["cu_seqlens"])
    tokens = micro["tokens"].reshape(-1)
    segments = list(itertools.pairwise(boundaries))
    padding = [(b, e) for b, e in segments if not tokens[b:e].any()]
    conversations = [(b, e) for b, e in segments if tokens[b:e].any()]
    assert padding and len(conversations) >= 4, (len(padding), len(conversations))

    arch = _arch()
    kwargs = TEFP8Precision(recipe="delayed").transformer_config_kwargs() if precision == "fp8_delayed" else {}
    torch.manual_seed(0)
    model = arch.build_model(arch.transformer_config(**kwargs)).cuda().eval()
    _losses(model, micro, grad=True)  # delayed scaling: the scales the two compared forwards share
    original = _losses(model, micro)

    changed = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in micro.items()}
    first_begin, first_end = conversations[0]
    flat_tokens, flat_labels = changed["tokens"].view(-1), changed["labels"].view(-1)
    flat_tokens[first_begin:first_end] = (flat_tokens[first_begin:first_end] + 17) % VOCAB
    flat_labels[first_begin:first_end] = (flat_labels[first_begin:first_end] + 17) % VOCAB
    for begin, end in padding:
        flat_tokens[begin:end] = 999
    replaced = _losses(model, changed)

    others = torch.ones_like(original, dtype=torch.bool)
    others[first_begin:first_end] = False
    for begin, end in padding:
        others[begin:end] = False
    result = {
        "conversations": len(conversations),
        "padding_segments": len(padding),
        "other_conversations_max_abs_diff": float((original[others] - replaced[others]).abs().max()),
        "other_conversations_bitwise_equal": bool(torch.equal(original[others], replaced[others])),
        "changed_conversation_max_abs_change": float((original[~others] - replaced[~others]).abs().max()),
    }
    record(f"sft_isolation_{precision}", result)
    assert torch.isfinite(original).all() and torch.isfinite(replaced).all()
    assert result["changed_conversation_max_abs_change"] > 0
    assert result["other_conversations_bitwise_equal"], result


def test_fp8_fine_tuning_learns_the_answers(corpus: str, record: Any) -> None:
    from lightning.pytorch import seed_everything

    from lightning_llama_fp8 import LlamaLightningModule, OptimizerSettings, TEFP8Precision

    steps = 60
    seed_everything(1234)
    data = _data(corpus)
    module = LlamaLightningModule(
        _arch(), OptimizerSettings(lr=1e-3, min_lr=1e-4, warmup_steps=5, weight_decay=0.0, decay_steps=steps)
    )
    probe = StepProbe()
    trainer = one_gpu_trainer(
        TEFP8Precision(recipe="delayed"), steps, [probe], limit_val_batches=1.0, val_check_interval=steps,
        check_val_every_n_epoch=None,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    losses = probe.losses
    val_loss = float(trainer.callback_metrics["val/loss"])
    result = {
        "steps": steps,
        "fill_ratio": data.fill_ratio,
        "train_conversations": len(data.train_packing.conversations),
        "first_losses": losses[:5],
        "last_losses": losses[-10:],
        "val_loss": val_loss,
    }
    record("sft_training", result)
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[:3]) / 3 > 6.0  # about ln(1024) at the start
    assert sum(losses[-10:]) / 10 < math.log(ANSWER_IDS[1] - ANSWER_IDS[0]) and val_loss < math.log(32)
