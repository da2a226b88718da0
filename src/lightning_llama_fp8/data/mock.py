"""Mock pretraining data: megatron-core's ``MockGPTDataset`` behind a Lightning ``LightningDataModule``.

The datasets are built exactly as Megatron-LM's ``pretrain_gpt.py --mock-data`` builds them (a
``GPTDatasetConfig`` with ``blend=None``, a ``null-text`` ``NullTokenizer``, and
``BlendedMegatronDatasetBuilder``), so that throughput and loss curves are comparable with the
Megatron-LM reference recipe. Batching, data-parallel shards and the resumable position are
:class:`~lightning_llama_fp8.data.base.GPTDataModule`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from lightning_llama_fp8.data.base import GPTDataModule, check_split_sizes

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

__all__ = ["MockDataModule"]


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with a given prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _quiet_mock_cache_warning() -> Iterator[None]:
    """Silence megatron's "Unable to save MockGPTDataset indexes" warning while building.

    Mock datasets have no ``path_to_cache`` on purpose (their indices take well under a second to
    build), so the warning, printed once per split, is expected noise rather than a problem.
    """
    gpt_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    drop = _DropMessage("Unable to save MockGPTDataset indexes")
    gpt_logger.addFilter(drop)
    try:
        yield
    finally:
        gpt_logger.removeFilter(drop)


class MockDataModule(GPTDataModule):
    """Synthetic Llama-3 pretraining data from megatron-core's ``MockGPTDataset``.

    Why mock data: it reproduces the Megatron-LM reference recipe (``--mock-data`` with a
    ``NullTokenizer``) for throughput and FP8-numerics work without shipping a corpus. Samples are
    ``tokens`` / ``labels`` (tokens shifted by one) / ``loss_mask`` / ``position_ids``, with token
    ids in ``[0, vocab_size)``; the end-of-document id is ``vocab_size - 1``. Batch layout, data
    parallelism and sizes: see :class:`~lightning_llama_fp8.data.base.GPTDataModule`. ``split`` is
    passed through as Megatron-LM does, but megatron-core replaces it by ``"1,1,1"`` whenever the
    data are mock (``blend=None``), so it has no effect on the data. Its documents are 1 to 4095 tokens long, so
    ``document_masking`` has several per sample to separate.
    """

    def build_datasets(self, sizes: list[int]) -> tuple[Dataset, Dataset, GPTDatasetConfig, str]:
        """Megatron-LM's ``--mock-data``: builds on every rank, in well under a second, nothing written to disk."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset, MockGPTLowLevelDataset
        from megatron.core.tokenizers import MegatronTokenizer

        # Exactly Megatron-LM's --mock-data: MegatronTokenizer with the null-text library (its
        # NullTokenizer, eod = vocab_size - 1) and a GPTDatasetConfig with blend=None.
        tokenizer = MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null-text"}, vocab_size=self.vocab_size
        )
        config = GPTDatasetConfig(
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=None,
            split=self.split,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            inter_document_masking=self.document_masking,  # Megatron-LM's --dataloader-inter-document-masking
        )
        # config.split is now megatron's effective split ("1,1,1" for mock data), the one it splits by.
        check_split_sizes(MockGPTLowLevelDataset.size, config.split, sizes)
        with _quiet_mock_cache_warning():
            train_ds, val_ds, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()
        description = (
            f"mock data (vocab {self.vocab_size}, seed {self.seed}, effective split {config.split!r}, "
            f"data.split={self.split!r})"
        )
        return train_ds, val_ds, config, description
