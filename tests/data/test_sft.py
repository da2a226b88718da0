"""SFTDataModule on the CPU (data/sft.py): chat corpora (tokens + loss mask, written here with megatron-core's own
builder) packed into samples without cutting a conversation, each attending only to itself; labels, loss mask and
positions per conversation; the fill ratio; data-parallel shards; resuming; and the corpora refused before anything is
built."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any
from unittest import mock

import numpy
import pytest
import torch
import yaml

from lightning_llama_fp8 import IndexedDataModule, SFTDataModule
from lightning_llama_fp8.data import base as base_module
from lightning_llama_fp8.data.corpus import (
    loss_mask_path,
)
from lightning_llama_fp8.data.sft import PackedSplit, check_chat_corpus, first_fit_packing
from tests.helpers import REPO_ROOT
from tests.helpers.corpora import chat_corpus
from tests.helpers.distributed import run_distributed

SEQ, VOCAB, GBS, MBS = 64, 1000, 4, 2
#: Prompt tokens are drawn below this id, answer tokens from it on: a label's id says whether it is an answer.
ANSWER_IDS = 500


# ---------------------------------------------------------------------------------------------- chat corpora
def conversation(generator: numpy.random.Generator, turns: int) -> tuple[list[int], list[int]]:
    """A conversation of ``turns`` prompt/answer turns: token ids and the mask (1 on the answer tokens)."""
    ids, mask = [1], [0]  # a begin-of-text token, never learned
    for _ in range(turns):
        prompt = generator.integers(2, ANSWER_IDS, generator.integers(2, 12)).tolist()
        answer = generator.integers(ANSWER_IDS, VOCAB, generator.integers(1, 10)).tolist()
        ids += prompt + answer
        mask += [0] * len(prompt) + [1] * len(answer)
    return ids, mask


def conversations(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    generator = numpy.random.default_rng(seed)
    return [conversation(generator, int(generator.integers(1, 4))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    chats = conversations(300)
    prefix = chat_corpus(tmp_path_factory.mktemp("chat") / "chat", chats)
    return {"prefix": prefix, "chats": chats}


def module(data_path: Any, **overrides: Any) -> SFTDataModule:
    kwargs: dict[str, Any] = dict(
        seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, micro_batch_size=MBS, train_samples=24 * GBS,
        split="90,10,0", num_workers=0,
    )  # fmt: skip
    return SFTDataModule(data_path, **{**kwargs, **overrides})


def samples_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a collated batch, each with its own document boundaries (from the micro batch's merged ones)."""
    out = []
    for micro, boundaries in enumerate(batch["cu_seqlens"]):
        for index in range(batch["tokens"].shape[1]):
            offset = index * SEQ
            own = [b - offset for b in boundaries if offset <= b <= offset + SEQ]
            out.append({key: batch[key][micro, index] for key in ("tokens", "labels", "loss_mask", "position_ids")})
            out[-1]["boundaries"] = own
    return out


