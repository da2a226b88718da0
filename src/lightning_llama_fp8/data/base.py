"""What every Megatron GPT-data DataModule here shares: batch layout, data-parallel shards, resumable position.

A subclass says which Megatron datasets to build (:meth:`GPTDataModule.build_datasets`); this module checks the
batch layout, works out how many samples each split needs, truncates the datasets to exactly that, and serves
them: one DataLoader batch is this data-parallel rank's share of one global batch, already split into
micro-batches (``[num_microbatches, micro_batch_size, seq_length]``) for the model's forward-backward schedule.

A resumed run sees the samples the interrupted one would have seen. Megatron's sample order depends on the number of
samples its index is built for (it decides how many epochs of documents are shuffled together), so a resume with a
larger ``trainer.max_steps`` would otherwise train on the order of a fresh, longer run: documents repeated or
skipped. The training index is therefore recorded in every checkpoint (:meth:`GPTDataModule.checkpoint_info`: the
sample counts and seeds it was built from) and rebuilt from that record on resume; a longer run appends a further
index (the next seed) after the recorded one instead of rebuilding it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from lightning_llama_fp8._compat import lightning as compat
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.data import packing
from lightning_llama_fp8.data.arguments import check_data_arguments
from lightning_llama_fp8.parallel.groups import data_parallel_size_and_rank
from lightning_llama_fp8.validate import as_bool

if TYPE_CHECKING:
    # megatron-core is imported where it runs: `llama-fp8 fit --help` and the config checks need none of it.
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

__all__ = [
    "BATCH_KEYS",
    "CU_SEQLENS_KEY",
    "GPTDataModule",
    "MicrobatchCollate",
    "ResumableDataLoader",
    "ShardSampler",
    "check_split_sizes",
]

_SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")

#: Keys of a ``GPTDataset`` sample that the model consumes. ``attention_mask`` is deliberately left
#: out: the fused attention kernels build the causal mask themselves, and a dense
#: ``[seq, seq]`` mask per sample would cost 64 MiB at seq 8192.
BATCH_KEYS: tuple[str, ...] = ("tokens", "labels", "loss_mask", "position_ids")
#: With document masking, the batch key of each micro batch's document boundaries (``data/packing.py``): a tuple of
#: ``num_microbatches`` tuples of Python ints, which stay on the host when Lightning moves the batch to the GPU.
CU_SEQLENS_KEY = "cu_seqlens"


def parse_split(split: str) -> list[float]:
    """The weights of a Megatron split string (``"949,50,1"``), refusing what megatron-core would misread.

    megatron-core picks the numbers out of the string (``"98,-2,0"`` reads as 98,2,0) and asserts on more than
    three; this reads the comma- (or slash-) separated fields strictly.
    """
    fields = [field.strip() for field in re.split(r"[,/]", split)]
    try:
        weights = [float(field) for field in fields]
    except ValueError:
        weights = []
    if not 0 < len(weights) <= len(_SPLIT_NAMES) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"Invalid split {split!r}: expected 1 to 3 comma-separated non-negative weights for "
            "train,validation,test with a positive sum, e.g. '949,50,1'."
        )
    return weights


def check_split_sizes(
    num_sequences: int,
    split: str,
    requested_samples: Sequence[int],
    sequence_lengths: Sequence[int] | None = None,
) -> None:
    """Fail fast where megatron-core's dataset builder would hang or silently build nothing.

    ``BlendedMegatronDatasetBuilder`` splits a corpus by what ``GPTDataset.numel_low_level_dataset`` counts: its
    *sequences* (one per document, or one per sentence of a ``--split-sentences`` corpus; an empty document has
    none), not its documents. Split ``i`` gets the sequences ``[round(lo_i * N), round(hi_i * N))``, where
    ``(lo_i, hi_i)`` are the cumulative, normalised ``split`` weights (``convert_split_vector_to_split_matrix``). A
    split with positive weight whose sequences hold no token (none, or only empty ones) makes
    ``GPTDataset._get_num_epochs`` loop forever adding zero-token epochs in search of
    ``num_samples * seq_length + 1`` tokens. That holds even for ``num_samples == 0`` (the "+1" is the extra label
    token), so such a split is rejected whatever is requested from it. A split with zero weight is not built at all
    (megatron returns ``None``), which is fine only when nothing is requested from it.

    Args:
        num_sequences: Elements megatron-core splits: sequences of the corpus's index (for mock data,
            ``MockGPTLowLevelDataset.size``).
        split: Megatron split string, e.g. ``"949,50,1"``: up to three non-negative weights for
            train, validation and test; missing ones count as 0. Use the *effective* split, i.e.
            ``GPTDatasetConfig(...).split`` (megatron replaces it by ``"1,1,1"`` for mock data).
        requested_samples: Samples requested per split, ``[train, validation, test]``; missing
            entries count as 0.
        sequence_lengths: The tokens of each sequence (``num_sequences`` of them), to also refuse a split whose
            sequences are all empty; ``None``: every sequence holds tokens.

    Raises:
        ValueError: If the split string is malformed, or a split would get no token while
            megatron builds it or samples are requested from it. The message names the split,
            the numbers and how to fix it.
    """
    parse_split(split)
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0, got {num_sequences}.")
    if sequence_lengths is not None and len(sequence_lengths) != num_sequences:
        raise ValueError(f"sequence_lengths has {len(sequence_lengths)} entries for {num_sequences} sequences.")
    if len(requested_samples) > len(_SPLIT_NAMES):
        raise ValueError(
            f"requested_samples has {len(requested_samples)} entries; at most 3 (train, validation, test)."
        )
    requested = list(requested_samples) + [0] * (len(_SPLIT_NAMES) - len(requested_samples))

    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bookends, wanted in zip(_SPLIT_NAMES, matrix, requested, strict=True):
        if wanted < 0:
            raise ValueError(f"Requested {wanted} {name} samples; sample counts must be >= 0.")
        no_samples = (  # how a run asks for none
            "set data.val_samples: 0 or trainer.limit_val_batches: 0"
            if name == "validation"
            else f"request 0 {name} samples"
        )
        if bookends is None:
            if wanted > 0:
                raise ValueError(
                    f"Split {split!r} gives the {name} split weight 0, so megatron-core builds no "
                    f"{name} dataset, yet {wanted} {name} samples are requested. Give {name} a positive "
                    f"weight in `split`, or {no_samples}."
                )
            continue
        lo, hi = bookends
        # BlendedMegatronDatasetBuilder's int(round(...)); Python's round() already returns an int
        # and rounds half to even, exactly like megatron's.
        begin = round(lo * float(num_sequences))
        end = round(hi * float(num_sequences))
        fraction = hi - lo
        needed = math.ceil(1.0 / fraction)
        then = f" (then {no_samples})" if wanted > 0 else ""
        hangs = (
            f"while {wanted} {name} samples are requested from it; megatron-core's dataset builder would loop forever "
            "looking for tokens (it does so even for 0 requested samples, because it always asks for one extra label "
            f"token). Fix: change `split` so that {name} gets either weight 0{then} or"
        )
        if end - begin <= 0:
            raise ValueError(
                f"Split {split!r} over {num_sequences} sequences gives the {name} split zero sequences (sequence "
                f"range [{begin}, {end}), fraction {fraction:.4g}) {hangs} at least one sequence, or use a corpus of "
                f"at least ~{needed} sequences."
            )
        # any() stops at the first sequence with tokens: the whole range is read only when it is all empty.
        if sequence_lengths is not None and not any(int(n) for n in sequence_lengths[begin:end]):
            raise ValueError(
                f"Split {split!r} over {num_sequences} sequences gives the {name} split only empty sequences "
                f"(sequence range [{begin}, {end}) holds no token) {hangs} sequences that hold tokens, or re-create "
                "the corpus without empty sequences."
            )


def check_val_check_interval(
    interval: Any, train_batches: int, limit_train_batches: Any, check_val_every_n_epoch: Any, limit_val_batches: Any
) -> None:
    """Lightning's check that an ``int`` ``val_check_interval`` fits in an epoch of ``train_batches`` (cut by
    ``limit_train_batches``), so it can be made before the datasets (and the model) are built instead of when the
    training loop starts; ``None`` arguments mean Lightning's defaults."""
    batches = epoch_length(train_batches, 1.0 if limit_train_batches is None else limit_train_batches)
    validates = limit_val_batches is None or limit_val_batches > 0
    if (
        isinstance(interval, int)
        and not isinstance(interval, bool)
        and interval > batches
        and check_val_every_n_epoch is not None
        and validates
    ):
        raise ValueError(
            f"trainer.val_check_interval ({interval}) is larger than an epoch ({batches} training batches), which "
            f"Lightning refuses once the model is built. Set val_check_interval <= {batches}, or "
            "check_val_every_n_epoch: null to count it over the whole run."
        )


