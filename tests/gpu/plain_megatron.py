"""A plain Megatron-Core training loop, written the way Megatron-LM's ``train_step`` is, without Lightning.

It is the reference the Lightning path must reproduce: same seed, same data, same model definition, so the
per-step losses must agree. It shares nothing with ``LlamaLightningModule`` but the architecture dataclass
and the data module (the things being held equal).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import numpy as np
import torch

from lightning_llama_fp8.config import LlamaConfig


def train_plain_megatron(
    arch: LlamaConfig,
    batches: list[dict[str, torch.Tensor]],
    seed: int,
    fp8: dict[str, Any] | None,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
) -> list[float]:
    """Train on ``batches`` (each ``[num_micro, mbs, seq]``) on one GPU; return the per-step losses."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)

    config = arch.transformer_config(**(fp8 or {}))
    model = arch.build_model(config).cuda()
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        use_distributed_optimizer=True,
        fp8_param_gather=bool(fp8 and fp8.get("fp8_param")),
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=min_lr,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
            overlap_param_gather=True,
        ),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    def loss_func(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple:
        losses = output.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = (losses * mask).sum()
        tokens = mask.sum().to(torch.int)
        return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}

    def forward_step(data_iterator: Any, model_chunk: torch.nn.Module) -> tuple:
        micro = next(data_iterator)
        output = model_chunk(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
        return output, partial(loss_func, micro["loss_mask"])

    losses = []
    for batch in batches:
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        n_micro, mbs, seq = batch["tokens"].shape
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([{k: v[i] for k, v in batch.items()} for i in range(n_micro)]),
            model=[model],
            num_microbatches=n_micro,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=False,
        )
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        losses.append((total[0] / total[1]).item())
    parallel_state.destroy_model_parallel()
    return losses
