"""``LlamaLightningModule``: Megatron-Core's Llama 3 (GPTModel) trained the way Megatron-LM trains it.

One Lightning training step is one Megatron iteration: the batch holds this data-parallel rank's share of a
global batch as ``[num_microbatches, micro_batch_size, seq_length]`` tensors, Megatron's forward-backward
schedule runs the micro batches (gradient accumulation, per-token loss, overlapped grad reduce), and
Megatron's optimizer clips and steps. Optimization is therefore manual; the strategy routes
``optimizer.step()`` to Megatron.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from lightning_llama_fp8._compat.warnings import filter_manual_optimization_checkpoint_warning
from lightning_llama_fp8.config import LlamaConfig, check_data_matches_arch, llama_config_from_fields
from lightning_llama_fp8.data import packing
from lightning_llama_fp8.data.base import BATCH_KEYS, CU_SEQLENS_KEY
from lightning_llama_fp8.hf.arch import resolve_arch
from lightning_llama_fp8.parallel.groups import data_parallel_size_and_rank
from lightning_llama_fp8.parallel.pipeline import build_model_chunks, chunk_data_iterators, reduce_pipeline_loss
from lightning_llama_fp8.precision import MegatronPrecision
from lightning_llama_fp8.validate import SettingError, as_float, as_int, as_optional_int

Batch = dict[str, Tensor]


@dataclass
class OptimizerSettings:
    """AdamW with linear warmup and cosine (or other) decay to ``min_lr``, as Megatron-LM schedules it.

    Steps are optimizer steps (global batches). Megatron-LM's recipes give warmup/decay in samples: divide
    by the global batch size.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 100
    # None: decay over the whole run (trainer.max_steps).
    decay_steps: int | None = None
    # Megatron-LM's --decoupled-lr / --decoupled-min-lr: a separate peak / final LR for the input embedding
    # and output layer (None: same as the rest).
    decoupled_lr: float | None = None
    decoupled_min_lr: float | None = None
    decay_style: Literal["cosine", "linear", "constant", "inverse-square-root"] = "cosine"

    def __post_init__(self) -> None:
        """Every number is what it looks like (``validate``'s rules: ``warmup_steps: 100.0`` from YAML is 100;
        ``2.5``, NaN and infinities are refused), then the ranges Megatron asserts on. All problems are reported at
        once, each naming the field, the value and what it accepts."""
        problems: list[str] = []

        def check(name: str, parse: Any, **accepted: Any) -> bool:
            """Store field ``name`` as ``parse`` reads it; False (and the problem noted) if refused."""
            try:
                setattr(self, name, parse(getattr(self, name), name, **accepted))
                return True
            except SettingError as err:
                problems.append(str(err).rstrip("."))
                return False

        def optional_float(value: Any, name: str, **accepted: Any) -> float | None:
            return None if value is None else as_float(value, name, **accepted)

        lr_ok = check("lr", as_float, above=0)
        if check("min_lr", as_float, at_least=0) and lr_ok and self.min_lr > self.lr:
            problems.append(f"min_lr must be <= lr ({self.lr:g}); got {self.min_lr!r}")
        decoupled_ok = check("decoupled_lr", optional_float, above=0)
        peak, peak_name = (self.lr, "lr") if self.decoupled_lr is None else (self.decoupled_lr, "decoupled_lr")
        if (
            check("decoupled_min_lr", optional_float, at_least=0)
            and self.decoupled_min_lr is not None
            and (lr_ok if self.decoupled_lr is None else decoupled_ok)
            and self.decoupled_min_lr > peak
        ):
            problems.append(f"decoupled_min_lr must be <= {peak_name} ({peak:g}); got {self.decoupled_min_lr!r}")
        check("weight_decay", as_float, at_least=0)
        check("clip_grad", as_float, at_least=0)  # 0: no clipping (Megatron clips only when > 0)
        check("adam_eps", as_float, above=0)
        for beta in ("adam_beta1", "adam_beta2"):  # [0, 1): a beta of 1 never forgets and never updates the moment
            if check(beta, as_float, at_least=0, at_most=1) and getattr(self, beta) == 1:
                problems.append(f"{beta} must be a finite number >= 0 and < 1; got {getattr(self, beta)!r}")
        check("warmup_steps", as_int, at_least=0)
        check("decay_steps", as_optional_int, at_least=1)
        styles = ("cosine", "linear", "constant", "inverse-square-root")
        if self.decay_style not in styles:
            problems.append(f"decay_style must be one of {', '.join(styles)}; got {self.decay_style!r}")
        if problems:
            raise SettingError("OptimizerSettings: " + "; ".join(problems) + ".")

    def check_schedule(self, max_steps: int) -> int:
        """The decay length for a run of ``max_steps``; raises if warmup does not end before the decay does."""
        if self.decay_steps is None and max_steps < 1:
            raise ValueError(
                "The LR schedule decays over trainer.max_steps, which is not set: set trainer.max_steps (optimizer "
                "steps, i.e. global batches) or optimizer.decay_steps."
            )
        decay_steps = self.decay_steps or max_steps
        if self.warmup_steps >= decay_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than decay_steps ({decay_steps}); "
                "set optimizer.decay_steps or trainer.max_steps."
            )
        return decay_steps


