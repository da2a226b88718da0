"""``MegatronCPStrategy``: Megatron-Core tensor, sequence, context, pipeline and data parallelism under Lightning.

What it does, in the order Lightning calls it:

1. ``setup_environment``: checks the precision plugin and the layout (before any process group exists), starts
   torch.distributed (one process per GPU, from ``torchrun`` or Lightning's own launcher), builds Megatron's
   ``parallel_state`` groups and seeds Megatron's model-parallel CUDA RNG.
2. The LightningModule's ``configure_model`` then builds the Megatron model, reading
   :meth:`transformer_config_kwargs` for the layout; with pipeline parallelism, this rank's model chunks
   (``parallel/pipeline.py``).
3. ``setup``: wraps every Megatron model (chunk) of the LightningModule in Megatron's ``DistributedDataParallel``
   (contiguous grad buffers, bucketed and optionally overlapped reduce-scatter, distributed optimizer; with
   Transformer Engine's weight-gradient accumulation fused into those buffers by default), builds the optimizer, and
   wires Megatron's schedule hooks (grad sync, loss scale, ``finalize_model_grads``) into the model config
   (``parallel/ddp.py``).

Lightning gets DP-aware ``reduce`` (over DP x CP), sampler settings (DP ranks only: TP and CP ranks of one
model replica read the same samples), an ``optimizer_step`` that runs Megatron's optimizer, and checkpoints in
Megatron's distributed format (``checkpoint/``): every rank writes its shards, and a
checkpoint reloads into another layout.

``Trainer(deterministic=True)`` makes runs bitwise reproducible: besides PyTorch's deterministic algorithms (which
the Trainer turns on) the strategy sets Megatron's ``deterministic_mode``, Transformer Engine's deterministic
attention backward and a deterministic NCCL algorithm, and refuses settings that contradict them before anything is
built (``parallel/determinism.py``).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_llama_fp8._compat import lightning as compat
from lightning_llama_fp8._compat.warnings import own_checkpoint_directories_warning_filtered
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint import preflight
from lightning_llama_fp8.checkpoint.hooks import StrategyCheckpointing
from lightning_llama_fp8.parallel import ddp, determinism
from lightning_llama_fp8.parallel.cuda_graphs import (
    CudaGraphCapture,
    CudaGraphSettings,
    callback_conflicts,
    prepare_environment,
)
from lightning_llama_fp8.parallel.layout import CPCommType, ParallelLayout, resolve_param_gather, validate_layout
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from lightning_llama_fp8.parallel.optimizer_precision import (
    AUTO,
    OptimizerPrecision,
    OptimizerPrecisionSettings,
    resolve_optimizer_precision,
    resumed_settings,
    transformer_engine_installed,
)
from lightning_llama_fp8.parallel.optimizer_precision import check_setting as check_optimizer_precision_setting
from lightning_llama_fp8.parallel.pipeline import pipeline_config_kwargs
from lightning_llama_fp8.parallel.pipeline_layout import largest_chunk_layers
from lightning_llama_fp8.precision import MegatronPrecision
from lightning_llama_fp8.validate import MAX_SEED, as_bool, as_int, as_optional_int

if TYPE_CHECKING:
    from collections.abc import Generator

    import lightning.pytorch as pl
    from megatron.core.distributed import DistributedDataParallelConfig

log = logging.getLogger(__name__)


def check_trainer_settings(accumulate_grad_batches: Any, gradient_clip_val: Any) -> None:
    """Refuse the Trainer settings that Megatron's step does in its own way (``ValueError`` naming that way)."""
    if accumulate_grad_batches not in (None, 1):
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} does not apply to MegatronCPStrategy: each "
            "step already accumulates global_batch_size / (micro_batch_size x data-parallel size) micro batches. "
            "Remove it and raise the data module's global_batch_size instead."
        )
    if gradient_clip_val is not None:  # 0 too: Lightning's "no clipping" would leave Megatron clipping at 1.0
        raise ValueError(
            f"trainer.gradient_clip_val={gradient_clip_val} does not apply to MegatronCPStrategy: Megatron's "
            "optimizer clips the gradient norm itself. Remove it and set the module's "
            "OptimizerSettings(clip_grad=...) (model.optimizer.clip_grad; 1.0 by default, 0 turns clipping off)."
        )


#: Why a model with the Transformer Engine layer spec cannot be built here, and what to do (the CLI says it too).
TRANSFORMER_ENGINE_MISSING = (
    "model.arch.transformer_impl is 'transformer_engine' (the default, in BF16 too) but Transformer Engine does not "
    "import here. Install it (pip install 'lightning-llama-fp8[te]', or NVIDIA's PyTorch container) or set "
    "model.arch.transformer_impl: local (BF16 only, no context parallelism)."
)


