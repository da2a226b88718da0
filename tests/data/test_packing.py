"""Document masking on the CPU (data/packing.py and the data modules): megatron-core's per-sample document boundaries
merged into one packed sequence per micro batch as Megatron-LM merges them, the packed-sequence parameters, the
batches of both data modules, what checkpoints record, and the settings refused before anything is built."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizer
from megatron.core.utils import flatten_batch_for_packed_sequences

from lightning_llama_fp8.data.packing import (
    check_document_masking,
    document_masking_problems,
    longest_document,
    merge_document_boundaries,
    packed_seq_params,
)

SEQ = 4096  # mock documents are 1 to 4095 tokens long: about three per sample


@pytest.fixture(scope="module")
def masked_samples() -> list[dict[str, Any]]:
    """Samples of megatron-core's mock dataset (documents of 1 to 4095 tokens) with inter_document_masking."""
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=SEQ,
        blend=None,
        split="1,1,1",
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=1000),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        inter_document_masking=True,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [32, 0, 0], lambda: True, config).build()
    return [train[index] for index in range(32)]


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_boundaries_are_megatron_lms_merge(masked_samples: list[dict[str, Any]], micro_batch_size: int) -> None:
    """The boundaries of a micro batch are those of Megatron-LM's pretrain_gpt.py (megatron-core's
    flatten_batch_for_packed_sequences over the stacked samples), for the samples of a real GPTDataset."""
    for start in range(0, len(masked_samples), micro_batch_size):
        samples = masked_samples[start : start + micro_batch_size]
        batch = {
            "tokens": torch.stack([sample["tokens"] for sample in samples]),
            "cu_seqlens": torch.stack([sample["cu_seqlens"] for sample in samples]),
            "max_seqlen": torch.stack([sample["max_seqlen"] for sample in samples]),
        }
        theirs = flatten_batch_for_packed_sequences(batch)
        ours = merge_document_boundaries([sample["cu_seqlens"] for sample in samples], SEQ)
        assert list(ours) == theirs["cu_seqlens"][0].tolist()
        assert longest_document(ours) == int(theirs["max_seqlen"][0])
        assert ours[-1] == micro_batch_size * SEQ


def test_samples_hold_several_documents(masked_samples: list[dict[str, Any]]) -> None:
    """The comparison above means something: most samples hold more than one document."""
    documents = [len(merge_document_boundaries([sample["cu_seqlens"]], SEQ)) - 1 for sample in masked_samples]
    assert sum(count > 1 for count in documents) > len(documents) // 2


def test_positions_restart_where_the_boundaries_say(masked_samples: list[dict[str, Any]]) -> None:
    for sample in masked_samples:
        boundaries = merge_document_boundaries([sample["cu_seqlens"]], SEQ)
        positions = sample["position_ids"].tolist()
        for begin, end in itertools.pairwise(boundaries):
            assert positions[begin:end] == list(range(end - begin))


def test_empty_documents_and_padding_are_dropped() -> None:
    first = torch.tensor([0, 3, 3, 8, 8, 8, 8, 8, 8], dtype=torch.int32)  # an empty document, then the padding
    second = torch.tensor([0, 8, 8, 8, 8, 8, 8, 8, 8], dtype=torch.int32)  # one document filling the sample
    assert merge_document_boundaries([first, second], 8) == (0, 3, 8, 16)
    assert merge_document_boundaries([second], 8) == (0, 8)