# ---------------------------------------------------------------------------------------------- the samples
def test_every_sample_is_whole_conversations_then_padding(corpus: dict[str, Any]) -> None:
    """Each segment between boundaries is one conversation of the corpus, inputs its tokens but the last, labels its
    tokens but the first, loss mask its mask but the first, positions from 0; the padding after the last one is a
    segment of its own with loss mask 0. Each training conversation appears once an epoch, whole."""
    data = module(corpus["prefix"], train_samples=30 * GBS)
    data.setup("fit")
    by_tokens = {tuple(ids): (ids, mask) for ids, mask in corpus["chats"]}
    packed = data.train_packing
    assert packed is not None and packed.samples <= 30 * GBS  # at least one epoch
    seen: list[list[tuple[int, ...]]] = []  # the conversations of each sample
    for batch in data.train_dataloader():
        assert batch["tokens"].shape == (GBS // MBS, MBS, SEQ)
        for sample in samples_of(batch):
            boundaries = sample["boundaries"]
            assert boundaries[0] == 0 and boundaries[-1] == SEQ
            seen.append([])
            for begin, end in itertools.pairwise(boundaries):
                assert sample["position_ids"][begin:end].tolist() == list(range(end - begin))
                inputs, labels = sample["tokens"][begin:end].tolist(), sample["labels"][begin:end].tolist()
                whole = tuple(inputs + labels[-1:])
                if whole in by_tokens:
                    ids, mask = by_tokens[whole]
                    assert labels == ids[1:]
                    assert sample["loss_mask"][begin:end].tolist() == [float(m) for m in mask[1:]]
                    seen[-1].append(whole)
                else:  # the padding: only at the end, learned nowhere
                    assert end == SEQ and set(inputs) == {0} and not sample["loss_mask"][begin:end].any()
            assert seen[-1], "a sample without a conversation"
    first_epoch = list(itertools.chain(*seen[: packed.samples]))
    assert len(set(first_epoch)) == len(first_epoch) == len(packed.conversations)


def test_loss_mask_is_the_shifted_mask_on_answers_only(corpus: dict[str, Any]) -> None:
    """In every conversation of every sample the loss mask is 1 exactly where the label is an answer token (the
    corpus marks every answer token and nothing else), 0 on prompts and padding; an epoch learns every answer token of
    the training split once."""
    data = module(corpus["prefix"], train_samples=GBS * 100)
    data.setup("fit")
    packed, dataset = data.train_packing, data.train_dataset
    assert packed is not None and dataset is not None
    learned = 0
    for index in range(packed.samples):
        sample = dataset[index]
        mask = sample["loss_mask"].bool()
        boundaries = sample["cu_seqlens"].tolist()
        for begin, end in itertools.pairwise(boundaries):
            labels = sample["labels"][begin:end]
            if sample["tokens"][begin:end].any():  # a conversation (its first input is the begin-of-text token 1)
                assert torch.equal(mask[begin:end], labels >= ANSWER_IDS)
            else:
                assert end == SEQ and not mask[begin:end].any()
        learned += int(mask.sum())
    assert learned == packed.answer_tokens


def test_the_fill_ratio_counts_conversation_positions(corpus: dict[str, Any]) -> None:
    data = module(corpus["prefix"])
    assert data.fill_ratio is None
    data.setup("fit")
    packed = data.train_packing
    assert packed is not None and data.val_packing is not None
    train_ids = set(packed.conversations.tolist())
    lengths = [len(ids) for ids, _ in corpus["chats"]]
    positions = sum(lengths[i] - 1 for i in train_ids)
    assert data.fill_ratio == packed.fill_ratio == positions / (packed.samples * SEQ)
    assert 0.8 < data.fill_ratio <= 1.0
    # Training and validation hold different conversations, together all of them.
    val_ids = set(data.val_packing.conversations.tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == len(corpus["chats"])
    assert abs(len(val_ids) - 30) <= 1  # split 90,10


def test_packing_is_logged_once(corpus: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    data = module(corpus["prefix"])
    with caplog.at_level("INFO"):
        data.setup("fit")
    assert data.train_packing is not None
    lines = [r.getMessage() for r in caplog.records if "fill ratio" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"train: {len(data.train_packing.conversations)} conversations" in lines[0]
    assert f"fill ratio {data.fill_ratio:.1%}" in lines[0]
    assert "loss on answer tokens only" in lines[0] and "Document masking on" in lines[0]


def test_first_fit_never_splits_and_fills_first_fitting_sample() -> None:
    sizes = numpy.array([5, 7, 3, 2, 8, 1, 4])
    items, offsets = first_fit_packing(sizes, 10)
    bins = [items[a:b].tolist() for a, b in itertools.pairwise(offsets.tolist())]
    assert bins == [[0, 2, 3], [1, 5], [4], [6]]  # 5+3+2, 7+1, 8, then 4: no earlier sample has room
    assert sorted(items.tolist()) == list(range(len(sizes)))
    generator = numpy.random.default_rng(1)
    sizes = generator.integers(1, 4097, 20000)
    items, offsets = first_fit_packing(sizes, 4096)
    loads = numpy.add.reduceat(sizes[items], offsets[:-1])
    assert sorted(items.tolist()) == list(range(len(sizes))) and int(loads.max()) <= 4096
    # First fit: no two samples could have been one, and no item fits an earlier sample than its own.
    assert int(numpy.sort(loads)[:2].sum()) > 4096
    with pytest.raises(ValueError, match=r"every size must be in \[1, 10\]"):
        first_fit_packing(numpy.array([3, 11]), 10)


def test_epochs_are_reshuffled_and_a_longer_run_continues_a_shorter_one(corpus: dict[str, Any]) -> None:
    short, longer = module(corpus["prefix"], train_samples=8 * GBS), module(corpus["prefix"], train_samples=80 * GBS)
    for data in (short, longer):
        data.setup("fit")
    assert short.train_dataset is not None and longer.train_dataset is not None
    per_epoch = longer.train_packing.samples  # type: ignore[union-attr]
    assert 3 * per_epoch < 80 * GBS  # the longer run spans several epochs
    tokens = [longer.train_dataset[i]["tokens"] for i in range(3 * per_epoch)]
    for i in range(8 * GBS):
        assert torch.equal(short.train_dataset[i]["tokens"], tokens[i])
    epochs = [{tuple(t.tolist()) for t in tokens[e * per_epoch : (e + 1) * per_epoch]} for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]  # every epoch holds each packed sample once
    assert [t.tolist() for t in tokens[:per_epoch]] != [t.tolist() for t in tokens[per_epoch : 2 * per_epoch]]
    other_seed = module(corpus["prefix"], train_samples=8 * GBS, seed=99)
    other_seed.setup("fit")
    assert other_seed.train_dataset is not None
    assert not torch.equal(other_seed.train_dataset[0]["tokens"], tokens[0])


def test_micro_batches_merge_their_samples_boundaries(corpus: dict[str, Any]) -> None:
    """With 2 samples per micro batch, the batch's boundaries are each sample's, the second shifted by seq_length."""
    data = module(corpus["prefix"])
    data.setup("fit")
    dataset = data.train_dataset
    assert dataset is not None
    batch = next(iter(data.train_dataloader()))
    assert len(batch["cu_seqlens"]) == GBS // MBS
    for micro, merged in enumerate(batch["cu_seqlens"]):
        first, second = (dataset[micro * MBS + k]["cu_seqlens"].tolist() for k in range(MBS))
        assert list(merged) == first + [b + SEQ for b in second[1:]]


def test_datasets_pickle_small_for_loader_workers(corpus: dict[str, Any]) -> None:
    """DataLoader workers started by spawn or forkserver get the datasets pickled: the files are reopened there, not
    copied (a pickled numpy memmap would carry the whole mask)."""
    import pickle

    data = module(corpus["prefix"])
    data.setup("fit")
    dataset = data.train_dataset
    assert dataset is not None
    first = dataset[0]  # the files are open in this process now
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 64 * 1024
    for key, value in copy[0].items():
        assert torch.equal(value, first[key]), key


def test_validation_covers_its_split_in_whole_global_batches(corpus: dict[str, Any]) -> None:
    data = module(corpus["prefix"])
    data.setup("fit")
    packed = data.val_packing
    assert packed is not None and data.val_dataset is not None
    assert len(data.val_dataset) == -(-packed.samples // GBS) * GBS
    learned = sum(int(batch["loss_mask"].sum()) for batch in data.val_dataloader())
    assert learned == packed.answer_tokens
    padding = data.val_dataset[len(data.val_dataset) - 1]
    if len(data.val_dataset) > packed.samples:
        assert padding["cu_seqlens"].tolist() == [0, SEQ] and not padding["loss_mask"].any()
    with pytest.raises(ValueError, match=r"val_samples \(400\) is more than the validation split holds"):
        module(corpus["prefix"], val_samples=400).setup("fit")
    none = module(corpus["prefix"], split="100,0,0")
    none.setup("fit")
    assert none.val_dataset is not None and len(none.val_dataset) == 0


# ---------------------------------------------------------------------------------------------- data parallelism
@pytest.mark.parametrize("dp", [2, 4])
def test_dp_ranks_share_each_global_batch(corpus: dict[str, Any], dp: int) -> None:
    """Every DP rank gets its own share of each global batch: disjoint, together the one-rank global batch."""

    def batches(size: int, rank: int) -> list[list[tuple[int, ...]]]:
        data = module(corpus["prefix"], micro_batch_size=1, global_batch_size=8)
        with mock.patch.object(base_module, "data_parallel_size_and_rank", return_value=(size, rank)):
            data.setup("fit")
        return [[tuple(s.tolist()) for s in b["tokens"].reshape(-1, SEQ)] for b in data.train_dataloader()]

    (one,) = [batches(1, 0)]
    ranks = [batches(dp, rank) for rank in range(dp)]
    assert all(len(r) == len(one) for r in ranks)
    for step, full in enumerate(one):
        shares = [r[step] for r in ranks]
        assert all(len(share) == 8 // dp for share in shares)
        assert sorted(itertools.chain(*shares)) == sorted(full)


# ---------------------------------------------------------------------------------------------- refused
def test_a_text_corpus_is_refused(tmp_path: Path) -> None:
    chats = conversations(20)
    for kind in ("text", None):
        prefix = chat_corpus(tmp_path / f"text-{kind}", chats, kind=kind)
        with pytest.raises(ValueError, match=r"is a pretraining \(text\) corpus, made without --chat"):
            module(prefix).setup("fit")


def test_a_missing_or_wrong_loss_mask_is_refused(tmp_path: Path) -> None:
    chats = conversations(20)
    tokens = sum(len(ids) for ids, _ in chats)
    prefix = chat_corpus(tmp_path / "nomask", chats)
    loss_mask_path(prefix).unlink()
    with pytest.raises(ValueError, match=r"cannot be used for fine-tuning: .*loss mask .*nomask\.loss_mask\.bin"):
        module(prefix).setup("fit")
    prefix = chat_corpus(tmp_path / "replaced", chats)
    loss_mask_path(prefix).write_bytes(b"\x01" * (tokens - 3))  # not the mask the sidecar was bound to
    with pytest.raises(ValueError, match=r"cannot be used for fine-tuning: .*describes a .*-byte loss mask"):
        module(prefix).setup("fit")
    # Bound by its sidecar, yet not one byte per token, or not 0/1: damaged when written.
    prefix = chat_corpus(tmp_path / "short", chats, mask=b"\x01" * (tokens - 3))
    with pytest.raises(ValueError, match=rf"has {tokens - 3:,} bytes but the \.bin holds {tokens:,} tokens"):
        module(prefix).setup("fit")
    prefix = chat_corpus(tmp_path / "seven", chats, mask=b"\x01" * (tokens - 1) + b"\x07")
    with pytest.raises(ValueError, match=rf"holds 7 at token {tokens - 1}: a loss mask holds 0 .* and 1"):
        check_chat_corpus(prefix, VOCAB)


def test_conversations_longer_than_the_samples_are_refused(tmp_path: Path) -> None:
    chats = [*conversations(20), ([1] + [600] * SEQ + [601], [0] + [1] * (SEQ + 1))]
    prefix = chat_corpus(tmp_path / "long", chats)
    with pytest.raises(ValueError, match=rf"1 conversations .* longer than data.seq_length \+ 1 = {SEQ + 1}"):
        module(prefix).setup("fit")
    module(prefix, seq_length=SEQ + 1).setup("fit")  # n tokens fill n - 1 positions


def test_conversations_without_answers_are_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    chats = conversations(40)
    silent = [(ids, [0] * len(ids)) for ids, _ in conversations(5, seed=1)]
    prefix = chat_corpus(tmp_path / "some", chats + silent)
    data = module(prefix, train_samples=GBS)
    with caplog.at_level("INFO"):
        data.setup("fit")
    assert "5 without an answer token left out" in caplog.text
    assert data.train_packing is not None and data.val_packing is not None
    assert len(data.train_packing.conversations) + len(data.val_packing.conversations) == 40
    prefix = chat_corpus(tmp_path / "none", silent)
    with pytest.raises(ValueError, match=r"No conversation .* has an answer token"):
        module(prefix).setup("fit")


def test_settings_sft_cannot_train_with_are_refused(corpus: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SFTDataModule always masks documents"):
        module(corpus["prefix"], document_masking=False)
    with pytest.raises(ValueError, match="gives weights: SFTDataModule pools"):
        module([0.5, corpus["prefix"], 0.5, corpus["prefix"]])
    with pytest.raises(ValueError, match=r"Split '1000,1,0' of 300 conversations gives the validation split none"):
        module(corpus["prefix"], split="1000,1,0").setup("fit")


def test_settings_without_document_masking_kernels_are_refused_without_advising_to_turn_it_off(
    corpus: dict[str, Any],
) -> None:
    from types import SimpleNamespace

    data = module(corpus["prefix"])
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        lightning_module=SimpleNamespace(arch=SimpleNamespace(transformer_impl="local", attention_backend="auto")),
        precision_plugin=SimpleNamespace(fp8_attention=True, fp8_active=True),
    )
    with pytest.raises(
        ValueError, match=r"SFTDataModule packs conversations.* transformer_impl: transformer_engine"
    ) as e:
        data.setup("fit")
    assert "fp8_attention: false" in str(e.value) and "document_masking: false" not in str(e.value)
    assert data.train_packing is None  # refused before the corpus was read


def test_a_corpus_of_llama_fp8_preprocess_learns_each_answer_and_its_end_of_turn(tmp_path: Path) -> None:
    """What ``llama-fp8 preprocess --chat`` writes (Llama 3's template) is what SFTDataModule reads: in every
    conversation the learned labels are exactly the assistant's text and the <|eot_id|> closing it, the inputs stop
    before the conversation's last token."""
    from lightning_llama_fp8.data import resolve_tokenizer
    from lightning_llama_fp8.data.preprocess import preprocess_chat

    records = [
        {"messages": [
            {"role": "system", "content": "Reverse the words."},
            {"role": "user", "content": f"alpha beta {i}"},
            {"role": "assistant", "content": f"{i} beta alpha"},
        ]} if i % 2 else {"prompt": f"Repeat {i}", "response": f"{i} {i}"}
        for i in range(40)
    ]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    preprocess_chat([tmp_path / "chats.jsonl"], tmp_path / "chat", max_seq_length=SEQ, progress=False)
    data = SFTDataModule(
        [str(tmp_path / "chat")], tokenizer="llama3", seq_length=SEQ, global_batch_size=2, micro_batch_size=1,
        train_samples=2, split="100,0,0", num_workers=0,
    )  # fmt: skip
    data.setup("fit")
    tokenizer = resolve_tokenizer("llama3").load()
    packed, dataset = data.train_packing, data.train_dataset
    assert packed is not None and dataset is not None and len(packed.conversations) == 40
    answers = []
    for index in range(packed.samples):
        sample = dataset.dataset.dataset[index]  # the packed samples, in packing order
        for begin, end in itertools.pairwise(sample["cu_seqlens"].tolist()):
            learned = sample["labels"][begin:end][sample["loss_mask"][begin:end].bool()].tolist()
            if learned:
                answers.append(tokenizer.decode(learned, skip_special_tokens=False))
                assert sample["labels"][end - 1] == tokenizer.token_to_id("<|eot_id|>")  # the last label ends it
    expected = [f"{i} beta alpha<|eot_id|>" if i % 2 else f"{i} {i}<|eot_id|>" for i in range(40)]
    assert sorted(answers) == sorted(expected)


def test_indexed_data_module_refuses_a_chat_corpus(corpus: dict[str, Any]) -> None:
    data = IndexedDataModule([corpus["prefix"]], seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS)
    with pytest.raises(ValueError, match=r"is a chat corpus \(llama-fp8 preprocess --chat\)"):
        data.check_files()


def test_the_packing_record_names_what_a_resume_needs(corpus: dict[str, Any], tmp_path: Path) -> None:
    data = module(corpus["prefix"])
    data.setup("fit")
    record = data.checkpoint_info()["sft_packing"]
    assert record["seq_length"] == SEQ and record["train_samples_per_epoch"] == data.train_packing.samples  # type: ignore[union-attr]
    data._check_recorded_data(tmp_path, {"sft_packing": record})
    with pytest.raises(ValueError, match=r"other packed samples .*seq_length 32 -> 64"):
        data._check_recorded_data(tmp_path, {"sft_packing": {**record, "seq_length": 32}})
    with pytest.raises(ValueError, match=r"not trained with SFTDataModule.*llama-fp8 convert.*model.init_weights"):
        data._check_recorded_data(tmp_path, {"train_index": [{"samples": 8, "seed": 1234}]})


def test_packed_split_with_nothing_has_fill_ratio_zero() -> None:
    empty = PackedSplit(numpy.zeros(0, dtype=numpy.int64), numpy.zeros(1, dtype=numpy.int64), SEQ, 0, 0)
    assert empty.samples == 0 and empty.fill_ratio == 0.0


# ---------------------------------------------------------------------------------------------- configs
SFT_CONFIGS = sorted((REPO_ROOT / "examples" / "configs").glob("llama3_8b_sft*.yaml"))


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=[p.name for p in SFT_CONFIGS])
def test_example_configs_plan_masked_documents_and_build_the_data(
    path: Path, corpus: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``llama-fp8 plan`` reads the SFT examples with document masking on (SFTDataModule always masks); LightningCLI
    parses them with a corpus given on the command line; their data section builds and packs that corpus."""
    from lightning_llama_fp8.cli import main
    from lightning_llama_fp8.cli.config_file import plan_from_config

    config = yaml.safe_load(path.read_text())
    assert config["data"]["class_path"] == "lightning_llama_fp8.SFTDataModule"
    assert "document_masking" not in config["data"]["init_args"]
    assert plan_from_config(config).document_masking
    config["trainer"]["strategy"]["init_args"]["context_parallel_size"] = 2
    with pytest.raises(ValueError, match=r"data.document_masking with context_parallel_size 2"):
        plan_from_config(config, gpus=8)

    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(path), "--data.data_path", f"[{corpus['prefix']}]", "--print_config"])
    assert excinfo.value.code in (0, None)
    assert corpus["prefix"] in capsys.readouterr().out

    settings = {**yaml.safe_load(path.read_text())["data"]["init_args"], "data_path": [corpus["prefix"]]}
    data = SFTDataModule(**{**settings, "train_samples": settings["global_batch_size"], "num_workers": 0})
    data.setup("fit")
    assert data.train_packing is not None and data.train_packing.samples >= 1
    assert data.val_dataset is not None and len(data.val_dataset) == settings["global_batch_size"]


# ---------------------------------------------------------------------------------------------- through Lightning
def _sft_fit(root: str, ckpt_path: str | None, prefix: str, max_steps: int, **options: Any) -> dict[str, Any]:
    """A fit of a module that records its batches and computes the model's per-token loss (``masked_token_loss`` on
    ``forward_inputs``, as ``LlamaLightningModule`` does) of a stand-in output: 1 for every label that is no answer
    token, 0 for an answer. Returns the batches seen, the losses and token counts, and the error."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llama_fp8.model import forward_inputs, masked_token_loss
    from tests.helpers.distributed import allow_dist_checkpointing_on_cpu
    from tests.helpers.trainers import megatron_cpu_trainer

    allow_dist_checkpointing_on_cpu()

    class AnswerLoss(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.init_weights = "pretrained"  # a fine-tuning run: no warning about random weights
            self.seen: list[list[int]] = []
            self.losses: dict[str, list[tuple[float, int]]] = {"train": []}
            self.validations: list[list[tuple[float, int]]] = []

        def step(self, batch: dict[str, Any], name: str) -> torch.Tensor:
            total, tokens = torch.zeros(()), torch.zeros((), dtype=torch.int)
            for micro in range(batch["tokens"].shape[0]):
                inputs, loss_mask = forward_inputs({k: v[micro] for k, v in batch.items()}, None)
                assert inputs["packed_seq_params"].qkv_format == "thd"
                per_token = (inputs["labels"] < ANSWER_IDS).float()  # the stand-in model's per-token loss
                loss, count, _ = masked_token_loss(loss_mask, per_token)
                total, tokens = total + loss, tokens + count
            (self.losses["train"] if name == "train" else self.validations[-1]).append((float(total), int(tokens)))
            return total + (self.weight**2).sum()

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            self.seen.append([hash(tuple(s.tolist())) for s in batch["tokens"].reshape(-1, SEQ)])
            return self.step(batch, "train")

        def on_validation_epoch_start(self) -> None:
            self.validations.append([])

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            self.step(batch, "val")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = module(prefix, train_samples=None, seed=options.pop("seed", 1234))
    answer = AnswerLoss()
    saver = ModelCheckpoint(dirpath=Path(root, "ckpts"), every_n_train_steps=4, save_top_k=-1)
    trainer = megatron_cpu_trainer(
        1, enable_checkpointing=True, callbacks=[saver], max_steps=max_steps, val_check_interval=4,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, **options,
    )  # fmt: skip
    error = None
    try:
        trainer.fit(answer, datamodule=data, ckpt_path=ckpt_path)
    except Exception as err:
        error = (type(err).__name__, str(err))
    expected = {
        "train": data.train_packing.answer_tokens if data.train_packing else None,
        "val": data.val_packing.answer_tokens if data.val_packing else None,
    }
    return {
        "seen": answer.seen, "train": answer.losses["train"], "validations": answer.validations, "answers": expected,
        "error": error,
    }  # fmt: skip


def _sft_fits(rank: int, world_size: int, runs: list[tuple[str | None, dict[str, Any]]], root: str) -> list[Any]:
    return [_sft_fit(root, ckpt_path, **options) for ckpt_path, options in runs]


@pytest.mark.multiprocess
def test_fit_learns_answers_only_and_resumes_with_the_next_batch(corpus: dict[str, Any], tmp_path: Path) -> None:
    """Through Lightning and MegatronCPStrategy: every training and validation loss counts answer tokens only (the
    stand-in loss is 1 on any other label, so it stays 0) and validation counts all of its split's answer tokens; a
    run resumed at step 4 trains on what the uninterrupted run trained on at steps 4-7, then goes on."""
    prefix = corpus["prefix"]
    (first, resumed, refused) = run_distributed(
        _sft_fits,
        1,
        tmp_path / "workers",
        [
            (None, {"prefix": prefix, "max_steps": 8}),
            (str(tmp_path / "ckpts" / "epoch=0-step=4.ckpt"), {"prefix": prefix, "max_steps": 12}),
            (str(tmp_path / "ckpts" / "epoch=0-step=4.ckpt"), {"prefix": prefix, "max_steps": 12, "seed": 5}),
        ],
        str(tmp_path),
    )[0]
    assert first["error"] is None and resumed["error"] is None, (first["error"], resumed["error"])
    assert len(first["seen"]) == 8 and len(resumed["seen"]) == 8
    assert resumed["seen"][:4] == first["seen"][4:8]
    for run in (first, resumed):
        assert all(loss == 0.0 and tokens > 0 for loss, tokens in run["train"])
        assert len(run["validations"]) == 2  # at steps 4 and 8 (12)
        for validation in run["validations"]:
            assert all(loss == 0.0 for loss, _ in validation)
            assert sum(tokens for _, tokens in validation) == run["answers"]["val"]
    assert refused["error"] is not None and "seed" in refused["error"][1]
