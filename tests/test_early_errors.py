"""Bad inputs fail inside ``trainer.fit`` before any process group, dataset or model exists."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_llama_fp8 import (
    FP8UnavailableError,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    TEFP8Precision,
    get_preset,
)
from tests.helpers import NeverBuilt, fit_never_built


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


def test_gradient_accumulation_fusion_switches_the_te_modules_only() -> None:
    """What the strategy does once the model is wrapped: TE's modules add into main_grad, Megatron's own do not."""
    from lightning_llama_fp8.parallel.ddp import fuse_te_weight_gradient_accumulation

    te_linear = type("Linear", (torch.nn.Linear,), {"__module__": "transformer_engine.pytorch.module.linear"})
    megatron_linear = type("ColumnParallelLinear", (torch.nn.Linear,), {"__module__": "megatron.core.tensor_parallel"})
    model = torch.nn.Sequential(te_linear(2, 2), megatron_linear(2, 2))
    for module in model:
        module.fuse_wgrad_accumulation = False
    assert fuse_te_weight_gradient_accumulation([model]) == 1
    assert model[0].fuse_wgrad_accumulation is True and model[1].fuse_wgrad_accumulation is False
    with pytest.raises(ValueError, match="found no Transformer Engine layer"):
        fuse_te_weight_gradient_accumulation([torch.nn.Sequential(megatron_linear(2, 2))])
    # The default setting asks for it only where TE modules exist: none is no error there.
    assert fuse_te_weight_gradient_accumulation([torch.nn.Sequential(megatron_linear(2, 2))], required=False) == 0
