"""CUDA graphs of the transformer layers (``MegatronCPStrategy(cuda_graphs=...)``): the settings, the refusals before
anything is built, and what reaches Megatron's ``TransformerConfig`` (CPU; the capture itself needs a GPU:
tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch

from lightning_llama_fp8 import (
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    OptimizerOffloadSettings,
    RecomputeSettings,
    get_preset,
)
from lightning_llama_fp8.callbacks import FaultInjector, NaNGuard
from lightning_llama_fp8.parallel.cuda_graphs import CudaGraphSettings, callback_conflicts
from tests.helpers import NeverBuilt
from tests.helpers.trainers import cpu_cli_of_example

TE_TINY = dict(apply_rope_fusion=False)  # the Transformer Engine layer spec; CPU: no fused RoPE kernel


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modules": ["attention"]}, r"unknown modules \['attention'\] \(a dense Llama layer has attn, mlp\)"),
        ({"modules": []}, r"modules must be a non-empty list of attn, mlp, or null"),
        ({"modules": "mlp"}, r"modules must be a non-empty list"),
        ({"modules": ["mlp", "mlp"]}, r"modules lists a name twice"),
        ({"warmup_steps": 0}, r"warmup_steps must be a whole number >= 1; got 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CudaGraphSettings(**kwargs)


def test_megatron_config_gets_the_graph_fields() -> None:
    settings = CudaGraphSettings(modules=["attn", "mlp"], warmup_steps=2)
    config = get_preset("llama_tiny", **TE_TINY).transformer_config(
        **settings.transformer_config_kwargs(), use_cpu_initialization=True
    )
    assert config.cuda_graph_impl == "transformer_engine" and config.cuda_graph_warmup_steps == 2
    assert [module.name for module in config.cuda_graph_modules] == ["attn", "mlp"]
    assert config.use_te_rng_tracker  # graphed layers draw their dropout RNG from Transformer Engine's tracker
    assert CudaGraphSettings().transformer_config_kwargs()["cuda_graph_modules"] == []  # the whole layer


def _fit(strategy_kwargs: dict[str, Any], arch: Any = None, callbacks: list[Any] | None = None, **data: Any) -> None:
    from lightning.pytorch import Trainer

    module = NeverBuilt(arch or get_preset("llama_tiny", **TE_TINY))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronCPStrategy(**strategy_kwargs),
        plugins=[MegatronPrecision()],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks or [],
    )
    datamodule = MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4, micro_batch_size=1, **data)
    trainer.fit(module, datamodule=datamodule)


@pytest.mark.parametrize(
    ("strategy_kwargs", "arch_kwargs", "data", "message"),
    [
        ({}, {"transformer_impl": "local"}, {}, r"needs model.arch.transformer_impl 'transformer_engine'"),
        ({"activation_recompute": RecomputeSettings("full")}, {}, {}, r"cannot go with full activation recompute"),
        ({"optimizer_offload": OptimizerOffloadSettings(0.5)}, {}, {}, r"cannot go with optimizer_offload"),
        ({}, {}, {"document_masking": True}, r"cannot go with document masking"),
    ],
)
def test_what_cannot_run_with_graphs_is_refused_before_building(
    strategy_kwargs: dict[str, Any], arch_kwargs: dict[str, Any], data: dict[str, Any], message: str
) -> None:
    arch = get_preset("llama_tiny", **{**TE_TINY, **arch_kwargs})
    with pytest.raises(ValueError, match=message):
        _fit({"cuda_graphs": CudaGraphSettings(), **strategy_kwargs}, arch, **data)
    assert not torch.distributed.is_initialized()


def test_nanguard_bf16_steps_and_hooks_on_layer_outputs_are_refused() -> None:
    """Transformer Engine refuses to capture a module with forward hooks ("Modules must not have hooks registered"),
    after the warm-up steps; hooks on modules inside a layer would never run during replay. Refused before building."""
    with pytest.raises(ValueError, match=r"cannot go with NaNGuard\(bf16_steps_after_rollback>0\)"):
        _fit({"cuda_graphs": CudaGraphSettings()}, callbacks=[NaNGuard(policy="rollback", bf16_steps_after_rollback=5)])
    with pytest.raises(ValueError, match=r"cannot go with NaNGuard\(watch_outputs=.*set watch_outputs=None"):
        _fit({"cuda_graphs": CudaGraphSettings()}, callbacks=[NaNGuard()])
    inside = FaultInjector(target="activation", step=5, name="decoder.layers.1.mlp")
    with pytest.raises(
        ValueError, match=r"cannot go with FaultInjector\(target='activation', name='decoder\.layers\.1"
    ):
        _fit({"cuda_graphs": CudaGraphSettings()}, callbacks=[inside])
    assert not torch.distributed.is_initialized()
    # Outside the layers, and NaNGuard without its output watch: nothing to refuse.
    outside = FaultInjector(target="activation", step=5, name="output_layer")
    assert callback_conflicts([NaNGuard(watch_outputs=None), outside, FaultInjector("loss", step=5)]) == []


def test_settings_from_yaml_through_lightning_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = cpu_cli_of_example(
        monkeypatch, "llama3_8b_h100_fp8.yaml", "--trainer.strategy.cuda_graphs.modules", "[attn]"
    )
    assert parsed.trainer.strategy.cuda_graphs == CudaGraphSettings(modules=["attn"], warmup_steps=3)


def test_te_debug_statistics_are_refused_with_graphs() -> None:
    from lightning_llama_fp8.callbacks import FP8StatsMonitor

    (conflict,) = callback_conflicts([FP8StatsMonitor(te_debug_stats=["underflows%"])])
    assert conflict.startswith("FP8StatsMonitor(te_debug_stats=...)") and "drop te_debug_stats" in conflict
    assert callback_conflicts([FP8StatsMonitor()]) == []


def test_nccl_graph_registration_with_expandable_segments_is_refused_before_the_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_llama_fp8.parallel.cuda_graphs import prepare_environment

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "1")
    with pytest.raises(ValueError, match=r"need NCCL_GRAPH_REGISTER=0 \(got '1'.*unset it or set it to 0"):
        prepare_environment()
    monkeypatch.delenv("NCCL_GRAPH_REGISTER")
    prepare_environment()
    assert os.environ["NCCL_GRAPH_REGISTER"] == "0"


def test_selective_recompute_is_said_not_to_apply_inside_the_captured_layers(caplog: pytest.LogCaptureFixture) -> None:
    settings = {"cuda_graphs": CudaGraphSettings(), "activation_recompute": RecomputeSettings("selective")}
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="cannot go with document masking"):
        _fit(settings, document_masking=True)  # refused for another reason, after the warning
    assert "selective recompute does not apply inside the captured layers" in caplog.text


class _Helper:
    """Stands in for megatron-core's TECudaGraphHelper (whose capture needs CUDA): no layer to graph, or a capture
    that raises half-way (after megatron-core has set its capture flag)."""

    fail = False

    def __init__(self, model: Any, config: Any, seq_length: int, micro_batch_size: int, optimizers: Any) -> None:
        self.flattened_callables: list[Any] = []

    def create_cudagraphs(self) -> None:
        from megatron.core.transformer import cuda_graphs

        cuda_graphs._set_capture_start()
        if self.fail:
            raise RuntimeError("capture failed")

    def graphs_created(self) -> bool:
        return False


@pytest.mark.parametrize("fail", [False, True])
def test_a_capture_that_graphs_nothing_or_fails_stops_the_fit_and_leaves_no_capture_state(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    from types import SimpleNamespace

    from megatron.core import num_microbatches_calculator as calculator
    from megatron.core.transformer import cuda_graphs

    from lightning_llama_fp8.parallel.cuda_graphs import CudaGraphCapture

    monkeypatch.setattr(cuda_graphs, "TECudaGraphHelper", type("Helper", (_Helper,), {"fail": fail}))
    capture = CudaGraphCapture(CudaGraphSettings())
    module = SimpleNamespace(config=None)
    message = "capture failed" if fail else r"no transformer layer could be captured.*Remove cuda_graphs"
    try:
        with pytest.raises(RuntimeError, match=message):
            capture.capture([module], None, 2048, 1, 8, 1, 0, overlap_param_gather=False)
        assert not capture.captured
        if fail:
            assert not cuda_graphs.is_graph_capturing()
    finally:
        cuda_graphs._set_capture_end()
        capture.close()  # the micro-batch calculator the capture set up
    with pytest.raises(AttributeError):
        calculator.get_num_microbatches()  # gone again


def test_the_capture_takes_its_shapes_from_the_step_about_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """[micro batches, micro batch, sequence] of the step's tokens, whatever made the batch (data module or a plain
    dataloader); the global batch Megatron's micro-batch calculator is given is micro batches x micro batch x DP."""
    from megatron.core import parallel_state

    from lightning_llama_fp8.parallel.cuda_graphs import CudaGraphCapture

    seen: dict[str, Any] = {}
    monkeypatch.setattr(CudaGraphCapture, "capture", lambda self, modules, optimizer, **kw: seen.update(kw))
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    strategy = MegatronCPStrategy(cuda_graphs=CudaGraphSettings(warmup_steps=1))
    strategy._optimizers = [object()]
    batch = {"tokens": torch.zeros(8, 2, 4096, dtype=torch.long)}
    strategy._capture_cuda_graphs(batch)
    assert seen == {
        "seq_length": 4096,
        "micro_batch_size": 2,
        "global_batch_size": 8 * 2 * 4,
        "data_parallel_size": 4,
        "rank": 3,
        "overlap_param_gather": strategy.overlap_param_gather,
    }