def epoch_length(batches: int, limit_train_batches: int | float) -> int:
    """Batches per epoch out of ``batches``, after ``Trainer(limit_train_batches=...)`` (int or fraction)."""
    if isinstance(limit_train_batches, int):  # Lightning counts True as 1 batch, as here
        return min(batches, int(limit_train_batches))
    return int(batches * float(limit_train_batches))


class MicrobatchCollate:
    """Stack ``GPTDataset`` samples into ``[num_microbatches, micro_batch_size, seq_length]`` tensors.

    A small class rather than a closure so that DataLoader worker processes can pickle it.
    Sample ``j`` of the DataLoader batch lands in micro-batch ``j // micro_batch_size``, keeping
    Megatron's order within a global batch. ``attention_mask`` (and any other key) is dropped. With
    ``document_masking`` the batch also holds :data:`CU_SEQLENS_KEY`: each micro batch's document boundaries, its
    samples laid end to end (:func:`~lightning_llama_fp8.data.packing.merge_document_boundaries`).
    """

    def __init__(self, micro_batch_size: int, num_microbatches: int, document_masking: bool = False) -> None:
        """Store the batch layout.

        Args:
            micro_batch_size: Samples per micro-batch (one forward/backward pass).
            num_microbatches: Micro-batches per DataLoader batch (gradient accumulation steps).
            document_masking: also collate the samples' document boundaries (``cu_seqlens``).
        """
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.document_masking = document_masking

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Collate ``micro_batch_size * num_microbatches`` samples.

        Raises:
            ValueError: If the number of samples does not match the layout (a partial batch would
                silently change the effective global batch size), or, with document masking, a sample has no
                document boundaries.
        """
        expected = self.micro_batch_size * self.num_microbatches
        if len(samples) != expected:
            raise ValueError(
                f"Got {len(samples)} samples, expected micro_batch_size * num_microbatches = "
                f"{self.micro_batch_size} * {self.num_microbatches} = {expected}."
            )
        batch: dict[str, Any] = {
            key: torch.stack([sample[key] for sample in samples]).view(self.num_microbatches, self.micro_batch_size, -1)
            for key in BATCH_KEYS
        }
        if self.document_masking:
            batch[CU_SEQLENS_KEY] = self._document_boundaries(samples, batch["tokens"].shape[-1])
        return batch

    def _document_boundaries(self, samples: Sequence[dict[str, torch.Tensor]], seq_length: int) -> tuple[Any, ...]:
        from lightning_llama_fp8.data.packing import merge_document_boundaries

        if any(CU_SEQLENS_KEY not in sample for sample in samples):
            raise ValueError(
                f"document_masking needs samples with {CU_SEQLENS_KEY!r} (megatron-core's GPTDataset with "
                "inter_document_masking=True); these have only " + ", ".join(sorted(samples[0])) + "."
            )
        size = self.micro_batch_size
        return tuple(
            merge_document_boundaries([sample[CU_SEQLENS_KEY] for sample in samples[start : start + size]], seq_length)
            for start in range(0, len(samples), size)
        )

    def __repr__(self) -> str:
        """Show the layout (LightningCLI and debuggers print it)."""
        return (
            f"{type(self).__name__}(micro_batch_size={self.micro_batch_size}, num_microbatches={self.num_microbatches}"
            f"{', document_masking=True' if self.document_masking else ''})"
        )


class ShardSampler(DistributedSampler):
    """This data-parallel rank's samples in Megatron's order (no shuffling), optionally starting part-way.

    ``start_batch`` (set when resuming) skips that many of this rank's DataLoader batches in the next pass only;
    later passes (epochs) start from the beginning. The length stays that of a whole pass, which is what
    Lightning's epoch bookkeeping expects of a resumed loader.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size
        self.start_batch = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_batch = self.start_batch * self.batch_size, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores on resume.

    Lightning saves the ``state_dict()`` of a training loader that has one and hands it back through
    ``load_state_dict`` before iterating again. The position is the number of global batches trained in the
    current epoch, read from ``batches_done`` (the Trainer's count, not this loader's own: Lightning fetches a
    batch ahead, so the loader is always one batch further than training). A resumed run reads on with the next
    global batch, as Megatron-LM does with its consumed-samples counter.
    """

    def __init__(
        self,
        *args: Any,
        batches_done: Callable[[], int],
        global_batch_size: int,
        epoch_length: Callable[[int], int] = lambda batches: batches,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self.global_batch_size = global_batch_size
        self.epoch_length = epoch_length  # batches Lightning takes per epoch out of this loader's len()

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.batches_done()), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        saved_batch = int(state_dict["global_batch_size"])
        if saved_batch != self.global_batch_size:
            raise ValueError(
                f"The checkpoint was trained with global_batch_size {saved_batch}, this run has "
                f"{self.global_batch_size}: its data position ({state_dict['batches_done']} global batches into "
                f"the epoch) means other samples here. Resume with data.global_batch_size={saved_batch}."
            )
        if not isinstance(self.sampler, ShardSampler):
            raise TypeError("ResumableDataLoader needs a ShardSampler to resume part-way.")
        self.sampler.start_batch = int(state_dict["batches_done"]) % max(self.epoch_length(len(self)), 1)


def _pipeline_schedule_problems(num_microbatches: int) -> list[str]:
    """What Megatron's interleaved pipeline schedule (if this run has one) refuses about the micro batches per step."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return []
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if virtual is None:
        return []
    from lightning_llama_fp8.parallel.layout import ParallelLayout
    from lightning_llama_fp8.parallel.pipeline_layout import interleaved_schedule_problems

    layout = ParallelLayout(
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=virtual,
    )
    return interleaved_schedule_problems(layout, num_microbatches)


