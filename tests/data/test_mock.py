"""CPU tests for the mock-data LightningDataModule over megatron-core's MockGPTDataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset
from torch.utils.data import DistributedSampler

from lightning_llama_fp8.data import MockDataModule
from tests.helpers import cpu_trainer, megatron_cpu_trainer, run_distributed

SEQ, VOCAB, GBS, MBS = 128, 1000, 8, 2
KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _module(**overrides: object) -> MockDataModule:
    kwargs: dict[str, object] = dict(
        seq_length=SEQ,
        vocab_size=VOCAB,
        global_batch_size=GBS,
        micro_batch_size=MBS,
        train_samples=4 * GBS,
        val_samples=2 * GBS,
        num_workers=0,
    )
    kwargs.update(overrides)
    return MockDataModule(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted() -> MockDataModule:
    dm = _module()
    dm.setup("fit")
    return dm


def _first_batch(dm: MockDataModule) -> dict[str, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


def test_train_batch_layout_and_dtypes(fitted: MockDataModule) -> None:
    assert (fitted.dp_size, fitted.dp_rank, fitted.num_microbatches) == (1, 0, GBS // MBS)
    loader = fitted.train_dataloader()
    assert loader.batch_size == GBS and loader.drop_last
    assert len(loader) == 4  # train_samples / GBS: one DataLoader batch per optimizer step
    assert len(fitted.val_dataloader()) == 2
    batch = next(iter(loader))
    assert sorted(batch) == sorted(KEYS)  # attention_mask is not produced or kept
    for key in KEYS:
        assert batch[key].shape == (GBS // MBS, MBS, SEQ), key
    assert batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64
    assert batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(GBS // MBS, MBS, SEQ))
    assert torch.equal(batch["loss_mask"], torch.ones(GBS // MBS, MBS, SEQ))  # no padding, no EOD masking


def test_batch_is_megatron_samples_in_order(fitted: MockDataModule) -> None:
    """Micro-batch m, row j holds dataset sample m * MBS + j: megatron's shuffled order is kept."""
    batch = _first_batch(fitted)
    for i in range(GBS):
        sample = fitted.train_dataset[i]
        assert torch.equal(batch["tokens"][i // MBS, i % MBS], sample["tokens"])
        assert torch.equal(batch["labels"][i // MBS, i % MBS], sample["labels"])


def test_tokens_within_vocab_and_eod_is_last_id(fitted: MockDataModule) -> None:
    tokens = torch.stack([fitted.train_dataset[i]["tokens"] for i in range(len(fitted.train_dataset))])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB
    assert fitted.dataset_config is not None
    assert fitted.dataset_config.tokenizer.eod == VOCAB - 1  # NullTokenizer's end-of-document id


def test_labels_are_tokens_shifted_by_one(fitted: MockDataModule) -> None:
    batch = _first_batch(fitted)
    assert torch.equal(batch["labels"][..., :-1], batch["tokens"][..., 1:])
    # The last label is the sample's extra token: the next token of the underlying stream. Mock
    # documents count up by one (mod vocab) and end with the end-of-document id VOCAB - 1.
    tok, lab = batch["tokens"], batch["labels"]
    assert torch.all((lab == (tok + 1) % VOCAB) | (lab == VOCAB - 1) | (tok == VOCAB - 1))


def test_same_seed_same_batches_other_seed_differs(fitted: MockDataModule) -> None:
    again = _module()
    again.setup("fit")
    first, second = _first_batch(fitted), _first_batch(again)
    for key in KEYS:
        assert torch.equal(first[key], second[key]), key
    other = _module(seed=4321)
    other.setup("fit")
    assert not torch.equal(first["tokens"], _first_batch(other)["tokens"])


def test_global_batch_divisibility_error() -> None:
    dm = _module(global_batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"global_batch_size \(8\).*micro_batch_size \(3\).*size \(1\) = 3"):
        dm.setup("fit")
    assert dm.train_dataset is None  # validated before anything was built


@pytest.mark.parametrize("split", ["90,5,3,2", "98,-2,0", "a,b", "", "0,0"])
def test_malformed_split_is_refused_when_the_datamodule_is_made(split: str) -> None:
    # megatron-core would assert on four fields and read "98,-2,0" as 98,2,0.
    with pytest.raises(ValueError, match=r"Invalid split .*expected 1 to 3 comma-separated non-negative weights"):
        MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4, split=split)


def test_setup_rejects_tiny_mock_corpus_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron forces split 1,1,1 for mock data: 2 sequences leave validation with none."""
    monkeypatch.setattr(MockGPTLowLevelDataset, "size", 2)
    with pytest.raises(ValueError, match=r"'1,1,1' over 2 sequences gives the validation split zero"):
        _module().setup("fit")
    monkeypatch.setattr(MockGPTLowLevelDataset, "size", 3)  # one sequence per split is enough
    dm = _module()
    dm.setup("fit")
    assert _first_batch(dm)["tokens"].shape == (GBS // MBS, MBS, SEQ)


@pytest.mark.parametrize(
    "sizes,stage,message",
    [
        ({"train_samples": GBS - 1}, "fit", rf"train_samples \({GBS - 1}\) is less than one global batch"),
        ({"val_samples": 1}, "validate", r"val_samples \(1\) is less than one global batch"),
    ],
)
def test_fewer_samples_than_a_global_batch_are_refused(sizes: dict, stage: str, message: str) -> None:
    # Lightning would run zero steps and return as if it had trained or validated.
    with pytest.raises(ValueError, match=message):
        _module(**sizes).setup(stage)


def test_negative_workers_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match=r"data\.num_workers must be a whole number >= 0; got -1\."):
        _module(num_workers=-1)


def test_missing_max_steps_error_and_trainer_defaults() -> None:
    dm = _module(train_samples=None, val_samples=None)
    dm.trainer = cpu_trainer(max_epochs=1)  # max_steps stays -1
    with pytest.raises(ValueError, match=r"trainer.max_steps.*data.train_samples"):
        dm.setup("fit")

    dm = _module(train_samples=None, val_samples=None)
    dm.trainer = cpu_trainer(max_steps=3, limit_val_batches=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 * GBS and len(dm.train_dataloader()) == 3
    assert len(dm.val_dataset) == 2 * GBS  # limit_val_batches global batches
    dm = _module(train_samples=None, val_samples=None)
    dm.trainer = cpu_trainer(max_steps=3)  # limit_val_batches=1.0: the documented 10 global batches
    dm.setup("fit")
    assert len(dm.val_dataset) == 10 * GBS


def _dp_worker(rank: int, world_size: int) -> dict:
    """One DP rank: build the module under megatron's parallel_state and shard like Lightning."""
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # env:// set by run_distributed
    try:
        parallel_state.initialize_model_parallel(1, 1)
        dm = _module()
        dm.setup("fit")
        assert (dm.dp_size, dm.dp_rank, dm.num_microbatches) == (2, rank, GBS // (MBS * 2))

        loader = dm.train_dataloader()
        sampler = loader.sampler
        assert isinstance(sampler, DistributedSampler) and not sampler.shuffle  # Megatron's order, not Lightning's
        batches = list(loader)
        assert len(batches) == 4  # still one batch per optimizer step
        for batch in batches:
            assert batch["tokens"].shape == (GBS // (MBS * 2), MBS, SEQ)  # GBS / 2 samples per rank
        indices = list(sampler)
        first = [dm.train_dataset[i]["tokens"] for i in indices[: GBS // 2]]
        assert torch.equal(batches[0]["tokens"].reshape(-1, SEQ), torch.stack(first))

        # Every rank must hold the same dataset for the partition to be meaningful.
        fingerprint = torch.stack([dm.train_dataset[i]["tokens"] for i in range(GBS)]).sum(dim=1).tolist()
        gathered: list[object] = [None, None]
        dist.all_gather_object(gathered, {"indices": indices, "fingerprint": fingerprint})

        bad = _module(global_batch_size=6)  # 6 % (2 * 2) != 0 only because DP is 2
        try:
            bad.setup("fit")
            error = ""
        except ValueError as exc:
            error = str(exc)
        return {"gathered": gathered, "error": error}
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_data_parallel_ranks_get_distinct_halves(tmp_path: Path) -> None:
    # Spawned, not forked: forking a pytest process that already ran gloo/torch threads can deadlock.
    result = run_distributed(_dp_worker, 2, tmp_path)[0]
    rank0, rank1 = result["gathered"]
    assert rank0["fingerprint"] == rank1["fingerprint"]
    assert set(rank0["indices"]).isdisjoint(rank1["indices"])
    assert sorted(rank0["indices"] + rank1["indices"]) == list(range(4 * GBS))
    # Step 0 of both ranks together is exactly global batch 0 (samples 0..GBS-1).
    assert sorted(rank0["indices"][: GBS // 2] + rank1["indices"][: GBS // 2]) == list(range(GBS))
    assert "global_batch_size (6)" in result["error"] and "data-parallel size (2)" in result["error"]


def _samples_seen_through_lightning(rank: int, world_size: int) -> dict[str, list[list[int]]]:
    """Fit and validate a recording module under MegatronCPStrategy: which samples (by content) did this rank get?

    Everything Lightning does with the DataLoaders (sampler injection for training and validation) runs for real.
    """
    from lightning.pytorch import LightningModule

    def fingerprint(batch: dict[str, torch.Tensor]) -> list[int]:
        return [hash(tuple(sample.tolist())) for sample in batch["tokens"].reshape(-1, SEQ)]

    class SampleRecorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[str, list[list[int]]] = {"train": [], "val": []}

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.seen["train"].append(fingerprint(batch))
            return (self.weight**2).sum()

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            self.seen["val"].append(fingerprint(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    recorder, data = SampleRecorder(), _module()
    trainer = megatron_cpu_trainer(world_size, max_steps=2, num_sanity_val_steps=0)
    trainer.fit(recorder, datamodule=data)
    trainer.validate(recorder, datamodule=data, verbose=False)
    megatron_order = [hash(tuple(data.train_dataset[i]["tokens"].tolist())) for i in range(2 * GBS)]
    return {**recorder.seen, "megatron_order": [megatron_order[:GBS], megatron_order[GBS:]]}


@pytest.mark.multiprocess
def test_lightning_gives_each_dp_rank_its_share_of_every_global_batch(tmp_path: Path) -> None:
    """Through Lightning's own loops: DP2 ranks together see exactly one GPU's global batches, in Megatron's order
    (Lightning would otherwise reshuffle training data with a sampler of its own)."""
    (one_gpu,) = run_distributed(_samples_seen_through_lightning, 1, tmp_path / "dp1")
    rank0, rank1 = run_distributed(_samples_seen_through_lightning, 2, tmp_path / "dp2")
    assert [sorted(step) for step in one_gpu["train"]] == [sorted(step) for step in one_gpu["megatron_order"]]
    for split in ("train", "val"):
        assert len(one_gpu[split]) == len(rank0[split]) == len(rank1[split]) == 2
        for step, full in enumerate(one_gpu[split]):
            assert len(rank0[split][step]) == len(rank1[split][step]) == GBS // 2
            assert set(rank0[split][step]).isdisjoint(rank1[split][step])
            assert sorted(rank0[split][step] + rank1[split][step]) == sorted(full)