@pytest.mark.parametrize(
    "row,why",
    [
        ([1, 4, 8, 8], "does not start at 0"),
        ([0, 4, 6, 7], "never reaches seq_length 8"),
        ([0, 5, 4, 8], "decreases"),
    ],
)
def test_malformed_boundaries_are_refused(row: list[int], why: str) -> None:
    good = torch.tensor([0, 8, 8, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"Sample 1 of the micro batch .* {why}.*inter_document_masking=True"):
        merge_document_boundaries([good, torch.tensor(row, dtype=torch.int32)], 8)


def test_packed_seq_params_for_thd_attention() -> None:
    params = packed_seq_params((0, 5, 7, 16), torch.device("cpu"))
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == [0, 5, 7, 16]
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 9
    # No padding between documents without context parallelism: attention and RoPE use cu_seqlens itself.
    assert params.cu_seqlens_q_padded is None and params.cu_seqlens_kv_padded is None
    with pytest.raises(ValueError, match=r"must start at 0"):
        packed_seq_params((3, 8), torch.device("cpu"))


def test_settings_that_run_document_masking() -> None:
    assert document_masking_problems() == []
    for backend in ("auto", "fused", "flash", "unfused"):
        assert document_masking_problems(attention_backend=backend) == []
    check_document_masking(context_parallel_size=1, fp8_attention=False)


@pytest.mark.parametrize(
    "settings,names",
    [
        ({"context_parallel_size": 2}, ["context_parallel_size: 1", "2 x CP = 4 tokens"]),
        ({"transformer_impl": "local"}, ["transformer_impl: transformer_engine"]),
        ({"attention_backend": "local"}, ["attention_backend: auto, fused or flash"]),
        ({"fp8_attention": True}, ["fp8_attention: false", "not packed sequences"]),
    ],
)
def test_settings_that_cannot_run_are_named(settings: dict[str, Any], names: list[str]) -> None:
    (problem,) = document_masking_problems(**settings)
    assert all(name in problem for name in names), problem
    assert "data.document_masking: false" in problem
    with pytest.raises(ValueError, match=r"data\.document_masking"):
        check_document_masking(**settings)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as excinfo:
        check_document_masking(context_parallel_size=4, fp8_attention=True)
    assert "2 x CP = 8 tokens" in str(excinfo.value) and "fp8_attention: false" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------- the data modules
def _mock(document_masking: bool, **overrides: Any) -> Any:
    from lightning_llama_fp8.data import MockDataModule

    kwargs: dict[str, Any] = dict(
        seq_length=SEQ, vocab_size=1000, global_batch_size=4, micro_batch_size=2, train_samples=8, val_samples=4,
        num_workers=0, document_masking=document_masking,
    )  # fmt: skip
    return MockDataModule(**{**kwargs, **overrides})


def test_masked_batches_hold_the_same_samples_with_their_documents(caplog: pytest.LogCaptureFixture) -> None:
    """Masking changes what attends to what, not the data: the same tokens, labels and loss mask; positions restart
    at every document; each micro batch carries its documents' boundaries."""
    plain = _mock(False)
    plain.setup("fit")
    masked = _mock(True)
    with caplog.at_level("INFO"):
        masked.setup("fit")
    assert "Document masking on: each document of a packed sample attends only to itself" in caplog.text
    for name, loader in (("train", masked.train_dataloader), ("val", masked.val_dataloader)):
        unmasked = getattr(plain, f"{name}_dataloader")()
        for batch, reference in zip(loader(), unmasked, strict=True):
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(batch[key], reference[key]), (name, key)
            assert "cu_seqlens" not in reference
            assert len(batch["cu_seqlens"]) == batch["tokens"].shape[0]  # one per micro batch
            for micro, boundaries in enumerate(batch["cu_seqlens"]):
                positions = batch["position_ids"][micro].reshape(-1).tolist()
                assert boundaries[0] == 0 and boundaries[-1] == 2 * SEQ
                for begin, end in itertools.pairwise(boundaries):
                    assert positions[begin:end] == list(range(end - begin))
                # Every sample boundary is a document boundary too (documents never span samples in the batch).
                assert SEQ in boundaries


def test_indexed_boundaries_are_the_corpus_documents(tmp_path: Any) -> None:
    """Each document of the corpus holds one token id of its own, so the ids change exactly where documents meet:
    the boundaries the batch carries are those places (and the sample's ends)."""
    from lightning_llama_fp8 import IndexedDataModule
    from tests.helpers.corpora import megatron_corpus

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (200,), generator=generator).tolist()
    prefix = megatron_corpus(tmp_path / "docs", [[index + 1] * length for index, length in enumerate(lengths)])
    data = IndexedDataModule(
        str(prefix), seq_length=128, vocab_size=1000, global_batch_size=4, micro_batch_size=2, train_samples=16,
        val_samples=4, split="90,10,0", num_workers=0, document_masking=True,
    )  # fmt: skip
    data.setup("fit")
    for batch in data.train_dataloader():
        for micro, boundaries in enumerate(batch["cu_seqlens"]):
            tokens = batch["tokens"][micro].reshape(-1).tolist()
            changes = [i for i in range(1, len(tokens)) if tokens[i] != tokens[i - 1]]
            assert list(boundaries) == sorted({0, *changes, 128, 256})