#: Why fused QKV RoPE and packed sequences (document masking) cannot go together, and what to do.
FUSED_QKV_ROPE_PACKED = (
    "Megatron applies RoPE to packed sequences on the split query and key only (it asserts at the first step). "
    "Turn one of them off."
)


class LlamaLightningModule(LightningModule):
    """Llama 3 pre-training with Megatron-Core, under a Lightning Trainer.

    Args:
        arch: a preset name (``llama3_8b``, ``llama3_70b``, ``llama3_1_8b``, ``llama3_2_1b``, ``llama3_2_3b``,
            ``llama3_8b_4layers``, ``llama_tiny``), a :class:`LlamaConfig` or a Hugging Face model directory
            (its ``config.json``). None: Llama 3 8B, or the architecture of ``init_weights``.
        optimizer: optimizer and learning-rate schedule.
        init_weights: a Hugging Face Llama directory (``config.json`` + safetensors) to start from: its weights
            replace the random initialisation when the model is built (each rank reads its own shard; the optimizer
            starts fresh). Checked against the architecture here, before anything is built.
    """

    def __init__(
        self,
        arch: str | LlamaConfig | None = None,
        optimizer: OptimizerSettings | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(arch, Mapping):
            arch = llama_config_from_fields(arch)
        elif arch is not None and not isinstance(arch, (str, os.PathLike, LlamaConfig)):
            raise TypeError(
                f"arch must be a preset name, a LlamaConfig (or a mapping of its fields) or a Hugging Face model "
                f"directory; got {arch!r}."
            )
        if isinstance(optimizer, Mapping):
            optimizer = OptimizerSettings(**optimizer)
        elif optimizer is not None and not isinstance(optimizer, OptimizerSettings):
            raise TypeError(f"optimizer must be OptimizerSettings (or a mapping of its fields); got {optimizer!r}.")
        self.arch: LlamaConfig = resolve_arch(arch, init_weights)
        self.init_weights = None if init_weights is None else str(init_weights)
        if self.init_weights is not None:
            from lightning_llama_fp8.hf import check_hf_weights

            check_hf_weights(self.init_weights, self.arch)  # names, shapes and shard files; reads no tensor data
        self.optim = optimizer or OptimizerSettings()
        self.automatic_optimization = False
        # ModelCheckpoint warns for every manual-optimization module; its advice is wrong for this one (why: there).
        filter_manual_optimization_checkpoint_warning()
        self.model: torch.nn.Module | None = None
        # Each validation batch's loss is already reduced over all ranks, so the metric needs no sync.
        self.val_loss = MeanMetric(sync_on_compute=False)
        self._last_step_end: float | None = None
        self.step_times: list[float] = []
        self.last_loss: Tensor | None = None  # this step's global per-token loss, set before the optimizer step
        self.last_local_loss: Tensor | None = None  # the same over this rank's tokens only
        #: Whether the model applies RoPE to the whole QKV output (``LlamaConfig.fused_qkv_rope``; off by default for a
        #: data module that masks documents: set in ``setup``).
        self.fused_qkv_rope_in_use = self.arch.fused_qkv_rope_applies

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        """Check the data against the architecture, and the LR schedule against max_steps, before the model is built."""
        if stage == "fit":
            self.optim.check_schedule(self.trainer.max_steps)
        datamodule = getattr(self.trainer, "datamodule", None)
        check_data_matches_arch(
            self.arch, getattr(datamodule, "seq_length", None), getattr(datamodule, "vocab_size", None)
        )
        masking = bool(getattr(datamodule, "document_masking", False))
        if self.arch.fused_qkv_rope is True and masking:
            raise ValueError(f"model.arch.fused_qkv_rope cannot go with data.document_masking: {FUSED_QKV_ROPE_PACKED}")
        if self.model is not None:  # built by an earlier fit: its RoPE path stands
            if masking and self.fused_qkv_rope_in_use:
                raise ValueError(
                    "This module's model was built with fused QKV RoPE (for data without document masking) and this "
                    f"data module masks documents: {FUSED_QKV_ROPE_PACKED} Build a new LlamaLightningModule for it "
                    "(the default turns fused QKV RoPE off for such data), or set model.arch.fused_qkv_rope: false."
                )
            return
        self.fused_qkv_rope_in_use = self.arch.fused_qkv_rope_applies and not masking

    def configure_model(self) -> None:
        """Build GPTModel with the layout from the strategy and the precision from the plugin.

        With pipeline parallelism: this rank's stage; with a virtual pipeline, its chunks as a ``ModuleList``.
        """
        if self.model is not None:
            return
        chunks = build_model_chunks(self.arch, self.transformer_config())
        if self.init_weights is not None:
            from lightning_llama_fp8.hf import load_hf_weights

            load_hf_weights(chunks, self.init_weights, self.arch)
        self.model = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)

    @property
    def model_chunks(self) -> list[torch.nn.Module]:
        """The model chunks of this rank in virtual-stage order (one without a virtual pipeline), as trained."""
        if self.model is None:
            return []
        return list(self.model) if isinstance(self.model, torch.nn.ModuleList) else [self.model]

    def transformer_config(self) -> Any:
        """The TransformerConfig this run uses: architecture + strategy layout + precision."""
        from lightning_llama_fp8.strategy import MegatronCPStrategy

        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        if not isinstance(strategy, MegatronCPStrategy):
            raise TypeError(
                f"LlamaLightningModule needs Trainer(strategy=MegatronCPStrategy(...)); got {type(strategy).__name__}."
            )
        if not isinstance(precision, MegatronPrecision):
            raise TypeError(
                "LlamaLightningModule needs plugins=[TEFP8Precision()] (FP8) or plugins=[MegatronPrecision()] "
                f"(BF16); got {type(precision).__name__}."
            )
        overrides = {
            **strategy.transformer_config_kwargs(),
            **precision.transformer_config_kwargs(),
            "fused_single_qkv_rope": self.fused_qkv_rope_in_use,
        }
        return self.arch.transformer_config(**overrides)

    def configure_optimizers(self) -> dict[str, Any]:
        """Megatron's (distributed) Adam over the DDP-wrapped model, and its LR/WD scheduler."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        strategy = self.trainer.strategy
        config = OptimizerConfig(
            optimizer="adam",
            lr=self.optim.lr,
            min_lr=self.optim.min_lr,
            weight_decay=self.optim.weight_decay,
            adam_beta1=self.optim.adam_beta1,
            adam_beta2=self.optim.adam_beta2,
            adam_eps=self.optim.adam_eps,
            clip_grad=self.optim.clip_grad,
            decoupled_lr=self.optim.decoupled_lr,
            decoupled_min_lr=self.optim.decoupled_min_lr,
            bf16=True,
            params_dtype=torch.bfloat16,
            **strategy.optimizer_config_kwargs(),  # distributed optimizer, CPU offload
            **strategy.precision_plugin.optimizer_config_kwargs(),
        )
        optimizer = get_megatron_optimizer(config, self.model_chunks)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def lr_scheduler(self, optimizer: Any) -> Any:
        """Megatron's LR/WD scheduler; on resume it keeps its step count and takes this run's settings.

        ``override_opt_param_scheduler`` (Megatron-LM's ``--override-opt_param-scheduler``): a resumed run follows
        the schedule of its own config (warmup and decay steps, e.g. a larger ``max_steps`` stretches the decay), not
        the checkpoint's. The learning rates themselves (``lr``, ``min_lr``, ``decoupled_lr``, ...) must stay those
        of the checkpoint: Megatron matches the saved optimizer state to parameter groups by them.
        """
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        max_steps = self.trainer.max_steps if self.optim.decay_steps is None else 0  # 0: unused
        decay_steps = self.optim.check_schedule(max_steps)
        return OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=self.optim.lr,
            min_lr=self.optim.min_lr,
            lr_warmup_steps=self.optim.warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=self.optim.decay_style,
            start_wd=self.optim.weight_decay,
            end_wd=self.optim.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
        )

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # Megatron's scheduler counts in optimizer steps here; training_step steps it after each update.
        scheduler.step(increment=1)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()  # Lightning's wrapper: stepping it advances trainer.global_step
        megatron_optimizer = self.trainer.strategy.optimizers[0]
        for ddp in self.trainer.strategy.ddp_modules:
            ddp.zero_grad_buffer()
        megatron_optimizer.zero_grad()

        loss_sum, num_tokens = self.forward_backward(batch, forward_only=False)
        # Visible to on_before_optimizer_step hooks (NaNGuard checks it before the update).
        self.last_loss = loss = loss_sum / num_tokens
        update_successful, grad_norm, _ = optimizer.step()
        if update_successful:
            self.lr_scheduler_step(self.lr_schedulers(), None)

        self._log_train_step(loss, grad_norm, batch, megatron_optimizer)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss_sum, num_tokens = self.forward_backward(batch, forward_only=True)
        loss = loss_sum / num_tokens
        self.val_loss.update(loss, weight=num_tokens)
        return loss

    def on_validation_epoch_end(self) -> None:
        self._last_step_end = None  # validation time is not training step time
        if self.val_loss.update_count == 0:
            return
        val_loss = self.val_loss.compute()
        # Every rank holds the same value (each batch's loss is reduced over all ranks), which Lightning cannot tell
        # from a per-rank one: it warns at every validation unless the value is synced. The sync takes the max over
        # equal values (exact, unlike a mean: one small all-reduce per validation).
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True, reduce_fx="max")
        self.log("val/ppl", torch.exp(val_loss), sync_dist=True, reduce_fx="max")
        self.val_loss.reset()

    # ------------------------------------------------------------------ megatron schedule
    def forward_backward(self, batch: Batch, forward_only: bool) -> tuple[Tensor, Tensor]:
        """Run Megatron's schedule over the micro batches; return the global (sum of loss, token count).

        Both are summed over all micro batches and all data-parallel x context-parallel ranks, so every rank
        returns the same numbers and ``loss_sum / num_tokens`` is the per-token loss of the global batch.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        num_microbatches, micro_batch_size, seq_length = batch["tokens"].shape
        micro_batches = [{k: v[i] for k, v in batch.items()} for i in range(num_microbatches)]
        if CU_SEQLENS_KEY in batch:
            if self.fused_qkv_rope_in_use:  # off for a masking data module (setup); this batch came from elsewhere
                raise ValueError(
                    "This batch has document boundaries (document masking) and fused QKV RoPE is on "
                    "(model.arch.fused_qkv_rope, by default where it applies; a data module with document_masking "
                    f"turns it off): {FUSED_QKV_ROPE_PACKED} Set model.arch.fused_qkv_rope: false for such batches."
                )
            # Document masking: each micro batch runs as one packed sequence ([1, mbs * seq], see forward_inputs),
            # which is the activation shape pipeline stages send each other.
            seq_length, micro_batch_size = micro_batch_size * seq_length, 1
        chunks = self.model_chunks
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=chunk_data_iterators(micro_batches, len(chunks)),
            model=chunks,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
        # Only the last pipeline stage has the losses; every rank gets the global sums.
        loss_sum, num_tokens, local = reduce_pipeline_loss(losses, batch["tokens"].device)
        if not forward_only:
            # This rank's own share, before the DP x CP sum: lets NaNGuard's report say which rank went bad.
            self.last_local_loss = local[0] / local[1]
        return loss_sum, num_tokens

    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[Tensor, Any]:
        """Megatron's forward step: this micro batch's inputs (every pipeline stage reads its own copy of the micro
        batch, document boundaries included), the model's per-token losses, and the loss function."""
        from megatron.core import parallel_state

        inputs, loss_mask = forward_inputs(next(data_iterator), parallel_state.get_context_parallel_group())
        return model(**inputs), partial(masked_token_loss, loss_mask)

    # ------------------------------------------------------------------ logging
    def _log_train_step(self, loss: Tensor, grad_norm: float | None, batch: Batch, optimizer: Any) -> None:
        num_microbatches, micro_batch_size, seq_length = batch["tokens"].shape
        global_batch = num_microbatches * micro_batch_size * data_parallel_size_and_rank()[0]
        loss.item()  # waits for the step's GPU work, so wall time between step ends is the step time
        now = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True, batch_size=global_batch)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=global_batch)
        if grad_norm is not None:
            self.log("train/grad_norm", float(grad_norm), batch_size=global_batch)
        if self._last_step_end is not None:
            step_time = now - self._last_step_end
            self.step_times.append(step_time)
            tokens_per_gpu = global_batch * seq_length / (step_time * self.trainer.world_size)
            self.log("train/step_time_s", step_time, batch_size=global_batch)
            self.log("train/tokens_per_sec_per_gpu", tokens_per_gpu, prog_bar=True, batch_size=global_batch)
        if torch.cuda.is_available():  # a host-side counter read, no sync; this rank's peak since start
            self.log("train/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, batch_size=global_batch)
        self._last_step_end = now

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None


def masked_token_loss(loss_mask: Tensor, output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron's per-token loss function: sum of masked token losses, the token count, and a report.

    With ``calculate_per_token_loss`` the schedule does not average; ``finalize_model_grads`` divides the
    gradients by the token count summed over all micro batches and DP x CP ranks.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.to(loss.dtype)])
    return loss, num_tokens, {"lm loss": report}