class MegatronCPStrategy(ParallelStrategy):
    """Tensor x context x pipeline x data parallel training of Megatron-Core models.

    Args:
        tensor_model_parallel_size: GPUs that split each layer's weights (TP).
        context_parallel_size: GPUs that split each sequence (CP); needs the Transformer Engine layer spec.
        sequence_parallel: also split norms/dropout activations along the sequence over the TP group.
        cp_comm_type: how CP ranks exchange keys/values: ``p2p`` (ring), ``a2a`` or ``all_gather``.
        pipeline_model_parallel_size: GPUs that split the layers into consecutive stages (PP), run by Megatron's
            1F1B schedule over the micro batches of each step.
        virtual_pipeline_model_parallel_size: model chunks per pipeline stage for Megatron's interleaved schedule
            (a smaller bubble for more point-to-point traffic); needs a multiple of PP micro batches per step.
            None: one chunk per stage.
        num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage: give the first / last stage
            (which also hold the embedding / the output layer and loss) fewer or more layers than an even split;
            the middle stages share the rest evenly. None: the even split.
        use_distributed_optimizer: shard fp32 main weights and Adam moments over DP x CP (ZeRO-1).
        overlap_grad_reduce: reduce-scatter gradient buckets during the backward pass.
        overlap_param_gather: all-gather updated parameters during the next forward pass. ``None`` (default): on
            with the distributed optimizer (the only one that gathers parameters), off without it.
        align_param_gather: launch all parameter all-gathers together (Megatron's ``--align-param-gather``).
        grad_reduce_in_fp32: reduce gradients in fp32 instead of bf16.
        average_in_collective: average gradients inside the collective rather than before it.
        bucket_size: gradient bucket size in elements (``None``: Megatron's default).
        check_for_nan_in_grad: have Megatron DDP assert that gradients are finite before reducing them.
        gradient_accumulation_fusion: Transformer Engine's layers add their weight gradients straight into Megatron
            DDP's gradient buffer (TE's ``fuse_wgrad_accumulation``, Megatron-LM's ``--gradient-accumulation-fusion``)
            instead of returning them for DDP's hook to add. Only for the TE layers: the output layer is
            Megatron's own linear, whose fused kernel needs APEX (Megatron-LM turns the whole option off without
            APEX; this package needs none). ``None`` (default): on for models with the Transformer Engine layer spec
            (one H200, 4 layers, FP8: 1.0097x, losses within run-to-run noise,
            benchmarks/results/2026-12-03-h200-fp8-profile), unless a callback needs the unfused weight gradients
            (``FaultInjector(target="gradient")`` hooks them); off otherwise. ``True``: on, refused without TE layers
            or with such a callback. ``False``: off.
        use_cpu_initialization: draw every full weight on the CPU from one seed and give each TP rank its slice,
            so any TP size starts from exactly the weights of one GPU (for reproducing runs across TP layouts; not
            across pipeline splits, where each stage draws from its own RNG stream: start those from a checkpoint
            or Hugging Face weights to compare them). Off:
            each TP rank draws its own slice on the GPU (Megatron's default, much faster for big models). Always
            on when training on CPU. Not with FP8 weights (``TEFP8Precision(fp8_param_gather=True)``).
        seed: seed for Megatron's model-parallel RNG streams (defaults to Lightning's global seed or 1234).
        checkpoint_optimizer_sharding: how checkpoints store the distributed optimizer's state:
            ``dp_reshardable`` (Megatron-LM's default: every rank writes its own shard, no gathering; resumes with
            the same TP and CP and any DP size) or ``fully_reshardable`` (gathered per parameter on save; resumes
            with any layout). Model weights reload into any layout either way.
        async_save: write checkpoints in the background (Megatron-Core's asynchronous ``dist_checkpointing``, see
            ``checkpoint/background.py``): ``save_checkpoint`` copies the shards to host memory and returns, and the
            checkpoint appears under its name, complete, some training steps later (at the latest before the next
            save and before ``fit`` returns); the older checkpoint ModelCheckpoint replaces is deleted only then.
            Needs host memory for a copy of this rank's share of one checkpoint. Saves outside a running ``fit``
            stay synchronous. Off (the default): training waits for each save.
        activation_recompute: recompute activations in the backward pass instead of keeping them
            (:class:`~lightning_llama_fp8.parallel.memory.RecomputeSettings`: ``selective`` modules or ``full`` layers;
            Megatron's ``recompute_*`` fields). ``None``: keep everything.
        optimizer_offload: keep (part of) the distributed optimizer's state in CPU memory and step it there
            (:class:`~.parallel.memory.OptimizerOffloadSettings`; Megatron's ``optimizer_cpu_offload``).
            ``None``: all on the GPU.
        optimizer_precision: Megatron's precision-aware optimizer (Transformer Engine's FusedAdam stepping straight
            from the gradient buffer): :class:`~.parallel.optimizer_precision.OptimizerPrecisionSettings` (bf16 Adam
            moments and fp32 main weights kept as 16-bit remainders of bf16 weights by default: 6 bytes per parameter
            at the step instead of 16). ``"auto"`` (default): fp32 moments and exact fp32 main weights (Megatron's
            default update but for the bf16 rounding of clipped gradients, without its fp32 gradient copy and its
            copy of the main weights into the model) wherever the precision-aware optimizer runs (distributed
            optimizer, no optimizer offload, bf16 weights, Transformer Engine's layers), Megatron's default elsewhere,
            and a resumed checkpoint's own optimizer state when resuming (``optimizer_precision_in_use`` says which,
            from ``setup_environment`` on). ``None``: Megatron's default (fp32 main weights and moments).
        cuda_graphs: capture each transformer layer as CUDA graphs after a few eager training steps and replay them
            (:class:`~.parallel.cuda_graphs.CudaGraphSettings`; Megatron's ``cuda_graph_impl="transformer_engine"``).
            ``None`` (default): eager.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU by default.
        timeout: collective timeout.
    """

    strategy_name = "megatron_cp"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        sequence_parallel: bool = False,
        cp_comm_type: CPCommType = "p2p",
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        num_layers_in_first_pipeline_stage: int | None = None,
        num_layers_in_last_pipeline_stage: int | None = None,
        use_distributed_optimizer: bool = True,
        overlap_grad_reduce: bool = True,
        overlap_param_gather: bool | None = None,
        align_param_gather: bool = False,
        grad_reduce_in_fp32: bool = False,
        average_in_collective: bool = False,
        bucket_size: int | None = None,
        check_for_nan_in_grad: bool = False,
        gradient_accumulation_fusion: bool | None = None,
        use_cpu_initialization: bool = False,
        seed: int | None = None,
        checkpoint_optimizer_sharding: ckpt.OptimizerSharding = "dp_reshardable",
        async_save: bool = False,
        activation_recompute: RecomputeSettings | None = None,
        optimizer_offload: OptimizerOffloadSettings | None = None,
        optimizer_precision: OptimizerPrecision = AUTO,
        cuda_graphs: CudaGraphSettings | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ and not torch.cuda.is_initialized():
            # As Megatron-LM's recipes export it: one hardware queue, so the communication kernels that TP/CP
            # overlap with compute are issued in program order. It only takes effect before CUDA starts.
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        # Whole numbers in range, refused when the strategy is made (the pipeline split: validate_layout, which also
        # knows the world size and the model).
        tensor_model_parallel_size = as_int(tensor_model_parallel_size, "tensor_model_parallel_size", at_least=1)
        context_parallel_size = as_int(context_parallel_size, "context_parallel_size", at_least=1)
        pipeline_model_parallel_size = as_int(pipeline_model_parallel_size, "pipeline_model_parallel_size", at_least=1)
        bucket_size = as_optional_int(bucket_size, "bucket_size", at_least=1)
        seed = as_optional_int(seed, "seed", at_least=0, at_most=MAX_SEED)
        # A string "false" is truthy: every switch must be a real true/false (validate.as_bool).
        use_distributed_optimizer = as_bool(use_distributed_optimizer, "use_distributed_optimizer")
        overlap_grad_reduce = as_bool(overlap_grad_reduce, "overlap_grad_reduce")
        align_param_gather = as_bool(align_param_gather, "align_param_gather")
        grad_reduce_in_fp32 = as_bool(grad_reduce_in_fp32, "grad_reduce_in_fp32")
        average_in_collective = as_bool(average_in_collective, "average_in_collective")
        check_for_nan_in_grad = as_bool(check_for_nan_in_grad, "check_for_nan_in_grad")
        use_cpu_initialization = as_bool(use_cpu_initialization, "use_cpu_initialization")
        async_save = as_bool(async_save, "async_save")
        if overlap_param_gather is not None:
            overlap_param_gather = as_bool(overlap_param_gather, "overlap_param_gather")
        if gradient_accumulation_fusion is not None:
            gradient_accumulation_fusion = as_bool(gradient_accumulation_fusion, "gradient_accumulation_fusion")
        if bucket_size is not None and not overlap_grad_reduce:  # Megatron's DDP then reduces in one bucket
            raise ValueError(
                "bucket_size has no effect without overlap_grad_reduce=True (Megatron reduces all gradients at once "
                "then): remove it, or turn overlap_grad_reduce on."
            )
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta (or None), got {timeout!r}.")
        if sequence_parallel and tensor_model_parallel_size == 1:
            log.warning("sequence_parallel needs tensor_model_parallel_size > 1; turning it off.")
            sequence_parallel = False
        overlap_param_gather = resolve_param_gather(use_distributed_optimizer, overlap_param_gather, align_param_gather)
        self.layout = ParallelLayout(
            tensor_model_parallel_size=tensor_model_parallel_size,
            context_parallel_size=context_parallel_size,
            sequence_parallel=sequence_parallel,
            cp_comm_type=cp_comm_type,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
        )
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather
        self.align_param_gather = align_param_gather
        self.grad_reduce_in_fp32 = grad_reduce_in_fp32
        self.average_in_collective = average_in_collective
        self.bucket_size = bucket_size
        self.check_for_nan_in_grad = check_for_nan_in_grad
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        #: Whether TE's layers accumulate into main_grad in this fit (resolved in ``setup``).
        self.gradient_accumulation_fused = False
        self.use_cpu_initialization = use_cpu_initialization
        self.seed = seed
        self.checkpoint_optimizer_sharding = ckpt.check_optimizer_sharding(checkpoint_optimizer_sharding)
        self.async_save = async_save
        self.checkpointing = StrategyCheckpointing(self)
        # Lightning's "Checkpoint directory ... exists and is not empty", hidden while a resumed run sets up the
        # ModelCheckpoint directories it continues (from setup_environment to setup).
        self._own_directory_warnings = ExitStack()
        self.activation_recompute = activation_recompute
        self.optimizer_offload = optimizer_offload
        if optimizer_offload is not None:
            optimizer_offload.check(use_distributed_optimizer, fp8_recipe=None, fp8_param_gather=False)
        check_optimizer_precision_setting(optimizer_precision)
        self.optimizer_precision = optimizer_precision
        #: The optimizer-state precision of this run: ``optimizer_precision`` with "auto" resolved (in
        #: ``setup_environment``, and from the checkpoint when resuming); ``None``: Megatron's default optimizer.
        self.optimizer_precision_in_use: OptimizerPrecisionSettings | None = (
            None if optimizer_precision == AUTO else optimizer_precision  # type: ignore[assignment]
        )
        if isinstance(optimizer_precision, OptimizerPrecisionSettings):
            optimizer_precision.check(
                use_distributed_optimizer,
                fp8_param_gather=False,
                optimizer_offloaded=optimizer_offload is not None,
                checkpoint_optimizer_sharding=checkpoint_optimizer_sharding,
            )
        self.cuda_graphs = cuda_graphs
        self._graph_capture = CudaGraphCapture(cuda_graphs) if cuda_graphs is not None else None
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.num_nodes = 1
        self._ddp_modules: list[torch.nn.Module] = []
        self._skip_reason: str | None = None
        #: Deterministic mode of the run (``Trainer(deterministic=...)``), resolved in ``setup_environment``.
        self.deterministic_mode = determinism.DeterministicMode(on=False)

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        """Tells Lightning to give each DataLoader a ``DistributedSampler`` built from the kwargs below.

        Lightning only does that for its own distributed strategies or one that defines this property; without
        it every DP rank would read the same samples (found by ``benchmarks/parallel_equivalence.py``: DP2 did
        not match one GPU).
        """
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """One sampler shard per model replica: TP and CP ranks of a replica read the same samples."""
        from megatron.core import parallel_state

        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = compat.subprocess_script_launcher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        compat.set_rank_zero(self.global_rank)

    def connect(self, model: pl.LightningModule) -> None:
        """Refuse the Trainer's own accumulation and clipping first: Lightning refuses them for manual optimization
        with advice (switch to automatic optimization) that does not apply to Megatron's optimizer."""
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            check_trainer_settings(trainer.accumulate_grad_batches, trainer.gradient_clip_val)
        super().connect(model)

    # ------------------------------------------------------------------ environment
    def setup_environment(self) -> None:
        """Check everything cheap first, then start torch.distributed and Megatron's parallel groups."""
        super().setup_environment()
        self.set_world_ranks()  # first, so rank-zero-only messages of the checks below come from rank 0 only
        self._check_precision_plugin()
        compat.reset_seed()
        arch = getattr(self.lightning_module, "arch", None) if self._lightning_module is not None else None
        validate_layout(self.layout, self.world_size, arch=arch)
        if arch is not None:
            self.precision_plugin.check_num_layers(arch.num_layers, self.layout.pipeline_model_parallel_size)
        self._check_memory_settings(arch)
        self._check_cuda_graphs(arch)
        self._check_gradient_accumulation_fusion(arch)
        self._check_layer_implementation(arch)
        self._check_nan_check_against_nan_guard()
        self._enter_deterministic_mode()  # its NCCL_ALGO before the process groups, its TE setting before the model
        if self.cuda_graphs is not None and self.root_device.type == "cuda":
            prepare_environment()
            # As Megatron-LM does before its process groups: the capture needs work off the legacy default stream.
            torch.cuda.set_device(self.root_device)
            torch.cuda.set_stream(torch.cuda.Stream())
        backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
        self._process_group_backend = backend
        compat.init_dist_connection(self.cluster_environment, backend, self._timeout)
        self.initialize_parallel_state()
        # The checkpoint to load and every output directory, before data, model and optimizer are built.
        self.checkpointing.early_state = preflight.check_before_building(self)
        early = self.checkpointing.early_state
        resumed = early is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        self._log_optimizer_precision(resumed)
        self._hide_directory_warning_of_own_resume()

    def _hide_directory_warning_of_own_resume(self) -> None:
        """A fit resumed into its own ModelCheckpoint directories: Lightning's "Checkpoint directory ... exists and is
        not empty" (said in the callbacks' setup, which comes next) is meant for a new run writing where another run's
        checkpoints are; for these directories the files are this run's own. Kept for every other directory."""
        early = self.checkpointing.early_state
        if early is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return
        path, lightning_state = early
        trainer = self.lightning_module.trainer
        own = preflight.own_checkpoint_directories(path, trainer.checkpoint_callbacks, lightning_state)
        if own:
            self._own_directory_warnings.enter_context(own_checkpoint_directories_warning_filtered(own))

    def initialize_parallel_state(self) -> None:
        """Build Megatron's TP/CP/PP/DP groups and seed its RNG streams (idempotent for one layout)."""
        from megatron.core import parallel_state

        layout = self.layout
        wanted = (
            layout.tensor_model_parallel_size,
            layout.context_parallel_size,
            layout.pipeline_model_parallel_size,
            layout.virtual_pipeline_model_parallel_size,
        )
        if parallel_state.model_parallel_is_initialized():
            found = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_context_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            )
            if found != wanted:
                raise RuntimeError(
                    "Megatron parallel_state is already initialised with (TP, CP, PP, virtual PP) = "
                    f"{found}; this strategy wants {wanted}. Call "
                    "megatron.core.parallel_state.destroy_model_parallel() between runs with different layouts."
                )
        else:
            # Megatron's default rank order (TP fastest, then CP, DP, PP): the stages of one model replica are
            # world / PP ranks apart, so on several nodes TP and CP stay inside a node.
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tensor_model_parallel_size,
                context_parallel_size=layout.context_parallel_size,
                pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
            )
        # As Megatron-LM seeds (its _set_random_seed): each pipeline stage from its own seed, or every stage would
        # start its layers from the same draws; torch's CPU generator too, from which Megatron's CPU initialisation
        # draws every full weight (the same on every TP rank, which then takes its slice).
        seed = self._seed() + 100 * parallel_state.get_pipeline_model_parallel_rank()
        torch.manual_seed(seed)
        if self.root_device.type == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            torch.cuda.set_device(self.root_device)
            graphs = self.cuda_graphs is not None  # graphed layers draw from Transformer Engine's RNG tracker
            # force_reset_rng: Megatron keeps the first tracker a process made (an earlier eager fit's), whose plain
            # states Transformer Engine's capture cannot fork.
            model_parallel_cuda_manual_seed(
                seed, te_rng_tracker=graphs, use_cudagraphable_rng=graphs, force_reset_rng=graphs
            )

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 1234))

    def _check_precision_plugin(self) -> None:
        plugin = self.precision_plugin
        if not isinstance(plugin, MegatronPrecision):
            raise TypeError(
                f"MegatronCPStrategy trains Megatron models in BF16 or FP8, but the Trainer's precision plugin is "
                f"{type(plugin).__name__}. Pass plugins=[TEFP8Precision()] for FP8 or plugins=[MegatronPrecision()] "
                "for BF16 (and leave Trainer(precision=...) unset)."
            )
        plugin.check_supported()
        if self.use_cpu_initialization and plugin.ddp_config_kwargs().get("fp8_param_gather"):
            # Megatron's CPU init copies each full weight into the TE module's FP8 weight; with TE 2.20 that copy
            # ends in an illegal memory access (benchmarks/results/2026-11-28-h200x4-s5/checkpoints_dp2/).
            raise ValueError(
                "MegatronCPStrategy(use_cpu_initialization=True) cannot initialise FP8 weights "
                "(TEFP8Precision(fp8_param_gather=True)): Megatron's CPU init crashes filling them. Turn one off: "
                "use_cpu_initialization=False (the default) or fp8_param_gather=False."
            )

    def _enter_deterministic_mode(self) -> None:
        """Complete ``Trainer(deterministic=True)`` (read from PyTorch's flag, which the Trainer sets) for Megatron and
        Transformer Engine: refuse settings that contradict it, set what it needs (``parallel/determinism.py``), and
        say once which mode is on."""
        determinism.leave(self.deterministic_mode)  # a second setup of the same strategy starts from the first's state
        mode = determinism.requested()
        determinism.enter(mode)
        self.deterministic_mode = mode
        rank_zero_info(mode.describe())

    def _check_layer_implementation(self, arch: Any) -> None:
        """Refuse FP8 on Megatron's local layers (it would train in BF16) and TE layers without TE installed, for a
        module that builds its model from ``arch`` (``transformer_config``: LlamaLightningModule and its kind; other
        modules may carry an ``arch`` for the FLOP count only)."""
        if arch is None or not callable(getattr(self.lightning_module, "transformer_config", None)):
            return
        if arch.transformer_impl != "transformer_engine":
            if self.precision_plugin.fp8_active:
                raise ValueError(
                    f"TEFP8Precision computes Transformer Engine layers in FP8, but model.arch.transformer_impl is "
                    f"{arch.transformer_impl!r} (Megatron's own layers, BF16 only): the model would train in BF16. "
                    "Set transformer_impl='transformer_engine' (the default), or use MegatronPrecision for BF16."
                )
        elif not transformer_engine_installed():
            raise ValueError(TRANSFORMER_ENGINE_MISSING)

    def _check_nan_check_against_nan_guard(self) -> None:
        """Megatron's own gradient check raises mid-reduce on a non-finite gradient (its rerun state machine, with
        reruns off, raises for ``fatal`` checks), before a NaNGuard that skips or rolls back can act."""
        if not self.check_for_nan_in_grad:
            return
        from lightning_llama_fp8.callbacks.nan_guard import NaNGuard

        guards = [
            cb for cb in self._trainer_callbacks() if isinstance(cb, NaNGuard) and cb.policy in ("skip", "rollback")
        ]
        if guards:
            raise ValueError(
                f"check_for_nan_in_grad=True stops the run at the first non-finite gradient (Megatron raises while "
                f"reducing it), so NaNGuard(policy={guards[0].policy!r}) could never skip or roll back that step. "
                "Leave check_for_nan_in_grad off (NaNGuard checks every step), or use NaNGuard(policy='raise')."
            )

    def _check_gradient_accumulation_fusion(self, arch: Any) -> None:
        problem = ddp.gradient_accumulation_fusion_problem(
            self.gradient_accumulation_fusion, arch, self._trainer_callbacks()
        )
        if problem:
            raise ValueError(problem)

    def _trainer_callbacks(self) -> list[Any]:
        try:
            return list(self.lightning_module.trainer.callbacks) if self._lightning_module is not None else []
        except RuntimeError:  # a module not attached to a Trainer (LightningModule.trainer raises)
            return []

    def _fuses_gradient_accumulation(self) -> bool:
        """Resolve ``gradient_accumulation_fusion`` for this fit (checked already in ``setup_environment``)."""
        arch = getattr(self.lightning_module, "arch", None)
        return ddp.resolve_gradient_accumulation_fusion(
            self.gradient_accumulation_fusion, arch, self._trainer_callbacks()
        )

    def _check_memory_settings(self, arch: Any) -> None:
        """Refuse recompute / offload settings that cannot take effect here (before any process group exists)."""
        plugin = self.precision_plugin
        fp8_recipe = plugin.transformer_config_kwargs().get("fp8_recipe")
        if self.optimizer_offload is not None:
            fp8_param_gather = bool(plugin.ddp_config_kwargs().get("fp8_param_gather"))
            self.optimizer_offload.check(self.use_distributed_optimizer, fp8_recipe, fp8_param_gather)
        self.optimizer_precision_in_use = resolve_optimizer_precision(
            self.optimizer_precision,
            **self._optimizer_facts(),
            transformer_engine_layers=getattr(arch, "transformer_impl", None) == "transformer_engine"
            and transformer_engine_installed(),
        )
        self._check_optimizer_precision_in_use()
        if self.activation_recompute is not None and arch is not None:
            chunk_layers = largest_chunk_layers(self.layout, arch.num_layers)
            self.activation_recompute.check(chunk_layers, arch.transformer_impl, fp8_recipe)

    def _check_optimizer_precision_in_use(self) -> None:
        """Refuse optimizer-state precision this run cannot keep (before anything is built)."""
        settings = self.optimizer_precision_in_use
        if settings is None:
            return
        settings.check(**self._optimizer_facts())
        settings.check_transformer_engine()

    def _optimizer_facts(self) -> dict[str, Any]:
        """What decides which optimizer-state precision can run here (keyword arguments of
        ``OptimizerPrecisionSettings.check``, ``resolve_optimizer_precision`` and ``resumed_settings``)."""
        return {
            "use_distributed_optimizer": self.use_distributed_optimizer,
            "fp8_param_gather": bool(self.precision_plugin.ddp_config_kwargs().get("fp8_param_gather")),
            "optimizer_offloaded": self.optimizer_offload is not None,
            "checkpoint_optimizer_sharding": self.checkpoint_optimizer_sharding,
        }

    def adopt_resumed_optimizer_state(self, checkpoint: str, record: dict[str, Any]) -> None:
        """With ``optimizer_precision="auto"``, keep the optimizer state as the resumed checkpoint ``checkpoint``
        recorded it (``record``, its ``optimizer_state``); raise ``CheckpointError`` where this run cannot."""
        if self.optimizer_precision != AUTO:
            return
        try:
            self.optimizer_precision_in_use = resumed_settings(checkpoint, record, **self._optimizer_facts())
        except ValueError as err:
            raise ckpt.CheckpointError(str(err)) from err

    def _log_optimizer_precision(self, resumed: bool) -> None:
        """Say once what ``optimizer_precision="auto"`` resolved to (after a resumed checkpoint had its say)."""
        if self.optimizer_precision != AUTO:
            return
        chosen = self.optimizer_precision_in_use
        what = chosen.describe() if chosen is not None else "Megatron's default optimizer (fp32 main weights, moments)"
        source = " (the resumed checkpoint's)" if resumed else ""
        rank_zero_info(f"optimizer_precision 'auto': {what}{source}.")

    def _check_cuda_graphs(self, arch: Any) -> None:
        """Refuse CUDA graphs where they cannot run (before any process group exists)."""
        if self.cuda_graphs is None:
            return
        trainer = self.lightning_module.trainer
        recompute = self.activation_recompute
        if recompute is not None and recompute.granularity == "selective":
            # megatron-core 0.19.2 runs checkpointed functions plainly while capturing (tensor_parallel/random.py).
            log.warning(
                "cuda_graphs: selective recompute does not apply inside the captured layers (megatron-core keeps "
                "their activations during the capture); their memory is that of no recompute, which `llama-fp8 "
                "plan` does not show."
            )
        self.cuda_graphs.check(
            transformer_impl=getattr(arch, "transformer_impl", "transformer_engine"),
            full_recompute=recompute is not None and recompute.granularity == "full",
            optimizer_offloaded=self.optimizer_offload is not None,
            document_masking=bool(getattr(trainer.datamodule, "document_masking", False)),
            pipeline_model_parallel_size=self.layout.pipeline_model_parallel_size,
            callback_conflicts=callback_conflicts(trainer.callbacks),
        )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's training step; with ``cuda_graphs``, after the warm-up steps capture the layers first."""
        if self._graph_capture is not None and self._graph_capture.count_step():
            self._capture_cuda_graphs(args[0] if args else kwargs["batch"])
        return super().training_step(*args, **kwargs)

    def _capture_cuda_graphs(self, batch: dict[str, torch.Tensor]) -> None:
        from megatron.core import parallel_state

        assert self._graph_capture is not None
        # The shapes of the step about to run (any data module or plain dataloader): [micro batches, micro batch, seq].
        num_microbatches, micro_batch_size, seq_length = batch["tokens"].shape
        data_parallel_size = parallel_state.get_data_parallel_world_size()
        self._graph_capture.capture(
            self._ddp_modules,
            self.optimizers[0],
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=num_microbatches * micro_batch_size * data_parallel_size,
            data_parallel_size=data_parallel_size,
            rank=torch.distributed.get_rank(),
            overlap_param_gather=self.overlap_param_gather,
        )

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """The layout (and activation recompute) fields of the model's ``TransformerConfig``, and
        ``deterministic_mode`` (``Trainer(deterministic=True)``)."""
        tp, cp = self.layout.tensor_model_parallel_size, self.layout.context_parallel_size
        kwargs: dict[str, Any] = {
            "tensor_model_parallel_size": tp,
            "context_parallel_size": cp,
            "sequence_parallel": self.layout.sequence_parallel,
            "use_cpu_initialization": self.use_cpu_initialization or self.root_device.type != "cuda",
            "deterministic_mode": self.deterministic_mode.on,
        }
        if cp > 1:
            kwargs["cp_comm_type"] = self.layout.cp_comm_type
        if self.cuda_graphs is not None:
            kwargs.update(self.cuda_graphs.transformer_config_kwargs())
        kwargs.update(pipeline_config_kwargs(self.layout))
        if self.activation_recompute is not None:
            arch = getattr(self.lightning_module, "arch", None) if self._lightning_module is not None else None
            if arch is None:
                raise TypeError(
                    "MegatronCPStrategy(activation_recompute=...) needs the LightningModule's `arch` (a LlamaConfig) "
                    "to check and size the recompute settings."
                )
            kwargs.update(
                self.activation_recompute.transformer_config_kwargs(largest_chunk_layers(self.layout, arch.num_layers))
            )
        return kwargs

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """The strategy's fields of Megatron's ``OptimizerConfig`` (distributed optimizer, CPU offload, optimizer-state
        precision)."""
        kwargs: dict[str, Any] = {
            "use_distributed_optimizer": self.use_distributed_optimizer,
            "overlap_param_gather": self.overlap_param_gather,
        }
        if self.optimizer_offload is not None:
            kwargs.update(self.optimizer_offload.optimizer_config_kwargs())
        if self.optimizer_precision_in_use is not None:
            kwargs.update(self.optimizer_precision_in_use.optimizer_config_kwargs())
        return kwargs

    @property
    def ddp_config(self) -> DistributedDataParallelConfig:
        from megatron.core.distributed import DistributedDataParallelConfig

        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.grad_reduce_in_fp32,
            overlap_grad_reduce=self.overlap_grad_reduce,
            overlap_param_gather=self.overlap_param_gather,
            align_param_gather=self.align_param_gather,
            use_distributed_optimizer=self.use_distributed_optimizer,
            check_for_nan_in_grad=self.check_for_nan_in_grad,
            bucket_size=self.bucket_size,
            average_in_collective=self.average_in_collective,
            **self.precision_plugin.ddp_config_kwargs(),
        )

    # ------------------------------------------------------------------ model and optimizer
    def setup(self, trainer: pl.Trainer) -> None:
        self._own_directory_warnings.close()  # the callbacks' setup, which says it, is done
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        compat.evaluate_without_inference_mode(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._wrap_megatron_modules()
            # Required when asked for explicitly; by default only where TE modules exist.
            self.gradient_accumulation_fused = self._fuses_gradient_accumulation() and (
                ddp.fuse_te_weight_gradient_accumulation(
                    self._ddp_modules, required=self.gradient_accumulation_fusion is True
                )
                > 0
            )
            self.setup_optimizers(trainer)
            self._connect_schedule_hooks()
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _wrap_megatron_modules(self) -> None:
        """Wrap each Megatron model (chunk) of the LightningModule in Megatron DDP (``parallel/ddp.py``)."""
        self._ddp_modules = ddp.wrap_megatron_modules(self.lightning_module, self.ddp_config)

    def _connect_schedule_hooks(self) -> None:
        ddp.connect_schedule_hooks(
            self._ddp_modules,
            self.optimizers[0] if self.optimizers else None,
            overlap_grad_reduce=self.overlap_grad_reduce,
            pipelined=self.layout.pipeline_model_parallel_size > 1,
            overlap_param_gather=self.overlap_param_gather,
            align_param_gather=self.align_param_gather,
        )

    @property
    def ddp_modules(self) -> list[torch.nn.Module]:
        """The Megatron DDP wrappers this strategy created (empty outside of fitting)."""
        return list(self._ddp_modules)

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """Run the closure and the ``on_before_optimizer_step`` hooks, then the optimizer, unless a hook vetoed it.

        With Megatron's optimizer the gradients were already produced by Megatron's forward-backward schedule
        inside ``training_step`` and the closure does nothing; ``optimizer.step()`` unscales, clips, steps and
        (distributed) all-gathers in one call and returns ``(update_successful, grad_norm, num_zeros_in_grad)``.
        A vetoed step returns ``(False, None, None)`` (a plain torch optimizer: ``None``), as Megatron-LM does for
        a skipped iteration: weights, optimizer moments and the learning-rate schedule stay where they were.
        """
        from lightning.pytorch import LightningModule
        from megatron.core.optimizer import MegatronOptimizer

        module = model if isinstance(model, LightningModule) else self.lightning_module
        compat.run_closure_and_before_optimizer_step_hooks(self.precision_plugin, module, optimizer, closure)
        if self._skip_reason is not None:
            log.warning("Optimizer step skipped: %s", self._skip_reason)
            self._skip_reason = None
            return (False, None, None) if isinstance(optimizer, MegatronOptimizer) else None
        with self.precision_plugin.optimizer_step_context(self._ddp_modules):
            return optimizer.step()

    def skip_optimizer_step(self, reason: str) -> None:
        """Veto the optimizer step in progress; call from ``on_before_optimizer_step`` (e.g. ``NaNGuard``)."""
        self._skip_reason = reason

    # ------------------------------------------------------------------ checkpoints (checkpoint/hooks.py)
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write a distributed checkpoint directory at ``filepath``; every rank calls it (ModelCheckpoint does).

        The Megatron model and optimizer go to Megatron's sharded format, everything else Lightning put into
        ``checkpoint`` (loops, callbacks, LR scheduler, data position, the module's non-Megatron state, the state of
        any other optimizer) to ``lightning.pt``. A ``weights_only`` save leaves the optimizers out.
        """
        if storage_options is not None:
            raise TypeError("MegatronCPStrategy.save_checkpoint does not take storage_options.")
        self.checkpointing.save(checkpoint, filepath)

    @property
    def pending_checkpoint(self) -> Path | None:
        """The checkpoint being written in the background (``async_save``) and not yet under its name, if any."""
        return self.checkpointing.pending_path

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Where Megatron-LM finalizes too, at the start of each iteration: publish a finished background save.
        self.checkpointing.publish_finished_save()
        self.checkpointing.reserve_host_copy()  # once, after the first step, with async_save

    def on_train_end(self) -> None:
        # fit returns with its last checkpoint published (ModelCheckpoint's last save comes just before this hook).
        self.checkpointing.finish_pending_save()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Check the checkpoint against this run, load the Megatron model (and, when fitting, the optimizers) from
        it, and return the rest for Lightning to restore.

        A distributed checkpoint holds pickled data (torch.distributed.checkpoint's index, Transformer Engine's FP8
        state, Lightning's state): load only checkpoints you trust. ``weights_only=True`` cannot be honoured.
        """
        if weights_only:
            raise ckpt.CheckpointError(
                "MegatronCPStrategy checkpoints cannot be loaded with weights_only=True: they hold pickled data "
                "(torch.distributed.checkpoint's index, Transformer Engine's FP8 state). Load only trusted ones."
            )
        return self.checkpointing.load(checkpoint_path)

    def check_checkpoint(
        self, path: str | os.PathLike[str], with_optimizer: bool, **resume_settings: Any
    ) -> ckpt.CheckpointInfo:
        """Raise :class:`~lightning_llama_fp8.checkpoint.info.CheckpointError` if ``path`` cannot be loaded here
        (``resume_settings``: ``check_can_resume``'s ``global_batch_size`` / ``optimizer_settings``)."""
        return self.checkpointing.check(path, with_optimizer, **resume_settings)

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        """Restore the module's state outside the Megatron model (which ``load_checkpoint`` already loaded)."""
        self.checkpointing.load_module_state(checkpoint, strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """A Megatron optimizer: nothing here (its ``state_dict()`` lacks the distributed shards;
        :meth:`save_checkpoint` writes it in Megatron's sharded format). Any other optimizer: its ``state_dict()``,
        kept in ``lightning.pt``."""
        from megatron.core.optimizer import MegatronOptimizer

        return {} if isinstance(optimizer, MegatronOptimizer) else optimizer.state_dict()

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint directory (ModelCheckpoint's ``save_top_k`` rotation) once no pending background
        save still needs it as the newest complete one; rank 0 does it."""
        self.checkpointing.remove(filepath)

    def first_failure(self, failure: str | None) -> str | None:
        """Collective: the first rank's failure text, or None when every rank succeeded."""
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return failure
        failures: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(failures, failure)
        return next((text for text in failures if text is not None), None)

    # ------------------------------------------------------------------ validation around overlapped gathers
    def on_validation_start(self) -> None:
        # With overlapped param all-gather, params are gathered by forward pre-hooks that expect an optimizer
        # step before each forward; evaluation has none, so gather synchronously and pause the hooks.
        if self.overlap_param_gather:
            for wrapped in self._ddp_modules:
                wrapped.disable_forward_pre_hook()

    def on_validation_end(self) -> None:
        if self.overlap_param_gather:
            for wrapped in self._ddp_modules:
                wrapped.enable_forward_pre_hook()

    # ------------------------------------------------------------------ collectives
    def barrier(self, name: str | None = None) -> None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return obj
        container = [obj]
        torch.distributed.broadcast_object_list(container, src)
        return container[0]

    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        """Reduce over the data-parallel x context-parallel group by default.

        Tensor-parallel ranks hold identical copies of every logged value, so including them would count a
        replica TP times in a sum.
        """
        if not isinstance(tensor, Tensor):
            return tensor
        if group is None:
            group = self.data_parallel_group()
        return compat.sync_ddp_if_available(tensor, group, reduce_op)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """``all``/``any`` of ``decision`` over every rank (Lightning's default reduces over :meth:`reduce`'s DP x CP
        group and compares with the world size: with TP or PP > 1, ``all`` was never true and ``any`` did not reach
        the other TP/PP ranks, so ModelCheckpoint's top-k saves, EarlyStopping and PreemptionCheckpoint's stop
        decision differed between ranks)."""
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return decision
        votes = torch.tensor(int(decision), device=self.root_device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.SUM)
        return bool(votes == torch.distributed.get_world_size()) if all else bool(votes)

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return compat.all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    def data_parallel_group(self) -> Any:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Megatron places and initialises its own parameters (on the current CUDA device, with its RNG tracker).
        yield

    def teardown(self) -> None:
        from megatron.core import parallel_state

        self._own_directory_warnings.close()
        self.checkpointing.close()  # the run waits for a pending save before it exits
        if self._graph_capture is not None:
            self._graph_capture.close()  # before the process groups the graphs' collectives belong to
        self._ddp_modules = []
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        determinism.leave(self.deterministic_mode)  # the environment as it was before this run
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Megatron-Core TP x CP x DP strategy")


if MegatronCPStrategy.strategy_name not in StrategyRegistry:
    MegatronCPStrategy.register_strategies(StrategyRegistry)