class GPTDataModule(LightningDataModule):
    """Base of the DataModules over Megatron's ``GPTDataset`` family; subclasses implement :meth:`build_datasets`.

    Batch layout: every DataLoader batch is this data-parallel rank's share of one global batch,
    ``micro_batch_size * num_microbatches`` samples with
    ``num_microbatches = global_batch_size // (micro_batch_size * dp_size)``, collated to tensors of
    shape ``[num_microbatches, micro_batch_size, seq_length]``. One batch is therefore one optimizer
    step; keep Lightning's ``accumulate_grad_batches`` at 1.

    Data parallelism: each DataLoader carries a non-shuffling ``DistributedSampler`` with
    ``num_replicas = DP size, rank = DP rank`` (tensor/context-parallel peers share a DP rank and so
    receive identical samples). Every rank builds the same datasets from the same seed, so the strided
    partition gives each DP rank distinct samples and together the DP ranks cover exactly one global
    batch per step, the same samples for every layout. The DP size is read from
    ``megatron.core.parallel_state`` in :meth:`setup`, so the strategy must initialise model
    parallelism in ``setup_environment`` (which Lightning runs before ``datamodule.setup``).

    Dataset sizes are ``[train_samples, val_samples, 0]``. Megatron builds at least that many
    samples (it rounds up to whole epochs); the datasets are then truncated to exactly the requested
    count, so ``len(train_dataloader())`` equals the number of optimizer steps and a validation run
    covers ``val_samples`` samples. Lightning restarts the validation iterator at each validation run,
    so every run scores the same samples; ``val_check_interval`` does not change how many are needed.

    Document masking (``document_masking=True``, Megatron-LM's ``--dataloader-inter-document-masking``): every
    training and validation sample is attended document by document, with positions restarting at each document,
    instead of under one causal mask over the whole packed sample (``data/packing.py``). The samples and their order
    are the same either way; each batch then also holds the micro batches' document boundaries
    (:data:`CU_SEQLENS_KEY`). Checked in :meth:`setup` against the layout, model and precision, recorded in
    checkpoints.
    """

    #: Whether a run may turn document masking off (refusals then offer it as a way out).
    document_masking_optional: ClassVar[bool] = True

    def __init__(
        self,
        seq_length: int = 8192,
        vocab_size: int = 128256,
        global_batch_size: int = 128,
        micro_batch_size: int = 1,
        train_samples: int | None = None,
        val_samples: int | None = None,
        split: str = "949,50,1",
        seed: int = 1234,
        num_workers: int = 2,
        document_masking: bool = False,
    ) -> None:
        """Store the configuration; datasets are built in :meth:`setup`, once parallelism is known.

        Args:
            seq_length: Tokens per sample (the model's sequence length).
            vocab_size: Token ids lie in ``[0, vocab_size)``; use the model's (unpadded) vocabulary.
            global_batch_size: Samples per optimizer step over all data-parallel ranks.
            micro_batch_size: Samples per forward/backward pass on one rank.
            train_samples: Training samples to build. ``None`` means
                ``trainer.max_steps * global_batch_size``, as Megatron-LM's ``train_iters * GBS``.
            val_samples: Validation samples to build. ``None`` means
                ``trainer.limit_val_batches * global_batch_size`` when ``limit_val_batches`` is an int (none when it
                is 0), else ``10 * global_batch_size`` (ten validation steps). ``0``: no validation
                (``val_dataloader`` returns no loader).
            split: Megatron split string (train,validation,test weights of the documents; of the sequences for
                indexed corpora, as megatron-core splits them).
            seed: Seed for megatron's document and sample shuffling; same seed, same batches.
            num_workers: DataLoader worker processes per rank (0 loads in the main process).
            document_masking: each document of a packed sample attends only to itself and its positions restart
                at 0 (Llama 3's document masking; Megatron-LM's ``--dataloader-inter-document-masking``). Off: one
                causal mask over the whole sample, as Megatron-LM trains by default. Not with context parallelism
                or FP8 attention (refused in :meth:`setup`, before anything is built).
        """
        super().__init__()
        self.save_hyperparameters()  # a subclass with arguments of its own calls it again from its __init__
        numbers = check_data_arguments(  # whole numbers in range, all refused at once (llama-fp8 plan: the same)
            dict(seq_length=seq_length, vocab_size=vocab_size, global_batch_size=global_batch_size,
                 micro_batch_size=micro_batch_size, train_samples=train_samples, val_samples=val_samples, seed=seed,
                 num_workers=num_workers)
        )  # fmt: skip
        self.seq_length: int = numbers["seq_length"]
        self.vocab_size: int = numbers["vocab_size"]
        self.global_batch_size: int = numbers["global_batch_size"]
        self.micro_batch_size: int = numbers["micro_batch_size"]
        self.train_samples: int | None = numbers["train_samples"]
        self.val_samples: int | None = numbers["val_samples"]
        parse_split(split)  # a malformed split fails here, not inside megatron-core's builder
        self.split = split
        self.seed: int = numbers["seed"]
        self.num_workers: int = numbers["num_workers"]
        self.document_masking: bool = as_bool(document_masking, "data.document_masking")

        self.dp_size: int = 1
        self.dp_rank: int = 0
        self.num_microbatches: int | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.dataset_config: GPTDatasetConfig | None = None
        #: The training index as built: ``[{"samples": n, "seed": s}, ...]``, one Megatron index each, in order
        #: (empty until a fit's setup). Recorded in checkpoints and rebuilt from them on resume.
        self.train_index: list[dict[str, int]] = []

    def build_datasets(self, sizes: list[int]) -> tuple[Dataset, Dataset, GPTDatasetConfig, str]:
        """Build the train and validation datasets with at least ``sizes`` = [train, validation, test] samples.

        Returns the two datasets, the ``GPTDatasetConfig`` used, and one line describing the data for the log.
        Raise ``ValueError`` (or ``FileNotFoundError``) with the fix for anything that cannot work.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ sizes and validation

    def _resolve_train_samples(self, need_train: bool) -> int:
        """Training samples: explicit, else ``max_steps * global_batch_size``."""
        if self.train_samples is not None:
            if self.train_samples < 0:
                raise ValueError(f"data.train_samples must be >= 0, got {self.train_samples}.")
            max_steps = self.trainer.max_steps if self.trainer is not None else -1
            if need_train and max_steps is not None and max_steps * self.global_batch_size > self.train_samples > 0:
                rank_zero_warn(
                    f"data.train_samples ({self.train_samples}) is fewer than trainer.max_steps x global_batch_size "
                    f"({max_steps} x {self.global_batch_size}): the run reads the same {self.train_samples} samples "
                    f"{max_steps * self.global_batch_size / self.train_samples:.2f} times over, in the same order. "
                    "Leave data.train_samples unset to build max_steps x global_batch_size samples."
                )
            return self.train_samples
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        if max_steps is None or max_steps < 0:
            if not need_train:
                return 0
            raise ValueError(
                f"{type(self).__name__} cannot tell how many training samples to build: trainer.max_steps is "
                f"{max_steps} (unlimited) and data.train_samples is None. Set trainer.max_steps "
                "(samples = max_steps * global_batch_size) or data.train_samples."
            )
        return max_steps * self.global_batch_size

    def _resolve_val_samples(self) -> int:
        """Validation samples: explicit, else none when ``limit_val_batches`` is 0 (no validation), else
        ``limit_val_batches`` (int) or 10 global batches."""
        if self.val_samples is not None:
            if self.val_samples < 0:
                raise ValueError(f"data.val_samples must be >= 0, got {self.val_samples}.")
            return self.val_samples
        if self._validation_off():
            return 0
        limit = self.trainer.limit_val_batches if self.trainer is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit * self.global_batch_size
        return 10 * self.global_batch_size

    def _validation_off(self) -> bool:
        """Whether the Trainer never validates: ``limit_val_batches`` 0 (or 0.0), as Lightning reads it."""
        limit = self.trainer.limit_val_batches if self.trainer is not None else None
        return limit is not None and not isinstance(limit, bool) and limit == 0

    # ------------------------------------------------------------------ LightningDataModule hooks

    def setup(self, stage: str | None = None) -> None:
        """Validate the batch layout, then build the datasets (:meth:`build_datasets`) and truncate them.

        Args:
            stage: Lightning stage; the training split is only mandatory for ``"fit"`` (or None).

        Raises:
            ValueError: On an invalid batch layout, an unknown number of training samples, or
                data that cannot give the requested samples.
        """
        self.dp_size, self.dp_rank = data_parallel_size_and_rank()
        for name, value in (
            ("seq_length", self.seq_length),
            ("vocab_size", self.vocab_size),
            ("global_batch_size", self.global_batch_size),
            ("micro_batch_size", self.micro_batch_size),
        ):
            if value <= 0:
                raise ValueError(f"data.{name} must be positive, got {value}.")
        if self.vocab_size < 2:
            raise ValueError(f"data.vocab_size must be >= 2 (one id is end-of-document), got {self.vocab_size}.")
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step != 0:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be divisible by micro_batch_size "
                f"({self.micro_batch_size}) * data-parallel size ({self.dp_size}) = {per_step}. "
                "Change data.global_batch_size or data.micro_batch_size (or the number of "
                "data-parallel ranks) so that it divides."
            )
        self.num_microbatches = self.global_batch_size // per_step
        problems = _pipeline_schedule_problems(self.num_microbatches)
        if problems:
            raise ValueError("data: " + problems[0])
        self._check_document_masking()

        need_train = stage in (None, "fit")
        train_samples = self._resolve_train_samples(need_train)
        val_samples = self._resolve_val_samples()
        # Fewer samples than one global batch make zero batches: fit or validate would end at once, silently.
        for name, samples in (("train", train_samples if need_train else None), ("val", val_samples or None)):
            if samples is not None and samples < self.global_batch_size:
                raise ValueError(
                    f"data.{name}_samples ({samples}) is less than one global batch ({self.global_batch_size}), so "
                    f"there would be no {name} step; request a multiple of data.global_batch_size."
                )
        if need_train:
            self._check_val_check_interval(train_samples // self.global_batch_size)
            self._warn_if_epochs_repeat(train_samples // self.global_batch_size)
        recorded = self._recorded_train_index() if need_train else None
        index = recorded or [{"samples": train_samples, "seed": self.seed}]
        train_ds, val_ds, config, description = self.build_datasets([index[0]["samples"], val_samples, 0])
        self.dataset_config = config
        if train_ds is not None and need_train:
            train_ds = self._extended_train_dataset(train_ds, index, train_samples)
        self.train_dataset = Subset(train_ds, range(train_samples)) if train_ds is not None else None
        self.val_dataset = Subset(val_ds, range(val_samples)) if val_ds is not None else None

        rank_zero_info(  # logs on global rank 0 only
            f"{type(self).__name__}: train {train_samples} / validation {val_samples} / test 0 samples "
            f"of {self.seq_length} tokens; {description}; global batch "
            f"{self.global_batch_size} = {self.num_microbatches} micro-batches x "
            f"{self.micro_batch_size} samples x {self.dp_size} DP ranks; DataLoader batch "
            f"[{self.num_microbatches}, {self.micro_batch_size}, {self.seq_length}] per DP rank."
            + (f" Document masking on: {packing.DESCRIPTION}." if self.document_masking else "")
        )

    def _check_document_masking(self) -> None:
        """Refuse document masking where no kernel runs it, before any dataset or model is built: context
        parallelism, Megatron's own attention, FP8 attention (``packing.document_masking_problems``)."""
        if not self.document_masking:
            return
        from megatron.core import parallel_state

        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        arch = getattr(module, "arch", None)
        plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
        cp = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        packing.check_document_masking(
            context_parallel_size=cp,
            transformer_impl=getattr(arch, "transformer_impl", "transformer_engine"),
            attention_backend=getattr(arch, "attention_backend", "auto"),
            # FP8 attention only where FP8 runs (a BF16 fallback has none).
            fp8_attention=bool(getattr(plugin, "fp8_attention", False) and getattr(plugin, "fp8_active", True)),
            masking_optional=self.document_masking_optional,
        )

    # ------------------------------------------------------------------ the same samples after a resume

    def _recorded_train_index(self) -> list[dict[str, int]] | None:
        """The training index recorded in the checkpoint this fit resumes from (None: a new run, or a checkpoint
        without one: not this package's, or written before indices were recorded). Logs a change of
        ``document_masking`` against the checkpoint's."""
        arguments = compat.checkpoint_arguments(self.trainer) if self.trainer is not None else None
        path = None if arguments is None or arguments.resolved is None else Path(arguments.resolved)
        if path is None or not (path / ckpt.INFO_FILENAME).is_file():
            return None
        data = ckpt.read_checkpoint_info(path).data
        recorded = data.get("train_index")
        if recorded and recorded[0]["seed"] != self.seed:
            raise ValueError(
                f"data.seed is {self.seed}, but checkpoint {path} was trained on samples shuffled with seed "
                f"{recorded[0]['seed']}: resuming would train on another order of the data. Resume with "
                f"data.seed={recorded[0]['seed']}, or start a new run."
            )
        self._check_recorded_data(path, data)
        self._note_document_masking_change(path, data)
        if not recorded:
            return None
        return [{"samples": int(part["samples"]), "seed": int(part["seed"])} for part in recorded]

    def _check_recorded_data(self, path: Path, recorded: dict[str, Any]) -> None:
        """Raise ``ValueError`` if this run cannot continue the data of checkpoint ``path`` (``recorded``: its
        :meth:`checkpoint_info`); a subclass with more to compare than the seed overrides it."""

    def _note_document_masking_change(self, path: Path, recorded: dict[str, Any]) -> None:
        """Say, once, when this run resumes ``path`` with ``document_masking`` changed; the run goes on.

        Allowed rather than refused: the samples, their order, the weights and the optimizer state are the same
        either way, only what each token attends to (and its RoPE position) changes from the next step on, so the
        loss may jump there. A deliberate switch (e.g. masking only for a later phase of training) is a reason to
        resume, not a mistake to stop. Checkpoints from before the setting was recorded trained without masking.
        """
        before = bool(recorded.get("document_masking", False))
        if before == self.document_masking:
            return
        rank_zero_warn(
            f"Resuming {path} (trained with document_masking={before}) with document_masking={self.document_masking}: "
            + (
                f"from the next step on {packing.DESCRIPTION}"
                if self.document_masking
                else "from the next step on tokens attend across document boundaries within each sample and positions "
                "run across them (one causal mask per sample)"
            )
            + ". The samples and their order stay the same; expect the loss to move at the switch. Resume with "
            f"data.document_masking={before} to train as before."
        )

    def _extended_train_dataset(self, first: Dataset, index: list[dict[str, int]], train_samples: int) -> Dataset:
        """``first`` (built for ``index[0]``), followed by the rest of ``index`` and, if all of that holds fewer
        than ``train_samples`` samples, one more index for the remainder (the next seed: a new order of the data).
        Sets :attr:`train_index` to what was built."""
        parts = [first]
        for part in index[1:]:
            with self._seed_for_building(part["seed"]):
                parts.append(self.build_datasets([part["samples"], 0, 0])[0])
        index = list(index)
        available = sum(len(part) for part in parts)  # Megatron builds whole epochs: often more than asked for
        if available < train_samples:
            index.append({"samples": train_samples - available, "seed": self.seed + len(index)})
            with self._seed_for_building(index[-1]["seed"]):
                parts.append(self.build_datasets([index[-1]["samples"], 0, 0])[0])
            rank_zero_info(
                f"{type(self).__name__}: the training index of the resumed run holds {available} samples, this run "
                f"needs {train_samples}; the remaining {train_samples - available} follow from a further index "
                f"(seed {index[-1]['seed']})."
            )
        self.train_index = index
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    @contextmanager
    def _seed_for_building(self, seed: int) -> Iterator[None]:
        """:meth:`build_datasets` reads ``self.seed``; a further training index is built with its own."""
        previous, self.seed = self.seed, seed
        try:
            yield
        finally:
            self.seed = previous

    def _check_val_check_interval(self, train_batches: int) -> None:
        """Lightning's check that ``val_check_interval`` fits in an epoch, made before the datasets (and the
        model) are built instead of when the training loop starts."""
        trainer = self.trainer
        if trainer is not None:
            check_val_check_interval(
                trainer.val_check_interval,
                train_batches,
                trainer.limit_train_batches,
                trainer.check_val_every_n_epoch,
                trainer.limit_val_batches,
            )

    def _warn_if_epochs_repeat(self, train_batches: int) -> None:
        """Lightning starts every epoch at the loader's first batch: an epoch cut short by ``limit_train_batches`` in
        a run of more steps reads the same batches again, and the rest of the built ones never."""
        trainer = self.trainer
        max_steps = trainer.max_steps if trainer is not None else -1
        per_epoch = self._train_epoch_length(train_batches)
        if max_steps is not None and 0 < per_epoch < train_batches and max_steps > per_epoch:
            rank_zero_warn(
                f"trainer.limit_train_batches ({trainer.limit_train_batches}) makes an epoch {per_epoch} of the "
                f"{train_batches} global batches built, and trainer.max_steps ({max_steps}) runs "
                f"{max_steps / per_epoch:.2f} epochs: every epoch reads the same {per_epoch} batches and batches "
                f"{per_epoch + 1}-{train_batches} are never read. Leave limit_train_batches unset (max_steps ends the "
                "run)."
            )

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint records for resuming with the same samples (its ``lightning_llama_fp8.json``), and
        whether the run masked documents (a resume with it changed is logged)."""
        return {
            "global_batch_size": self.global_batch_size,
            "train_index": list(self.train_index),
            "document_masking": self.document_masking,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.checkpoint_info() if self.train_index else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint whose training index is not the start of the one built here (a safety net: setup
        already rebuilt the recorded one, from the checkpoint's info file)."""
        recorded = list(state_dict.get("train_index") or [])
        if self.train_index and recorded and self.train_index[: len(recorded)] != recorded:
            raise ValueError(
                f"The checkpoint's training data were built as {recorded}, this run built {self.train_index}: it "
                "would train on other samples than the checkpoint's run. Resume with the checkpoint's data settings."
            )

    def _dataloader(self, dataset: Dataset | None, name: str) -> DataLoader:
        """Build a DataLoader for one split, already sharded over data-parallel ranks in Megatron's order.

        The sampler is ours, not Lightning's: Lightning gives training loaders a *shuffling*
        DistributedSampler, which would reorder Megatron's (already shuffled) samples differently for
        every DP size. Sequential shards keep global batch k = samples [k*GBS, (k+1)*GBS) for any layout,
        as in Megatron-LM, and Lightning leaves a loader that already has a DistributedSampler alone.
        The training loader is resumable: a checkpoint records how far into the epoch training got.
        """
        if dataset is None or self.num_microbatches is None:
            raise RuntimeError(f"{type(self).__name__}.{name}_dataloader() called before setup().")
        batch_size = self.micro_batch_size * self.num_microbatches
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            sampler=ShardSampler(dataset, num_replicas=self.dp_size, rank=self.dp_rank, batch_size=batch_size),
            drop_last=True,  # a partial batch would change the effective global batch size
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),  # pinned host memory only helps (and works) with CUDA
            persistent_workers=self.num_workers > 0,  # avoid re-forking workers at every validation
            collate_fn=MicrobatchCollate(self.micro_batch_size, self.num_microbatches, self.document_masking),
        )
        if name != "train":
            return DataLoader(dataset, **kwargs)
        return ResumableDataLoader(
            dataset,
            batches_done=self._train_batches_done,
            global_batch_size=self.global_batch_size,
            epoch_length=self._train_epoch_length,
            **kwargs,
        )

    def _train_epoch_length(self, batches: int) -> int:
        """Batches per epoch out of ``batches``, after ``Trainer(limit_train_batches=...)`` (int or fraction)."""
        return epoch_length(batches, self.trainer.limit_train_batches if self.trainer is not None else 1.0)

    def _train_batches_done(self) -> int:
        """Training steps finished in the current epoch (Lightning's progress counter; 0 without a Trainer)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        """Training batches: this DP rank's ``[num_microbatches, micro_batch_size, seq]`` share."""
        return self._dataloader(self.train_dataset, "train")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches, laid out like the training ones; no loader (``[]``, which Lightning reads as "skip
        validation") once setup requested no validation samples (``val_samples: 0``, ``limit_val_batches: 0``)."""
        if self.num_microbatches is not None and (self.val_dataset is None or len(self.val_dataset) == 0):
            return []
        return self._dataloader(self.val_dataset, "val")
