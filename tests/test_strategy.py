"""MegatronCPStrategy (strategy.py): its settings and the checks it makes before any process group exists, and the
strategy at work on gloo processes on the CPU: which ranks share which group, the CP batch split, the loss
reduction, TP slices of CPU-initialized weights, the optimizer step inside the precision's context, Lightning's own
launcher, and two nodes under torchrun and under SLURM (localhost)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_llama_fp8 import (
    FP8UnavailableError,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    TEFP8Precision,
    get_preset,
)
from lightning_llama_fp8.checkpoint.info import CheckpointError
from lightning_llama_fp8.parallel.layout import ParallelLayout
from lightning_llama_fp8.validate import SettingError
from tests.helpers import (
    LAUNCH_PROBE,
    MULTINODE_PROBE,
    REPO_ROOT,
    NeverBuilt,
    fit_never_built,
    free_port,
    run_distributed,
)


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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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

    with pytest.raises(ValueError, match=r"must be 'dp_reshardable' .* or 'fully_reshardable'"):
        MegatronCPStrategy(checkpoint_optimizer_sharding="zero")  # type: ignore[arg-type]


def test_align_param_gather_without_overlap_is_refused() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    with pytest.raises(ValueError, match="align_param_gather=True has no effect without overlapped parameter gathers"):
        MegatronCPStrategy(overlap_param_gather=False, align_param_gather=True)
    with pytest.raises(ValueError, match="align_param_gather=True has no effect"):
        MegatronCPStrategy(use_distributed_optimizer=False, align_param_gather=True)
    MegatronCPStrategy(overlap_param_gather=True, align_param_gather=True)


def test_overlap_param_gather_needs_distributed_optimizer() -> None:
    with pytest.raises(ValueError, match=r"overlap_param_gather=True needs use_distributed_optimizer=True"):
        MegatronCPStrategy(overlap_param_gather=True, use_distributed_optimizer=False)
    strategy = MegatronCPStrategy(overlap_param_gather=False, use_distributed_optimizer=False)
    assert not strategy.overlap_param_gather and not strategy.use_distributed_optimizer


def test_overlap_param_gather_follows_the_distributed_optimizer_by_default() -> None:
    assert MegatronCPStrategy().overlap_param_gather is True
    assert MegatronCPStrategy(use_distributed_optimizer=False).overlap_param_gather is False


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"accumulate_grad_batches": 4}, "raise the data module's global_batch_size"),
        ({"gradient_clip_val": 1.0}, r"OptimizerSettings\(clip_grad=...\)"),
    ],
)
def test_trainer_accumulation_and_clipping_are_refused_with_megatrons_way(
    setting: dict[str, Any], message: str
) -> None:
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LlamaLightningModule

    trainer = Trainer(strategy=MegatronCPStrategy(), accelerator="cpu", devices=1, logger=False, **setting)
    with pytest.raises(ValueError, match=message):
        trainer.fit(LlamaLightningModule(arch="llama_tiny"))


def test_sequence_parallel_without_tp_is_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_llama_fp8.strategy"):
        strategy = MegatronCPStrategy(sequence_parallel=True)
    assert strategy.layout.sequence_parallel is False
    assert "sequence_parallel needs tensor_model_parallel_size > 1" in caplog.text
    assert MegatronCPStrategy(tensor_model_parallel_size=2, sequence_parallel=True).layout.sequence_parallel is True


def test_strategy_records_its_layout() -> None:
    strategy = MegatronCPStrategy(tensor_model_parallel_size=2, context_parallel_size=4, cp_comm_type="a2a")
    assert strategy.layout == ParallelLayout(
        tensor_model_parallel_size=2, context_parallel_size=4, sequence_parallel=False, cp_comm_type="a2a"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tensor_model_parallel_size": 2.5}, r"tensor_model_parallel_size must be a whole number >= 1; got 2\.5, wh"),
        ({"context_parallel_size": 0}, r"context_parallel_size must be a whole number >= 1; got 0\."),
        ({"pipeline_model_parallel_size": True}, r"pipeline_model_parallel_size must be a whole number >= 1; got True"),
        (
            {"virtual_pipeline_model_parallel_size": 2.5},
            r"virtual_pipeline_model_parallel_size must be a whole number;",
        ),
        ({"num_layers_in_first_pipeline_stage": "two"}, r"num_layers_in_first_pipeline_stage must be a whole number;"),
        ({"bucket_size": 0}, r"bucket_size must be a whole number >= 1; got 0\."),
        ({"seed": -1}, r"seed must be a whole number >= 0 and <= 4,294,967,295; got -1\."),
    ],
)
def test_strategy_sizes_are_whole_numbers_in_range_when_it_is_made(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MegatronCPStrategy(**arguments)


def test_strategy_takes_integral_floats_as_ints() -> None:
    strategy = MegatronCPStrategy(tensor_model_parallel_size=2.0, pipeline_model_parallel_size=2.0, seed=7.0)
    assert strategy.layout == ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert type(strategy.layout.tensor_model_parallel_size) is int and strategy.seed == 7


def test_strategy_is_registered_by_name() -> None:
    assert "megatron_cp" in StrategyRegistry
    assert StrategyRegistry["megatron_cp"]["strategy"] is MegatronCPStrategy
    precision = MegatronPrecision()
    trainer = Trainer(strategy="megatron_cp", accelerator="cpu", devices=1, plugins=[precision], logger=False)
    assert isinstance(trainer.strategy, MegatronCPStrategy)
    assert trainer.strategy.layout == ParallelLayout()
    assert trainer.precision_plugin is precision
    assert trainer.strategy.root_device == torch.device("cpu")


def test_strategy_rejects_a_non_megatron_precision_before_starting_processes() -> None:
    strategy = MegatronCPStrategy()
    Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)  # default 32-true Precision
    with pytest.raises(TypeError, match=r"trains Megatron models in BF16 or FP8, but the Trainer's precision plugin"):
        strategy.setup_environment()
    assert not torch.distributed.is_initialized()


def test_fp8_on_a_machine_without_fp8_fails_first() -> None:
    with pytest.raises(FP8UnavailableError, match=r"compute capability >= 8\.9.*fallback='bf16'"):
        fit_never_built(TEFP8Precision())
    assert not torch.distributed.is_initialized()


def test_cpu_initialization_of_fp8_weights_fails_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on an FP8 GPU: the support check passes, so the combination itself must be refused.
    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    with pytest.raises(ValueError, match=r"use_cpu_initialization=False .* or fp8_param_gather=False"):
        fit_never_built(TEFP8Precision(fp8_param_gather=True), use_cpu_initialization=True)
    assert not torch.distributed.is_initialized()
    strategy = MegatronCPStrategy()  # the GPU init (default) with FP8 weights passes the same check
    strategy.precision_plugin = TEFP8Precision(fp8_param_gather=True)
    strategy._check_precision_plugin()


def test_layout_that_cannot_work_fails_first() -> None:
    with pytest.raises(ValueError, match="num_attention_heads 8 is not divisible by TP 3"):
        fit_never_built(MegatronPrecision(), tensor_model_parallel_size=3)


def test_lightning_precision_flag_is_rejected_with_the_fix() -> None:
    module = NeverBuilt(get_preset("llama_tiny", transformer_impl="local"))
    trainer = Trainer(accelerator="cpu", devices=1, strategy=MegatronCPStrategy(), precision="bf16-mixed", logger=False)
    with pytest.raises(TypeError, match=r"plugins=\[TEFP8Precision\(\)\]"):
        trainer.fit(module, datamodule=MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4))


def test_gradient_accumulation_fusion_needs_transformer_engine_layers_and_fails_first() -> None:
    with pytest.raises(ValueError, match=r"gradient_accumulation_fusion=True\) fuses .* local layer spec"):
        fit_never_built(MegatronPrecision(), gradient_accumulation_fusion=True)
    assert not torch.distributed.is_initialized()


def _attached_strategy(arch_impl: str, callbacks: list, **strategy_kwargs: object) -> MegatronCPStrategy:
    """A strategy whose module (with a TE or local arch) is attached to a Trainer with ``callbacks``."""
    strategy = MegatronCPStrategy(**strategy_kwargs)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=callbacks, logger=False)
    module = NeverBuilt(get_preset("llama_tiny", transformer_impl=arch_impl))
    module.trainer = trainer
    strategy.connect(module)
    return strategy


def test_gradient_accumulation_fusion_default_is_on_only_where_it_applies() -> None:
    from lightning_llama_fp8.callbacks import FaultInjector

    gradient_fault = FaultInjector("gradient", "model.embedding.word_embeddings.weight", step=1)
    activation_fault = FaultInjector("activation", "model.decoder", step=1)
    assert gradient_fault.needs_unfused_weight_gradients and not activation_fault.needs_unfused_weight_gradients
    assert _attached_strategy("transformer_engine", [])._fuses_gradient_accumulation() is True
    assert _attached_strategy("transformer_engine", [activation_fault])._fuses_gradient_accumulation() is True
    assert _attached_strategy("local", [])._fuses_gradient_accumulation() is False
    # A gradient injection hooks the unfused gradient: the default leaves the fusion off for it.
    assert _attached_strategy("transformer_engine", [gradient_fault])._fuses_gradient_accumulation() is False
    off = _attached_strategy("transformer_engine", [], gradient_accumulation_fusion=False)
    assert off._fuses_gradient_accumulation() is False
    # Asked for explicitly, it is refused with such a callback (before anything is built: setup_environment's check).
    on = _attached_strategy("transformer_engine", [gradient_fault], gradient_accumulation_fusion=True)
    with pytest.raises(ValueError, match=r"with FaultInjector: .* the gradient hook that callback relies on"):
        on._check_gradient_accumulation_fusion(on.lightning_module.arch)
    on_alone = _attached_strategy("transformer_engine", [], gradient_accumulation_fusion=True)
    on_alone._check_gradient_accumulation_fusion(on_alone.lightning_module.arch)
    assert on_alone._fuses_gradient_accumulation() is True


def _fit_with_recording_precision(rank: int, world_size: int) -> dict[str, Any]:
    """Two steps through MegatronCPStrategy (without Megatron's DDP, which needs CUDA) with a precision whose
    optimizer-step context records what ran inside it."""
    from tests.helpers import StrategyWithoutDDP, cpu_trainer
    from tests.helpers.models import Recorder, mock_data

    events: list[str] = []

    class RecordingPrecision(MegatronPrecision):
        @contextlib.contextmanager
        def optimizer_step_context(self, modules: list[nn.Module]) -> Any:
            events.append(f"enter {len(modules)}")
            yield
            events.append("exit")

    class Tiny(Recorder):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = super().configure_optimizers()
            step = optimizer.step

            def recorded_step(*args: Any, **kwargs: Any) -> Any:
                events.append("optimizer.step")
                return step(*args, **kwargs)

            optimizer.step = recorded_step  # type: ignore[method-assign]
            return optimizer

    data = mock_data(16, 1, vocab_size=100)
    trainer = cpu_trainer(devices=1, strategy=StrategyWithoutDDP(), plugins=[RecordingPrecision()], max_steps=2)
    trainer.fit(Tiny(16), datamodule=data)  # without Megatron's DDP the context is handed an empty module list
    return {"events": events}


@pytest.mark.multiprocess
def test_the_strategy_runs_each_optimizer_step_inside_the_precisions_context(tmp_path: Any) -> None:
    from tests.helpers import run_distributed

    (result,) = run_distributed(_fit_with_recording_precision, 1, tmp_path)
    assert result["events"] == ["enter 0", "optimizer.step", "exit"] * 2


@pytest.mark.multiprocess
def test_lightning_launcher_starts_both_ranks_with_megatron_groups(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(LAUNCH_PROBE), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["global_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    # CP 2 on 2 processes: one context-parallel group of both ranks, data-parallel size 1.
    assert all(r["cp_group"] == [0, 1] and r["dp_size"] == 1 for r in records)
    assert all(r["sampler"] == {"num_replicas": 1, "rank": 0} for r in records)


TIMEOUT_S = 300


def _clean_env() -> dict[str, str]:
    """This process's environment without any launcher's rank variables, and with the package importable."""
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher_vars and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait(processes: list[subprocess.Popen[str]]) -> None:
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _records(out_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("pp", [1, 2], ids=["tp2xdp2", "tp2xpp2"])
def test_torchrun_two_nodes_two_processes_each(tmp_path: Path, pp: int) -> None:
    """Two ``torchrun --nnodes 2 --nproc_per_node 2 --node_rank i`` on localhost, TP2 x DP2 or TP2 x PP2."""
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(MULTINODE_PROBE),
                str(tmp_path),
                "2",
                "1",
                str(pp),
            ],
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    _wait(nodes)
    records = _records(tmp_path, 4)
    assert {r["cluster_environment"] for r in records} == {"TorchElasticEnvironment"}
    assert [r["global_rank"] for r in records] == [r["torch_rank"] for r in records] == [0, 1, 2, 3]
    assert [(r["node_rank"], r["local_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["world_size"] == r["torch_world_size"] == 4 for r in records)
    # TP inside a node; DP (or the pipeline stages) across the nodes.
    assert [r["tp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(len({records[rank]["node_rank"] for rank in r["tp"]}) == 1 for r in records)
    if pp == 1:
        assert [r["dp"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1)]
        assert [r["reduced"] for r in records] == [2.0, 4.0, 2.0, 4.0]  # sums over each DP group's global ranks
    else:  # stage 0 on node 0, stage 1 on node 1; one model replica, both stages read the same samples
        assert [r["pp_rank"] for r in records] == [0, 0, 1, 1]
        assert [r["pp"] for r in records] == [r["embedding"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["dp"] for r in records] == [[0], [1], [2], [3]]
        assert [r["sampler"] for r in records] == [{"num_replicas": 1, "rank": 0}] * 4


@pytest.mark.multiprocess
def test_slurm_two_nodes_two_tasks_each(tmp_path: Path) -> None:
    """Four processes with the variables ``srun --nodes 2 --ntasks-per-node 2`` sets, CP2 x DP2."""
    port = free_port()
    tasks = []
    for rank in range(4):
        env = _clean_env() | {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "llama3_8b_fp8",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % 2),
            "SLURM_NODEID": str(rank // 2),
            "MASTER_PORT": str(port),
        }
        tasks.append(
            subprocess.Popen(
                [sys.executable, str(MULTINODE_PROBE), str(tmp_path), "1", "2"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    _wait(tasks)
    records = _records(tmp_path, 4)
    assert {r["cluster_environment"] for r in records} == {"SLURMEnvironment"}
    assert [r["global_rank"] for r in records] == [r["torch_rank"] for r in records] == [0, 1, 2, 3]
    assert [(r["node_rank"], r["local_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["world_size"] == 4 for r in records)
    assert [r["cp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1)]
    assert all(r["reduced"] == 6.0 for r in records)  # DP x CP spans all four ranks


def test_async_save_is_off_by_default() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy

    assert MegatronCPStrategy().async_save is False
    assert MegatronCPStrategy(async_save=True).pending_checkpoint is None


# ---------------------------------------------------------------------------------------------- deterministic mode
@pytest.fixture
def torch_determinism(monkeypatch: pytest.MonkeyPatch) -> Any:
    """PyTorch's deterministic flags and the variables deterministic mode reads, as they were, after the test
    (``Trainer(deterministic=...)`` changes both process-wide)."""
    from lightning_llama_fp8.parallel import determinism

    for name in determinism.DETERMINISTIC_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _deterministic_strategy(deterministic: Any, **strategy_kwargs: Any) -> MegatronCPStrategy:
    strategy = MegatronCPStrategy(**strategy_kwargs)
    Trainer(
        accelerator="cpu", devices=1, strategy=strategy, plugins=[MegatronPrecision()], deterministic=deterministic,
        logger=False,
    )  # fmt: skip
    return strategy


def _deterministic_worker(rank: int, world_size: int) -> dict[str, Any]:
    """setup_environment under Trainer(deterministic=True), then the model's TransformerConfig and embedding, then
    teardown: what each saw of deterministic mode."""
    from tests.helpers.models import tiny_llama

    watched = ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "NCCL_ALGO", "CUBLAS_WORKSPACE_CONFIG")
    strategy = _deterministic_strategy(True)
    strategy.setup_environment()
    during = {name: os.environ.get(name) for name in watched}
    arch = tiny_llama()
    config = arch.transformer_config(**strategy.transformer_config_kwargs())
    model = arch.build_model(config)
    strategy.teardown()
    return {
        "during": during,
        "after": {name: os.environ.get(name) for name in watched},
        "config": config.deterministic_mode,
        "embedding": model.embedding.word_embeddings.deterministic_mode,
    }


@pytest.mark.multiprocess
def test_deterministic_trainer_reaches_megatron_and_transformer_engine(tmp_path: Path) -> None:
    """Trainer(deterministic=True): Megatron's TransformerConfig (and through it the embedding's deterministic
    backward) and Transformer Engine's attention setting, set before the model is built and given back after."""
    (result,) = run_distributed(_deterministic_worker, 1, tmp_path)
    assert result["config"] is True and result["embedding"] is True
    assert result["during"] == {
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "NCCL_ALGO": "^NVLS",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # Lightning's
    }
    # What the strategy set is gone again; Lightning's own setting stays, as Lightning leaves it.
    assert result["after"] == {
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": None,
        "NCCL_ALGO": None,
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


def test_default_trainer_leaves_deterministic_mode_off(torch_determinism: None) -> None:
    strategy = _deterministic_strategy(None)
    strategy._enter_deterministic_mode()
    assert strategy.deterministic_mode.on is False
    assert strategy.transformer_config_kwargs()["deterministic_mode"] is False
    assert "NVTE_ALLOW_NONDETERMINISTIC_ALGO" not in os.environ and "NCCL_ALGO" not in os.environ


def test_deterministic_mode_is_logged_once_per_setup(torch_determinism: None, caplog: pytest.LogCaptureFixture) -> None:
    strategy = _deterministic_strategy(True)
    with caplog.at_level(logging.INFO):
        strategy._enter_deterministic_mode()
    assert caplog.text.count("Deterministic mode: on (Trainer(deterministic=True))") == 1
    assert "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0" in caplog.text and "NCCL_ALGO=^NVLS" in caplog.text
    assert strategy.transformer_config_kwargs()["deterministic_mode"] is True
    strategy._enter_deterministic_mode()  # a second setup (validate after fit) keeps what the first set
    assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    strategy.teardown()
    assert "NVTE_ALLOW_NONDETERMINISTIC_ALGO" not in os.environ and "NCCL_ALGO" not in os.environ


def test_deterministic_warn_says_what_it_cannot_promise(
    torch_determinism: None, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = _deterministic_strategy("warn")
    with caplog.at_level(logging.INFO):
        strategy._enter_deterministic_mode()
    assert strategy.deterministic_mode.on and strategy.deterministic_mode.warn_only
    assert "Trainer(deterministic=warn)" in caplog.text
    assert "bitwise reproducible only if no such warning appears" in caplog.text
    assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"  # the rest of the mode is on all the same
    strategy.teardown()


@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1", r"NVTE_ALLOW_NONDETERMINISTIC_ALGO=1 lets Transformer Engine run"),
        ("NCCL_ALGO", "NVLS", r"NCCL_ALGO=NVLS may let NCCL reduce in no fixed order"),
        ("CUBLAS_WORKSPACE_CONFIG", ":0:0", r"CUBLAS_WORKSPACE_CONFIG=:0:0 is not one of"),
    ],
)
def test_settings_that_contradict_deterministic_mode_are_refused_before_any_process_group(
    torch_determinism: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    from lightning_llama_fp8.parallel.determinism import DeterminismError

    strategy = _deterministic_strategy(True)
    monkeypatch.setenv(variable, value)  # after the Trainer, which sets CUBLAS_WORKSPACE_CONFIG itself
    with pytest.raises(DeterminismError, match=message):
        strategy.setup_environment()
    assert not torch.distributed.is_initialized()
    assert os.environ[variable] == value  # nothing changed
    assert "NCCL_ALGO" not in os.environ or variable == "NCCL_ALGO"


@pytest.mark.parametrize(
    "setting",
    [{"use_distributed_optimizer": "false"}, {"async_save": "yes"}, {"overlap_param_gather": 1.5}],
)
def test_switches_must_be_true_or_false(setting: dict[str, Any]) -> None:
    """A string "false" is truthy: it kept the distributed optimizer on."""
    ((name, value),) = setting.items()
    with pytest.raises(SettingError, match=rf"{name} must be true or false; got {value!r}"):
        MegatronCPStrategy(**setting)


def test_timeout_must_be_a_timedelta() -> None:
    with pytest.raises(TypeError, match=r"timeout must be a datetime.timedelta \(or None\), got 60"):
        MegatronCPStrategy(timeout=60)  # type: ignore[arg-type]


def test_fp8_on_local_layers_fails_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model was built with config.fp8 set and no TE module: it trained in BF16 while the log said FP8."""
    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    with pytest.raises(ValueError, match=r"transformer_impl is 'local' .* the model would train in BF16"):
        fit_never_built(TEFP8Precision())
    assert not torch.distributed.is_initialized()


def test_transformer_engine_layers_without_transformer_engine_fail_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``llama-fp8 fit`` says before building, instead of Megatron's errors after the process groups."""
    from lightning_llama_fp8 import get_preset

    monkeypatch.setattr("lightning_llama_fp8.strategy.transformer_engine_installed", lambda: False)
    with pytest.raises(ValueError, match=r"is 'transformer_engine' .* but Transformer Engine does not import here"):
        fit_never_built(MegatronPrecision(), arch=get_preset("llama_tiny"))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_megatron_gradient_nan_check_cannot_go_with_a_guard_that_skips(policy: str) -> None:
    """Megatron raises while reducing a non-finite gradient, before NaNGuard could veto or roll back the step."""
    from lightning_llama_fp8.callbacks import NaNGuard

    strategy = MegatronCPStrategy(check_for_nan_in_grad=True)
    strategy._trainer_callbacks = lambda: [NaNGuard(policy=policy)]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=rf"NaNGuard\(policy='{policy}'\) could never skip or roll back"):
        strategy._check_nan_check_against_nan_guard()
    strategy._trainer_callbacks = lambda: [NaNGuard(policy="raise")]  # type: ignore[method-assign]
    strategy._check_nan_check_against_nan_guard()


