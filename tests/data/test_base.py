"""What every data module shares (data/base.py): resuming at the right sample, refusing a changed seed or too few
samples, the validation interval."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint.info import read_checkpoint_info
from lightning_llama_fp8.data import check_split_sizes
from tests.helpers.corpora import write_corpus
from tests.helpers.fits import GBS, SEQ, VOCAB, assert_refused_before_building, run_fits


@pytest.mark.multiprocess
def test_resume_with_a_larger_max_steps_continues_the_same_samples(tmp_path: Path) -> None:
    """A corpus of ~80 samples per epoch: a 30-step run (GBS 4, 120 samples) spans two epochs, a 60-step one three,
    and Megatron shuffles all epochs' documents together, so a fresh 60-step run orders every sample differently.
    Resumed at step 20 with max_steps=60, the run must see the 30-step run's steps 20-29, then go on (its first
    index has whole epochs: ~160 samples; the rest comes from a further index)."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 50, 0, VOCAB, seed=3)
    common = {"corpus": str(corpus), "every": 10}
    first, fresh_longer, resumed = run_fits(
        tmp_path,
        (None, {**common, "max_steps": 30}),
        (None, {**common, "max_steps": 60, "dirpath": tmp_path / "other"}),
        (str(tmp_path / "ckpts" / "epoch=0-step=20.ckpt"), {**common, "max_steps": 60}),
    )
    for run in (first, fresh_longer, resumed):
        assert run["error"] is None, run["error"]
    assert len(first["seen"]) == 30 and len(resumed["seen"]) == 40 and resumed["step"] == 60
    assert fresh_longer["seen"][20:30] != first["seen"][20:30]  # what the resume used to train on
    assert resumed["seen"][:10] == first["seen"][20:30]  # the samples the interrupted run would have seen next
    first_index = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=20.ckpt").data["train_index"]
    assert first_index == [{"samples": 120, "seed": 1234}]
    extended = read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=60.ckpt").data["train_index"]
    assert extended[0] == first_index[0] and len(extended) == 2 and extended[1]["seed"] == 1235


def test_a_changed_data_seed_on_resume_is_refused(tmp_path: Path) -> None:
    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, seed=7)
    path = tmp_path / "step.ckpt"
    path.mkdir()
    (path / ckpt.INFO_FILENAME).write_text("{}")
    from unittest import mock

    from lightning_llama_fp8._compat import lightning as compat

    arguments = compat.CheckpointArguments(str(path), str(path), None)
    info = ckpt.CheckpointInfo(path, 2, 1, 1, 1, data={"train_index": [{"samples": 8, "seed": 1234}]})
    with (
        mock.patch.object(compat, "checkpoint_arguments", return_value=arguments),
        mock.patch.object(ckpt, "read_checkpoint_info", return_value=info),
    ):
        data.trainer = mock.Mock()  # type: ignore[assignment]
        with pytest.raises(ValueError, match=r"data.seed is 7, but checkpoint .* seed 1234.*data.seed=1234"):
            data._recorded_train_index()


@pytest.mark.multiprocess
def test_val_check_interval_larger_than_the_run_is_refused_before_the_data(tmp_path: Path) -> None:
    (refused,) = run_fits(tmp_path, (None, {"max_steps": 4, "val_check_interval": 10, "limit_val_batches": 1}))
    assert_refused_before_building(
        refused, "ValueError", r"val_check_interval \(10\) is larger than an epoch \(4 training"
    )
    assert not refused["data_built"] and "setup" not in refused["hooks"]
    from lightning_llama_fp8.data.base import check_val_check_interval

    check_val_check_interval(10, 4, 1.0, None, 1)  # counted over the run: allowed (it just never validates)
    check_val_check_interval(10, 4, 1.0, 1, 0)  # validation off


def test_train_samples_fewer_than_the_run_needs_are_reported() -> None:
    from unittest import mock

    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS, train_samples=8)
    data.trainer = mock.Mock(max_steps=10)  # type: ignore[assignment]
    with pytest.warns(UserWarning, match=r"reads the same 8 samples 5\.00 times over, in the same order"):
        assert data._resolve_train_samples(need_train=True) == 8


def test_epochs_cut_short_by_limit_train_batches_are_reported() -> None:
    """max_steps 6 with limit_train_batches 3 trained batches 1-3 twice and never read 4-6, unwarned."""
    from unittest import mock

    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(seq_length=SEQ, vocab_size=VOCAB, global_batch_size=GBS)
    data.trainer = mock.Mock(max_steps=6, limit_train_batches=3)  # type: ignore[assignment]
    with pytest.warns(UserWarning, match=r"every epoch reads the same 3 batches and batches 4-6 are never read"):
        data._warn_if_epochs_repeat(6)
    data.trainer = mock.Mock(max_steps=3, limit_train_batches=3)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data._warn_if_epochs_repeat(6)  # one epoch: nothing repeats