def test_collate_refuses_samples_without_boundaries() -> None:
    from lightning_llama_fp8.data.base import MicrobatchCollate

    sample = {key: torch.zeros(8, dtype=torch.long) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    assert "cu_seqlens" not in MicrobatchCollate(1, 2)([sample, sample])
    with pytest.raises(ValueError, match=r"document_masking needs samples with 'cu_seqlens'.*inter_document_masking"):
        MicrobatchCollate(1, 2, document_masking=True)([sample, sample])


def test_document_masking_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"data.document_masking must be true or false; got 'yes'"):
        _mock("yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "plugin,arch,message",
    [
        ({"fp8_attention": True, "fp8_active": True}, {}, "fp8_attention: false"),
        ({}, {"attention_backend": "local"}, "attention_backend: auto, fused or flash"),
        ({}, {"transformer_impl": "local"}, "transformer_impl: transformer_engine"),
    ],
)
def test_setup_refuses_what_cannot_run_before_building(plugin: dict, arch: dict, message: str) -> None:
    from types import SimpleNamespace

    from lightning_llama_fp8.config import LlamaConfig

    data = _mock(True)
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        lightning_module=SimpleNamespace(arch=LlamaConfig(**arch)), precision_plugin=SimpleNamespace(**plugin)
    )
    with pytest.raises(ValueError, match=message):
        data.setup("fit")
    assert data.train_dataset is None and data.val_dataset is None


def test_fp8_attention_of_a_bf16_fallback_is_no_reason_to_refuse() -> None:
    from types import SimpleNamespace

    data = _mock(True)
    data.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(fp8_attention=True, fp8_active=False))  # type: ignore[assignment]
    data._check_document_masking()


def test_setup_refuses_context_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"context_parallel_size 2: .*multiple of 2 x CP = 4 tokens"):
        _mock(True)._check_document_masking()
    _mock(False)._check_document_masking()  # off: nothing to refuse


def test_checkpoints_record_it_and_a_changed_setting_is_logged(tmp_path: Any) -> None:
    import warnings
    from unittest import mock

    from lightning_llama_fp8._compat import lightning as compat
    from lightning_llama_fp8.checkpoint import info as ckpt

    assert _mock(True).checkpoint_info()["document_masking"] is True
    assert _mock(False).checkpoint_info()["document_masking"] is False
    path = tmp_path / "step.ckpt"
    path.mkdir()
    (path / ckpt.INFO_FILENAME).write_text("{}")
    arguments = compat.CheckpointArguments(str(path), str(path), None)
    for recorded, masking, logged in (
        ({"document_masking": False}, True, "(trained with document_masking=False) with document_masking=True"),
        ({"document_masking": True}, False, "tokens attend across document boundaries"),
        ({}, True, "trained with document_masking=False"),  # written before the setting was recorded: no masking
        ({"document_masking": True}, True, None),
        ({}, False, None),
    ):
        info = ckpt.CheckpointInfo(path, 2, 1, 1, 1, data={"train_index": [{"samples": 8, "seed": 1234}], **recorded})
        data = _mock(masking)
        data.trainer = mock.Mock()  # type: ignore[assignment]
        with (
            mock.patch.object(compat, "checkpoint_arguments", return_value=arguments),
            mock.patch.object(ckpt, "read_checkpoint_info", return_value=info),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            # The run goes on with the recorded samples either way.
            assert data._recorded_train_index() == [{"samples": 8, "seed": 1234}]
        messages = [str(warning.message) for warning in caught if "document_masking" in str(warning.message)]
        if logged is None:
            assert messages == []
        else:
            assert len(messages) == 1 and logged in messages[0] and "The samples and their order stay" in messages[0]
