"""Pipeline parallelism on the CPU (parallel/pipeline.py): the config Megatron gets, groups, chunks, loss and
checkpoints on gloo.

Megatron-Core's pipeline schedules and point-to-point sends need CUDA, so a pipelined training step runs only on
GPUs; everything around it runs here for real: the process groups of 4 gloo ranks, the model chunks each rank builds
(with Hugging Face weights), the loss every stage logs, and distributed checkpoints saved with PP and loaded into
another pipeline split, exported to Hugging Face bitwise. (Which layers each stage holds, and the splits refused
before anything is built: tests/parallel/test_pipeline_layout.py.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8 import ParallelLayout
from lightning_llama_fp8.config import LlamaConfig, llama3_70b
from lightning_llama_fp8.parallel.pipeline_layout import model_chunks
from tests.helpers import run_distributed
from tests.helpers.layouts import pipeline
from tests.helpers.models import CPU_ARCH

# ---------------------------------------------------------------------------------------------- layer assignment


# ---------------------------------------------------------------------------------------------- refused layouts


def test_strategy_takes_the_pipeline_settings() -> None:
    from lightning_llama_fp8 import MegatronCPStrategy
    from lightning_llama_fp8.parallel.pipeline import pipeline_config_kwargs

    strategy = MegatronCPStrategy(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=5)
    assert strategy.layout == pipeline(4, 5)
    kwargs = pipeline_config_kwargs(strategy.layout)
    assert kwargs["pipeline_model_parallel_size"] == 4 and kwargs["virtual_pipeline_model_parallel_size"] == 5
    assert kwargs["pipeline_dtype"] is torch.bfloat16
    assert kwargs["overlap_p2p_comm"] is True and kwargs["batch_p2p_comm"] is False  # interleaved
    assert pipeline_config_kwargs(pipeline(2))["batch_p2p_comm"] is True  # 1F1B cannot overlap its sends
    assert pipeline_config_kwargs(ParallelLayout()) == {}
    # Megatron accepts them:
    config = llama3_70b(**CPU_ARCH).transformer_config(**pipeline_config_kwargs(strategy.layout))
    assert config.pipeline_model_parallel_size == 4 and config.virtual_pipeline_model_parallel_size == 5


# ---------------------------------------------------------------------------------------------- gloo ranks
def _pp_worker(
    rank: int, world_size: int, tp: int, pp: int, vpp: int | None, hf_dir: str, ckpt_dir: str
) -> dict[str, Any]:
    from megatron.core import parallel_state

    from tests.helpers import allow_dist_checkpointing_on_cpu
    from tests.helpers.hf_models import module_from_hf

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_from_hf(
        hf_dir, world_size, CPU_ARCH, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )  # fmt: skip

    def ranks(group: object) -> list[int]:
        return torch.distributed.get_process_group_ranks(group)

    chunks = module.model_chunks
    record: dict[str, Any] = {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp": ranks(parallel_state.get_pipeline_model_parallel_group()),
        "tp": ranks(parallel_state.get_tensor_model_parallel_group()),
        "dp": ranks(parallel_state.get_data_parallel_group()),
        "embedding": ranks(parallel_state.get_embedding_group()),
        "sampler": strategy.distributed_sampler_kwargs,
        "model_is_module_list": isinstance(module.model, torch.nn.ModuleList),
        "chunks": [
            {
                "layers": [int(layer.layer_number) - 1 for layer in chunk.decoder.layers],
                "embedding": hasattr(chunk, "embedding"),
                "output_layer": hasattr(chunk, "output_layer"),
                "final_norm": getattr(chunk.decoder, "final_layernorm", None) is not None,
                "parameters": sum(p.numel() for p in chunk.parameters()),
            }
            for chunk in chunks
        ],
    }
    # The loss every stage logs: only the last stage has the schedule's reports (as Megatron's schedules return them).
    last = parallel_state.is_pipeline_last_stage()
    from lightning_llama_fp8.model import masked_token_loss
    from lightning_llama_fp8.parallel.pipeline import reduce_pipeline_loss

    dp_rank = parallel_state.get_data_parallel_rank()
    reports = [masked_token_loss(torch.ones(1, 4), torch.full((1, 4), 2.0 + dp_rank))[2]] if last else []
    loss_sum, tokens, local = reduce_pipeline_loss(reports, torch.device("cpu"))
    record.update(loss=(loss_sum / tokens).item(), tokens=tokens.item(), local=local.tolist())
    # What the callbacks report and resolve: layers by their global number; a name held by another stage is known.
    from lightning_llama_fp8.parallel.pipeline import gather_over_pipeline, global_module_name, pipeline_stage

    modules = dict(module.named_modules())
    layers = [name for name in modules if re.search(r"layers\.\d+$", name)]
    record["global_layer_names"] = [global_module_name(name, modules) for name in layers]
    record["stage"] = pipeline_stage()
    last_layer = "model.decoder.layers.3" if vpp is None else "model.1.decoder.layers.3"
    record["held_anywhere"] = any(gather_over_pipeline(last_layer in record["global_layer_names"]))
    record["missing_anywhere"] = any(gather_over_pipeline(False))
    # The interleaved schedule's micro-batch rule, from the data module too (Python users skip `llama-fp8 fit`'s check).
    from lightning_llama_fp8 import MockDataModule

    data = MockDataModule(
        seq_length=arch_seq(module), vocab_size=1000, global_batch_size=6, micro_batch_size=1, train_samples=12
    )
    try:
        data.setup("fit")
        record["gbs6_refused"] = None
    except ValueError as err:
        record["gbs6_refused"] = str(err)
    strategy.save_checkpoint({"global_step": 3, "state_dict": module.state_dict()}, ckpt_dir)
    strategy.teardown()
    return record


def arch_seq(module: Any) -> int:
    return int(module.arch.seq_length)


def _load_worker(
    rank: int, world_size: int, hf_dir: str, ckpt_dir: str, tp: int = 1, pp: int = 1, vpp: int | None = None
) -> dict[str, Any]:
    """The PP checkpoint's weights, loaded into TP x PP (x VPP) (default: one process without PP), next to the same
    HF import."""
    from tests.helpers.hf_models import module_from_hf

    strategy, module = module_from_hf(
        hf_dir, world_size, CPU_ARCH, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )  # fmt: skip
    imported = {name: param.detach().clone() for name, param in module.model.named_parameters()}
    with torch.no_grad():
        for param in module.model.parameters():
            param.zero_()
    strategy.load_checkpoint(ckpt_dir)
    loaded = {name: param.detach().clone() for name, param in module.model.named_parameters()}
    strategy.teardown()
    return {"imported": imported, "loaded": loaded}


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "tp,pp,vpp", [(2, 2, None), (1, 2, 2)], ids=["pp2xtp2", "pp2xvpp2xdp2"]
)  # fmt: skip
def test_pipeline_on_four_gloo_processes(tmp_path: Path, tp: int, pp: int, vpp: int | None) -> None:
    from lightning_llama_fp8.hf.files import SafetensorsDir
    from tests.helpers.hf_models import make_hf_model

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "pp.ckpt"
    state = make_hf_model(hf_dir, groups=4, vocab=1000, layers=4)
    records = run_distributed(_pp_worker, 4, tmp_path / "workers", tp, pp, vpp, str(hf_dir), str(ckpt))
    arch = LlamaConfig.from_hf(hf_dir, **CPU_ARCH)

    # Megatron's rank order: TP fastest, then DP, then PP: the stages of one replica are world / PP ranks apart.
    assert [r["pp_rank"] for r in records] == [0, 0, 1, 1]
    assert [r["pp"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["embedding"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # first and last stage
    if tp == 2:
        assert [r["tp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
        assert [r["dp"] for r in records] == [[0], [1], [2], [3]]
    else:
        assert [r["dp"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    # Both stages of a replica read the same samples: the last stage's labels belong to the first stage's tokens.
    assert [r["sampler"]["rank"] for r in records] == ([0, 0, 0, 0] if tp == 2 else [0, 1, 0, 1])

    expected_chunks = model_chunks(pipeline(pp, vpp), 4)
    for record in records:
        mine = [c for c in expected_chunks if c.pipeline_rank == record["pp_rank"]]
        assert [c["layers"] for c in record["chunks"]] == [list(c.layers) for c in mine]
        assert [c["embedding"] for c in record["chunks"]] == [c.has_embedding for c in mine]
        assert [c["output_layer"] for c in record["chunks"]] == [c.has_output_layer for c in mine]
        assert [c["final_norm"] for c in record["chunks"]] == [c.has_output_layer for c in mine]
        assert record["model_is_module_list"] == (vpp is not None)
        assert record["stage"] == record["pp_rank"]
        chunk_of = [f"model.{i}." if vpp is not None else "model." for i in range(len(mine))]
        assert record["global_layer_names"] == [
            f"{prefix}decoder.layers.{layer}" for prefix, c in zip(chunk_of, mine, strict=True) for layer in c.layers
        ]
    assert all(r["held_anywhere"] for r in records) and not any(r["missing_anywhere"] for r in records)
    # GBS 6: 3 micro batches per step with DP2 (interleaved: refused), 6 with DP1 (1F1B: fine).
    for record in records:
        if vpp is None:
            assert record["gbs6_refused"] is None
        else:
            assert "groups of PP 2, but each step has 3" in record["gbs6_refused"], record["gbs6_refused"]
    # The chunks of one model replica hold the whole model once: TP splits every weight but the norms, which each TP
    # rank holds whole (2 per layer and the final one).
    replica = [r for r in records if r["sampler"]["rank"] == 0]
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    assert sum(c["parameters"] for r in replica for c in r["chunks"]) == arch.num_parameters() + (tp - 1) * norms

    # The same global loss on every rank: replicas' last stages had losses 2.0 and 3.0 (with DP2), 4 tokens each.
    assert {r["loss"] for r in records} == {2.0 if tp == 2 else 2.5}
    assert {r["tokens"] for r in records} == {4.0 if tp == 2 else 8.0}

    # The checkpoint written by the pipeline stages: exported bitwise, and loaded into one process without PP.
    from lightning_llama_fp8.hf import export_to_hf

    export_to_hf(ckpt, tmp_path / "exported")
    exported = SafetensorsDir(tmp_path / "exported")
    assert set(exported.names()) == set(state)
    for name, value in state.items():
        assert torch.equal(exported.read(name), value), name
    (loaded,) = run_distributed(_load_worker, 1, tmp_path / "load", str(hf_dir), str(ckpt))
    # ... and back into the layout that wrote it, on 4 ranks (weights; the optimizer needs CUDA DDP).
    reloaded = run_distributed(_load_worker, 4, tmp_path / "reload", str(hf_dir), str(ckpt), tp, pp, vpp)
    for result in [loaded, *reloaded]:
        assert set(result["loaded"]) == set(result["imported"])
        for name, value in result["imported"].items():
            assert torch.equal(result["loaded"][name], value), name
