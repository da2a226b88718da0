"""MegatronCPStrategy on 4 gloo processes: which ranks share which group, CP batch split, loss reduction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_llama_fp8 import MegatronCPStrategy
from lightning_llama_fp8.checkpoint.info import CheckpointError
from tests.helpers import run_distributed


def _strategy_worker(rank: int, world_size: int, tp: int, cp: int) -> dict:
    from lightning.pytorch import Trainer
    from megatron.core import parallel_state

    from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision
    from lightning_llama_fp8.model import masked_token_loss, split_for_context_parallel
    from lightning_llama_fp8.parallel.pipeline import reduce_pipeline_loss

    strategy = MegatronCPStrategy(tensor_model_parallel_size=tp, context_parallel_size=cp)
    trainer = Trainer(
        accelerator="cpu", devices=world_size, strategy=strategy, plugins=[MegatronPrecision()], logger=False
    )
    assert trainer.strategy.launcher is None  # torchrun-style: processes already exist
    strategy.setup_environment()

    def ranks(group: object) -> list[int]:
        return torch.distributed.get_process_group_ranks(group)

    out = {
        "tp": ranks(parallel_state.get_tensor_model_parallel_group()),
        "cp": ranks(parallel_state.get_context_parallel_group()),
        "dp": ranks(parallel_state.get_data_parallel_group()),
        "dp_cp": ranks(parallel_state.get_data_parallel_group(with_context_parallel=True)),
        "amax": ranks(parallel_state.get_amax_reduction_group(with_context_parallel=True)),
        "sampler": strategy.distributed_sampler_kwargs,
        "reduced_sum": strategy.reduce(torch.tensor([float(rank)]), reduce_op="sum").item(),
        "config": strategy.transformer_config_kwargs(),
    }

    # CP split of a sequence of 8 positions: rank r of CP keeps chunks r and 2*CP-1-r of 2*CP chunks.
    seq = torch.arange(8).view(1, 8)
    split = split_for_context_parallel(
        {"tokens": seq.clone(), "loss_mask": torch.ones(1, 8)}, parallel_state.get_context_parallel_group()
    )
    out["cp_tokens"] = split["tokens"].flatten().tolist()

    # Loss arithmetic: every rank of a model replica computes its CP shard's per-token losses; DP ranks hold
    # different samples. Rank-specific losses and masks, then the global per-token mean.
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    per_token = torch.full((1, 4), 1.0 + dp_rank * 10 + cp_rank)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]]) if cp_rank == 0 else torch.ones(1, 4)
    reports = [masked_token_loss(mask, per_token)[2] for _ in range(2)]  # two micro batches
    loss_sum, tokens, local = reduce_pipeline_loss(reports, torch.device("cpu"))
    out["local_tokens"] = local[1].item()
    out["loss"] = (loss_sum / tokens).item()
    out["tokens"] = tokens.item()
    strategy.teardown()
    return out


@pytest.mark.parametrize("tp,cp", [(2, 2), (1, 2)], ids=["tp2xcp2", "tp1xcp2xdp2"])
def test_topology_on_four_gloo_processes(tp: int, cp: int, tmp_path: Path) -> None:
    results = run_distributed(_strategy_worker, 4, tmp_path, tp, cp)
    if (tp, cp) == (2, 2):
        expected = {"tp": [[0, 1], [0, 1], [2, 3], [2, 3]], "cp": [[0, 2], [1, 3], [0, 2], [1, 3]]}
        expected["dp"] = [[0], [1], [2], [3]]
        expected["dp_cp"] = [[0, 2], [1, 3], [0, 2], [1, 3]]
        sampler = [{"num_replicas": 1, "rank": 0}] * 4
    else:
        expected = {"tp": [[0], [1], [2], [3]], "cp": [[0, 1], [0, 1], [2, 3], [2, 3]]}
        expected["dp"] = [[0, 2], [1, 3], [0, 2], [1, 3]]
        expected["dp_cp"] = [[0, 1, 2, 3]] * 4
        sampler = [{"num_replicas": 2, "rank": r} for r in (0, 0, 1, 1)]
    for key, per_rank in expected.items():
        assert [r[key] for r in results] == per_rank, key
    assert [r["sampler"] for r in results] == sampler
    # FP8 amaxes are reduced over every rank of TP x DP x CP.
    assert all(r["amax"] == [0, 1, 2, 3] for r in results)
    # reduce() sums over DP x CP only: TP ranks hold copies of the same value.
    assert [r["reduced_sum"] for r in results] == [float(sum(g)) for g in expected["dp_cp"]]
    assert all(r["config"]["tensor_model_parallel_size"] == tp for r in results)
    assert all(r["config"]["context_parallel_size"] == cp and r["config"]["cp_comm_type"] == "p2p" for r in results)

    # Zig-zag split, hand computed for 8 positions in 4 chunks of 2: CP rank 0 keeps chunks 0 and 3.
    cp_rank_of = [(r // tp) % cp for r in range(4)]
    hand = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}
    assert [r["cp_tokens"] for r in results] == [hand[c] for c in cp_rank_of]

    # Global per-token mean, by hand: each replica (dp) has CP shards with value 1 + 10*dp + cp, rank cp=0
    # masks one of its 4 tokens; two micro batches double numerator and denominator alike.
    dps = 1 if (tp, cp) == (2, 2) else 2
    num = sum(2 * (3 * (1 + 10 * d) + 4 * (2 + 10 * d)) for d in range(dps))
    den = sum(2 * (3 + 4) for _ in range(dps))
    assert all(r["tokens"] == den for r in results)
    assert all(r["loss"] == pytest.approx(num / den) for r in results)
    # Each rank also keeps its own share: two micro batches of 3 (CP rank 0, one token masked) or 4 tokens.
    assert [r["local_tokens"] for r in results] == [2 * (3 if c == 0 else 4) for c in cp_rank_of]


def test_layout_error_before_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of a 2-process job with TP 4 fails in setup_environment, before torch.distributed starts."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LayoutError, MegatronCPStrategy, MegatronPrecision

    for key, value in dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29599",
        RANK="0",
        LOCAL_RANK="0",
        NODE_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    ).items():
        monkeypatch.setenv(key, value)
    strategy = MegatronCPStrategy(tensor_model_parallel_size=4)
    Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
    with pytest.raises(LayoutError, match="world size 2 is not divisible by TP 4 x CP 1 = 4"):
        strategy.setup_environment()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("comm", ["p2p", "a2a", "all_gather"])
def test_cp_comm_type_reaches_the_transformer_config(comm: str) -> None:
    from lightning_llama_fp8 import get_preset

    strategy = MegatronCPStrategy(context_parallel_size=2, cp_comm_type=comm)
    strategy.parallel_devices = [torch.device("cpu")] * 2
    kwargs = strategy.transformer_config_kwargs()
    assert kwargs["cp_comm_type"] == comm and kwargs["context_parallel_size"] == 2
    config = get_preset("llama_tiny", apply_rope_fusion=False).transformer_config(**kwargs)
    assert config.cp_comm_type == comm and config.context_parallel_size == 2


def _weights_worker(rank: int, world_size: int) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Build llama_tiny (local spec) with TP = world size; return each weight with its TP partition dim/stride."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import MegatronCPStrategy, MegatronPrecision, get_preset

    torch.manual_seed(7)  # the CPU generator Megatron's CPU initialisation draws from
    strategy = MegatronCPStrategy(tensor_model_parallel_size=world_size, use_cpu_initialization=True)
    Trainer(accelerator="cpu", devices=world_size, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
    strategy.setup_environment()
    arch = get_preset("llama_tiny", transformer_impl="local", vocab_size=1024)
    model = arch.build_model(arch.transformer_config(**strategy.transformer_config_kwargs()))
    out = {}
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", -1) if split else -1
        out[name] = (param.detach().float().clone(), dim, getattr(param, "partition_stride", 1))
    strategy.teardown()
    return out


def _unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of Megatron's CPU split: the full weight is [stride chunk 0 of every rank, stride chunk 1, ...]."""
    chunks = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([chunks[rank][j] for j in range(stride) for rank in range(len(shards))], dim=dim)