def test_resume_position_wraps_at_the_epoch_lightning_uses(tmp_path: Path) -> None:
    """With Trainer(limit_train_batches=2) an epoch is 2 batches however long the loader is: a checkpoint taken
    after 2 batches resumes at the start of the next epoch, one taken after 1 batch at batch 1."""
    from lightning_llama_fp8.data import ResumableDataLoader, ShardSampler

    data = list(range(16))
    sampler = ShardSampler(data, num_replicas=1, rank=0, batch_size=2)
    loader = ResumableDataLoader(
        data, batch_size=2, sampler=sampler, batches_done=lambda: 0, global_batch_size=2, epoch_length=lambda n: 2
    )
    loader.load_state_dict({"batches_done": 2, "global_batch_size": 2})
    assert [b.tolist() for b in loader][:2] == [[0, 1], [2, 3]]
    loader.load_state_dict({"batches_done": 1, "global_batch_size": 2})
    assert next(iter(loader)).tolist() == [2, 3]
    assert next(iter(loader)).tolist() == [0, 1]  # only the first pass after a resume starts part-way
    with pytest.raises(ValueError, match=r"trained with global_batch_size 8, this run has 2"):
        loader.load_state_dict({"batches_done": 1, "global_batch_size": 8})


def test_check_split_sizes_tiny_corpus_raises() -> None:
    # 10 sequences, split 99:1:0 -> validation gets sequences [round(9.9), round(10)) = [10, 10).
    with pytest.raises(ValueError, match=r"validation split zero sequences") as err:
        check_split_sizes(10, "99,1,0", [32, 8, 0])
    message = str(err.value)
    assert "10 sequences" in message and "[10, 10)" in message and "8 validation" in message


def test_check_split_sizes_normal_corpus_passes() -> None:
    check_split_sizes(MockGPTLowLevelDataset.size, "949,50,1", [1024, 80, 0])
    check_split_sizes(MockGPTLowLevelDataset.size, "99,1,0", [1024, 80, 0])  # 0 test samples: fine
    check_split_sizes(1000, "99,1", [1024, 80])  # megatron pads missing weights/sizes with 0


def test_check_split_sizes_other_failures() -> None:
    # A split with zero weight is never built, so requesting samples from it is an error.
    with pytest.raises(ValueError, match=r"test split weight 0.*5 test samples"):
        check_split_sizes(1000, "99,1,0", [8, 8, 5])
    # Positive weight but zero sequences hangs megatron even for 0 requested samples
    # (it asks for num_samples * seq_length + 1 tokens): 100 sequences, test = [round(99.9), 100).
    with pytest.raises(ValueError, match=r"test split zero sequences"):
        check_split_sizes(100, "949,50,1", [8, 8, 0])
    with pytest.raises(ValueError, match=r"Invalid split"):
        check_split_sizes(1000, "0,0,0", [8, 8, 0])


def test_check_split_sizes_refuses_a_split_of_empty_sequences() -> None:
    # Sequences with no token add nothing to an epoch: megatron-core would loop forever on this validation split.
    lengths = [5] * 9 + [0]
    with pytest.raises(ValueError, match=r"validation split only empty sequences \(sequence range \[9, 10\) holds"):
        check_split_sizes(10, "90,10,0", [8, 0, 0], lengths)
    check_split_sizes(10, "90,10,0", [8, 8, 0], [0] + [5] * 9)  # an empty sequence among others is fine
    with pytest.raises(ValueError, match=r"sequence_lengths has 9 entries for 10 sequences"):
        check_split_sizes(10, "90,10,0", [8, 8, 0], [5] * 9)


def test_the_constructor_refuses_numbers_that_are_not_what_they_look_like() -> None:
    from lightning_llama_fp8.data import MockDataModule

    with pytest.raises(ValueError, match=r"data\.seq_length must be a whole number >= 1; got -8; data\.global_batch_s"):
        MockDataModule(seq_length=-8, global_batch_size=0)
    with pytest.raises(ValueError, match=r"data\.micro_batch_size must be a whole number >= 1; got 1\.5, which has"):
        MockDataModule(micro_batch_size=1.5)
    with pytest.raises(ValueError, match=r"data\.num_workers must be a whole number >= 0; got -1\."):
        MockDataModule(num_workers=-1)
    data = MockDataModule(seq_length=256.0, global_batch_size=8.0, seed=7.0)  # integral floats, as YAML may give
    assert (data.seq_length, data.global_batch_size, data.seed) == (256, 8, 7) and type(data.seq_length) is int
