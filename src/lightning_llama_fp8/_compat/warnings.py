"""Warnings of this package's dependencies that a user of this package cannot act on, filtered where they start.

Importing megatron-core and Transformer Engine prints a dozen warnings on every ``llama-fp8`` command, ``--help``
included; a GPU ``fit`` adds torch's, Lightning's and megatron-core's own (barrier device, model summary bit width,
pytree deprecation, GPTModel deprecation, DDP layout, TF32 advice), and Lightning one on every checkpointed run of a
manual-optimization module. Each filter below names the exact message and the module (or logger) that emits it, and
says why nothing is lost; everything else (this package's own warnings and errors, and any other message of the same
libraries) is shown as before. ``lightning_llama_fp8/__init__.py`` imports this module first, before anything imports
megatron-core or Transformer Engine, so the import-time ones are caught.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# (message regex, category, emitting module regex, why a user of this package cannot act on it)
DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"Transformer Engine and Apex are not installed\. Falling back to ",
        UserWarning,
        r"megatron\.core\.",
        # Four copies at import on a machine without TE (optimizer, clip_grads, FSDP mixed precision), `plan` and
        # `--help` included. Where TE is needed, this package says so itself, with how to install it: `llama-fp8
        # fit` before building anything, TEFP8Precision as FP8UnavailableError. (A BF16 run with the local layer spec
        # and no TE gets torch's Adam instead of TE's fused one, unannounced; README asks for TE.) Apex is not part
        # of this stack.
        "TE missing is reported by this package where it matters; Apex is not used",
    ),
    (
        r"Apex is not installed\. Falling back to Torch Norm",
        UserWarning,
        r"megatron\.core\.models\.",
        # Megatron's local (non-TE) layer spec; Apex is not part of this stack and the TE spec is the default.
        "Apex is not used by this stack",
    ),
    (
        r"MimoModelConfig is experimental",
        UserWarning,
        r"megatron\.core\.models\.mimo\.",
        # get_megatron_optimizer imports Megatron's multimodal (MIMO) model only to check whether it was given one.
        "MIMO models are not used",
    ),
    (
        r"full scope is deprecated\. Use empty cuda_graph_modules",
        UserWarning,
        r"megatron\.core\.transformer\.transformer_config",
        # megatron-core 0.19.2 warns about its own default value (cuda_graph_modules="full") on every
        # TransformerConfig; CUDA graphs are off here (cuda_graph_impl="none").
        "megatron-core's own default value",
    ),
    (
        r"Transformer Engine cross entropy loss fusion has known stability issues",
        UserWarning,
        r"megatron\.core\.",
        # megatron-core 0.19.2 warns on every TransformerConfig with cross_entropy_fusion_impl="te", this package's
        # default with the TE layer spec. The issue it names (TE kept the logits' gradient in BF16) was fixed in
        # TE 2.18 (TE #3193, FP32 gradients); LlamaConfig.transformer_config refuses "te" with a TE older than
        # config.TE_CROSS_ENTROPY_MIN_VERSION (2.20.2, which also has #3273's bf16 logits + FP32 statistics), naming
        # the version, so the warning can only be stale where this package's configs print it.
        "LlamaConfig refuses the Transformer Engine versions it is about",
    ),
    (
        r"Detected a Jax installation but could not find the shared object file for the Transformer Engine Jax",
        RuntimeWarning,
        r"transformer_engine",
        # Only TE's PyTorch extension is used; a JAX installed beside it is no concern of this package.
        "only TE's PyTorch extension is used",
    ),
    (
        r"invalid escape sequence",
        SyntaxWarning,
        # Compile-time warnings carry the file path (without .py) as their module.
        r".*megatron[/\\]core[/\\]inference[/\\]contexts[/\\]kv_block_allocator",
        # A docstring in Megatron's inference code, printed when Python first compiles that file.
        "inference code, compiled once",
    ),
    (
        r"barrier\(\): using the device under current context\. You can specify `device_id` in `init_process_group`",
        UserWarning,
        # torch.distributed.barrier is wrapped by c10d_logger's exception logger, so that is the warning's module.
        r"torch\.distributed\.c10d_logger",
        # Emitted by barrier() calls without device_ids on an NCCL group not bound to a device: Megatron's
        # (dataset builder before training, distributed-checkpoint save at the end); MegatronCPStrategy.barrier
        # passes device_ids. Its concern, every rank falling back to GPU 0, cannot happen here: Lightning's
        # CUDAAccelerator.setup_device calls torch.cuda.set_device(this rank's GPU) before the process group starts.
        # Binding the group instead (init_process_group(device_id=...), as Lightning's DDPStrategy does) is not done:
        # it makes torch create every NCCL communicator of Megatron's ~20 parallel groups eagerly by ncclCommSplit
        # (GPU memory the measured runs and the plan do not include; split collectives that every rank must join),
        # and Megatron-LM itself does not bind it.
        "the current device is already this rank's GPU; the advice is for whoever calls init_process_group",
    ),
    (
        r"Precision transformer-engine-fp8 is not supported by the model summary\.",
        UserWarning,
        r"lightning\.pytorch\.utilities\.model_summary\.model_summary",
        # Lightning's summary knows only its own precision strings (a table inside the method, no way to add one).
        # A TEFP8Precision model has no one bit width to give it: BF16 weights (FP8 ones with fp8_param_gather), FP8
        # GEMM inputs cast per step by Transformer Engine, FP32 main weights in the distributed optimizer. The line
        # "Total estimated model params size (MB)" stays Lightning's estimate at 4 bytes per parameter.
        "Lightning's summary cannot be told the bit width of a TE FP8 model",
    ),
    (
        r"Could not determine rank from torch\.distributed, RANK, or SLURM_PROCID\. Defaulting to rank 0\.",
        UserWarning,
        r"megatron\.core\._rank_utils",
        # megatron-core 0.19.2 asks for the rank before each INFO line of its dataset code (log only on rank 0); the
        # corpus checks of `llama-fp8 fit` and the data modules open Megatron's IndexedDataset before
        # torch.distributed starts, on purpose (a bad corpus fails before anything is built), and DataLoader workers
        # open it where torch.distributed never starts. There the fallback decides only whether an INFO log line is
        # printed, never which data is read. The filter is process-wide: the same fallback in megatron-core's rerun
        # state machine or async checkpoint workers would be hidden too; only launcher variables (RANK) answer it.
        "decides only whether megatron-core prints an INFO line; the corpus checks run before distributed on purpose",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        # Lightning 2.6's CombinedLoader flattens batches with torch's LeafSpec, which torch 2.11 deprecates; it still
        # works the same (the deprecated class is a leaf TreeSpec), and only a Lightning release can change the call.
        "Lightning's own use of a torch API, unchanged in behaviour",
    ),
)

# (message regex, category, emitting module regex, why): torch.distributed.checkpoint's messages about the calls that
# megatron-core's torch_dist reader makes, on every resume (3 kinds, several copies each). Filtered only while
# megatron-core reads a checkpoint (megatron_checkpoint_read_warnings_filtered), so that the same messages about anyone
# else's calls of torch.distributed.checkpoint are still shown.
MEGATRON_CHECKPOINT_READ_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
        r"process",
        UserWarning,
        # Attributed to the wrapper torch puts around load (its decorators live in checkpoint/utils.py).
        r"torch\.distributed\.checkpoint\.utils",
        # megatron-core 0.19.2 passes no_dist=True on purpose (each rank reads the shards it needs and megatron-core
        # exchanges what is missing itself), and torch words that as if torch.distributed were down, while NCCL is up
        # and every rank loads.
        "megatron-core reads without torch's coordination on purpose; torch.distributed is up",
    ),
    (
        r"The argument order of load has been changed",
        UserWarning,
        r"torch\.distributed\.checkpoint\.logger",
        # megatron-core calls torch.distributed.checkpoint.load(state_dict, reader, ...) positionally.
        "megatron-core's call, which only megatron-core can change",
    ),
    (
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        FutureWarning,
        r"torch\.distributed\.checkpoint\.",
        # megatron-core's torch_dist format hands its shards to torch as ShardedTensor; torch's load planner then warns
        # on each one. Still the format megatron-core 0.19.2 writes and reads.
        "megatron-core's checkpoint format, which only megatron-core can migrate",
    ),
)


@contextmanager
def megatron_checkpoint_read_warnings_filtered() -> Iterator[None]:
    """While megatron-core reads a checkpoint: hide :data:`MEGATRON_CHECKPOINT_READ_WARNINGS` (the filters before are
    restored after, as ``warnings.catch_warnings`` does)."""
    with warnings.catch_warnings():
        for message, category, module, _why in MEGATRON_CHECKPOINT_READ_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


#: Lightning's ModelCheckpoint at the start of a fit, when its directory holds files. Meant for a new run writing into
#: another run's directory; said also when a run resumes into its own directory, where those files are its checkpoints.
CHECKPOINT_DIRECTORY_NOT_EMPTY_WARNING = "Checkpoint directory {} exists and is not empty."


@contextmanager
def own_checkpoint_directories_warning_filtered(directories: Iterable[str]) -> Iterator[None]:
    """Hide ModelCheckpoint's "Checkpoint directory ... exists and is not empty" for exactly ``directories`` (those a
    resumed run continues: ``checkpoint/resume.py``'s ``resumes_into``) while the block runs; the warning for any other
    directory (a new run writing where another run's checkpoints are) is shown as before."""
    with warnings.catch_warnings():
        for directory in directories:
            warnings.filterwarnings(
                "ignore",
                message=re.escape(CHECKPOINT_DIRECTORY_NOT_EMPTY_WARNING.format(directory)) + "$",
                category=UserWarning,
                module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
            )
        yield


# Lightning's ModelCheckpoint, for any module with manual optimization, on the first save of every run.
MANUAL_OPTIMIZATION_CHECKPOINT_WARNING = (
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was saved"
)


class _DropMessage(logging.Filter):
    """Drop log records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# (logger, message prefix): log records, not warnings.
DEPENDENCY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # torch logs this when it imports its C++-extension helper (megatron-core does, at import) on a machine that has a
    # CUDA toolkit but no GPU: the CPU-only commands (plan, --help, the pre-flight) need no CUDA runtime.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    # megatron-core 0.19.2 logs this once per process at the first distributed checkpoint save, synchronous ones
    # included (its synchronous save runs the same "mcore" writer in the foreground), asking for NVIDIA Resiliency
    # Extension instead: not part of this stack, so a user cannot act on it; MegatronCPStrategy(async_save=True)
    # uses megatron-core's own writer on purpose (checkpoint/background.py).
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # Once per run when the package builds the model: megatron-core 0.19.2 deprecates GPTModel in favour of its
    # HybridModel. LlamaLightningModule builds the GPTModel itself, so only this package can migrate.
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # MegatronCPStrategy wraps each model chunk in Megatron's DDP without a precomputed parameter layout, so DDP
    # computes it itself: DistributedOptimizer.compute_full_param_layout on the same parameters, the intra-instance
    # DP (and expert DP) group sizes and the bucket size DDP has just derived. Precomputing it here would mean
    # copying DDP's bucket-size rules (default from the DP group size, none without overlap_grad_reduce, none for
    # later chunks and PP ranks > 0) into the strategy, where a megatron-core upgrade could silently make the two
    # layouts differ; the fallback is by construction the layout DDP uses. Nothing a user can change.
    (
        "megatron.core.distributed.distributed_data_parallel",
        "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True",
    ),
    # Lightning's CUDA accelerator (lightning.fabric.accelerators.cuda) logs this through its rank-zero logger while
    # torch's float32 matmul precision is "highest". Every GEMM of this package's models takes BF16 or FP8 inputs
    # (BF16 parameters, Transformer Engine's cuBLASLt GEMMs; RoPE frequencies and the FP32 loss are elementwise), so
    # the setting it suggests changes no matmul here, and changing it globally is not this package's call.
    ("lightning.pytorch.utilities.rank_zero", "You are using a CUDA device ("),
)


def filter_dependency_warnings() -> None:
    """Install the filters above (idempotent: ``warnings.filterwarnings`` replaces an identical filter)."""
    for message, category, module, _why in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in DEPENDENCY_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def filter_manual_optimization_checkpoint_warning() -> None:
    """Silence ModelCheckpoint's warning for manual optimization, which is wrong for Megatron's optimizer step.

    Lightning warns that the checkpoint saved at step N holds the weights *after* the step's optimizer update, and
    suggests stashing the weights from before it. For ``LlamaLightningModule`` the weights after N updates are the
    right ones: one Lightning step is one whole Megatron iteration (forward, backward and Megatron's optimizer step
    inside ``training_step``; manual optimization only because Megatron's optimizer steps itself), the checkpoint
    records ``global_step=N``, and a resumed run continues with update N+1 (bitwise equal to an uninterrupted run,
    ``tests/gpu/test_checkpoint_resume.py``). Weights from before the update would be one step behind the step count.
    """
    warnings.filterwarnings(
        "ignore",
        message=MANUAL_OPTIMIZATION_CHECKPOINT_WARNING,
        category=UserWarning,
        module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
    )


filter_dependency_warnings()