def test_cpu_initialization_gives_tp2_the_slices_of_the_one_gpu_weights(tmp_path: Path) -> None:
    """With use_cpu_initialization every TP size starts from the same model (how parallel_equivalence compares)."""
    (single,) = run_distributed(_weights_worker, 1, tmp_path / "tp1")
    tp2 = run_distributed(_weights_worker, 2, tmp_path / "tp2")
    assert single.keys() == tp2[0].keys()
    strides = set()
    for name, (full, _, _) in single.items():
        shards = [rank_weights[name][0] for rank_weights in tp2]
        dim, stride = tp2[0][name][1], tp2[0][name][2]
        strides.add(stride)
        rebuilt = shards[0] if dim < 0 else _unshard(shards, dim, stride)
        if dim < 0:
            assert torch.equal(shards[0], shards[1]), name  # replicated weights (norms) agree across ranks
        assert torch.equal(rebuilt, full), name
    assert strides == {1, 2}  # the SwiGLU fc1 [gate; up] interleave (stride 2) was exercised


def test_weights_only_loading_is_refused_with_the_reason() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(CheckpointError, match=r"cannot be loaded with weights_only=True: they hold pickled data"):
        MegatronCPStrategy().load_checkpoint("any.ckpt", weights_only=True)


def test_strategy_rejects_unknown_optimizer_sharding() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(ValueError, match="'dp_reshardable' or 'fully_reshardable'"):
        MegatronCPStrategy(checkpoint_optimizer_sharding="zero")  # type: ignore[arg-type]


def test_align_param_gather_without_overlap_is_refused() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(ValueError, match="align_param_gather=True has no effect without overlap_param_gather=True"):
        MegatronCPStrategy(overlap_param_gather=False, align_param_gather=True)
    MegatronCPStrategy(overlap_param_gather=True, align_param_gather=True)