def test_strategy_seed_decides_the_cpu_initialised_weights() -> None:
    """Megatron's CPU initialisation draws from torch's CPU generator, which only seed_everything used to seed:
    seed 1 gave other weights at each build, and seeds 1 and 2 the same weights after a seed_everything."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LlamaLightningModule, get_preset

    def first_weights(seed: int) -> torch.Tensor:
        strategy = MegatronCPStrategy(use_cpu_initialization=True, seed=seed)
        module = LlamaLightningModule(get_preset("llama_tiny", transformer_impl="local", apply_rope_fusion=False))
        trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
        strategy._lightning_module = module
        module.trainer = trainer
        torch.manual_seed(int(torch.randint(0, 1000, ())))  # whatever state the process is in
        try:
            strategy.setup_environment()
            module.configure_model()
            return module.model.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
        finally:
            strategy.teardown()
            torch.distributed.destroy_process_group()  # the strategy leaves it to the process's end

    first = first_weights(1)
    assert torch.equal(first, first_weights(1))
    assert not torch.equal(first, first_weights(2))


def test_bucket_size_without_overlapped_reduce_is_refused() -> None:
    """Megatron's DDP drops bucket_size when gradients are not reduced during the backward pass."""
    with pytest.raises(ValueError, match=r"bucket_size has no effect without overlap_grad_reduce=True"):
        MegatronCPStrategy(bucket_size=10_000_000, overlap_grad_reduce=False)
    assert MegatronCPStrategy(bucket_size=10_000_000).bucket_size == 10_000_000