def forward_inputs(micro_batch: Batch, cp_group: Any, with_labels: bool = True) -> tuple[dict[str, Any], Tensor]:
    """GPTModel's keyword arguments for one micro batch (``[micro_batch_size, seq]`` tensors), and its loss mask.

    Without document boundaries: the batch as it is, this CP rank's share of it. With them (document masking,
    ``data/packing.py``): the micro batch's samples laid end to end as one packed sequence ``[1, mbs * seq]``, whose
    ``PackedSeqParams`` make attention run per document and RoPE restart per document; the loss mask is laid out
    the same way, so the per-token losses line up. ``with_labels=False`` leaves the labels out: the model then
    returns logits (``[1, mbs * seq, vocab]`` packed).
    """
    boundaries = micro_batch.get(CU_SEQLENS_KEY)
    if boundaries is None:
        micro_batch = split_for_context_parallel(micro_batch, cp_group)
        flat = micro_batch
        packed = None
    else:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(cp_group) > 1:
            # data.document_masking refuses context parallelism before anything is built; this is a safety net for a
            # batch built elsewhere.
            raise ValueError(
                "Document masking (a batch with document boundaries) cannot run with context parallelism: "
                + packing.document_masking_problems(context_parallel_size=torch.distributed.get_world_size(cp_group))[0]
            )
        flat = {key: micro_batch[key].reshape(1, -1) for key in BATCH_KEYS}
        packed = packing.packed_seq_params(boundaries, flat["tokens"].device)
    inputs: dict[str, Any] = {
        "input_ids": flat["tokens"],
        "position_ids": flat["position_ids"],
        "attention_mask": None,
    }
    if with_labels:
        inputs["labels"] = flat["labels"]
    if packed is not None:
        inputs["packed_seq_params"] = packed
    return inputs, flat["loss_mask"]


def split_for_context_parallel(micro_batch: Batch, cp_group: Any) -> Batch:
    """Keep this CP rank's two load-balanced chunks of every sequence (Megatron's zig-zag split)."""
    if torch.distributed.get_world_size(cp_group) == 1:
        return micro_batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(micro_batch), is_hybrid_cp=False, cp_group=cp_group)
