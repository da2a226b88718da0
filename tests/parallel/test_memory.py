"""Activation recompute and optimizer CPU offload: settings, refusals, and what reaches Megatron's configs (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_llama_fp8 import (
    LlamaLightningModule,
    MegatronCPStrategy,
    MegatronPrecision,
    TEFP8Precision,
    get_preset,
)
from lightning_llama_fp8.parallel.memory import OptimizerOffloadSettings, RecomputeSettings
from tests.helpers import fit_never_built, run_distributed
from tests.helpers.trainers import cpu_cli_of_example

LOCAL_TINY = dict(transformer_impl="local", apply_rope_fusion=False)


# ---------------------------------------------------------------------------------------------- settings alone
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(granularity="selective", method="uniform"), r"method and num_layers choose .* set granularity: full"),
        (dict(granularity="selective", num_layers=2), r"method and num_layers choose"),
        (dict(granularity="full", modules=["mlp"]), r"Drop modules, or set granularity: selective"),
        (dict(granularity="full", num_layers=0), r"num_layers must be a whole number >= 1; got 0\."),
        (dict(granularity="full", num_layers=2.5), r"num_layers must be a whole number >= 1; got 2\.5, which has a"),
        (dict(granularity="full", method="chunked"), r"method must be 'uniform' or 'block'"),
        (dict(granularity="partial"), r"granularity must be 'selective' or 'full'"),
        (dict(granularity="selective", modules=["attention"]), r"unknown module 'attention' \(known: core_attn, mlp"),
        (dict(granularity="selective", modules=["moe_act"]), r"'moe_act' recomputes MoE layers, which a Llama"),
        (dict(granularity="selective", modules=["mla_up_proj"]), r"multi-latent attention"),
        (dict(granularity="selective", modules=[]), r"modules is empty"),
        (dict(granularity="selective", modules="mlp"), r"must be a list of names"),
        (dict(granularity="selective", modules=["mlp", "mlp"]), r"lists a name twice"),
    ],
)
def test_bad_recompute_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecomputeSettings(**kwargs)


def test_defaults_resolve_like_megatron_lm_flags() -> None:
    full = RecomputeSettings("full")
    assert full.transformer_config_kwargs(32) == {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }
    block = RecomputeSettings("full", method="block")
    assert block.transformer_config_kwargs(32)["recompute_num_layers"] == 32  # all layers unless told
    assert RecomputeSettings("full", method="block", num_layers=3).transformer_config_kwargs(32) == {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 3,
    }
    assert RecomputeSettings("selective").transformer_config_kwargs(32) == {
        "recompute_granularity": "selective",
        "recompute_method": None,
        "recompute_num_layers": None,
        "recompute_modules": ["core_attn"],  # Megatron's default, what --recompute-activations gives
    }
    assert RecomputeSettings("full").describe(32) == "full (uniform, 1 layer per chunk)"
    assert RecomputeSettings("full", "block", 4).describe(32) == "full (block, first 4 of 32 layers)"
    assert RecomputeSettings("selective", modules=["core_attn", "mlp"]).describe(32) == "selective (core_attn, mlp)"


def test_settings_checked_against_the_model() -> None:
    with pytest.raises(ValueError, match=r"num_layers \(33, layers per chunk\) must be between 1 and the model's 32"):
        RecomputeSettings("full", num_layers=33).check(32, "transformer_engine")
    with pytest.raises(ValueError, match=r"num_layers \(5, layers to checkpoint\) .* model's 4 transformer layers"):
        RecomputeSettings("full", "block", 5).check(4, "transformer_engine")
    RecomputeSettings("full", "block", 4).check(4, "transformer_engine")
    layernorm = RecomputeSettings("selective", modules=["layernorm"])
    with pytest.raises(ValueError, match=r"'layernorm' recomputes nothing with transformer_impl: transformer_engine"):
        layernorm.check(32, "transformer_engine")
    with pytest.raises(ValueError, match=r"cannot recompute 'layernorm' with FP8 delayed scaling"):
        layernorm.check(32, "local", fp8_recipe="delayed")
    layernorm.check(32, "local")


@pytest.mark.parametrize(
    "settings",
    [
        RecomputeSettings("full"),
        RecomputeSettings("full", num_layers=2),
        RecomputeSettings("full", "block", 1),
        RecomputeSettings("selective"),
        RecomputeSettings("selective", modules=["core_attn", "mlp"]),
        RecomputeSettings("selective", modules=["layernorm"]),
    ],
    ids=["full", "full-uniform2", "full-block1", "selective", "selective-attn-mlp", "selective-layernorm"],
)
def test_megatron_transformer_config_accepts_the_settings(settings: RecomputeSettings) -> None:
    arch = get_preset("llama_tiny", **LOCAL_TINY)
    kwargs = settings.transformer_config_kwargs(arch.num_layers)
    config = arch.transformer_config(use_cpu_initialization=True, **kwargs)  # Megatron's own validation runs here
    for key, value in kwargs.items():
        assert getattr(config, key) == value, key


# ---------------------------------------------------------------------------------------------- through the strategy
def _build_worker(rank: int, world_size: int, cases: list[tuple[str, dict[str, Any], RecomputeSettings]]) -> dict:
    """Build llama_tiny (local spec, CPU) the way fit does, for each recompute setting; report what Megatron made."""
    import megatron.core.tensor_parallel as tensor_parallel

    out: dict[str, Any] = {}
    for name, arch_overrides, settings in cases:
        strategy = MegatronCPStrategy(activation_recompute=settings)
        trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
        module = LlamaLightningModule(get_preset("llama_tiny", **{**LOCAL_TINY, **arch_overrides}))
        strategy.connect(module)
        module.trainer = trainer
        strategy.setup_environment()
        module.configure_model()
        decoder = module.model.decoder
        config = decoder.config
        record = {
            "granularity": config.recompute_granularity,
            "method": config.recompute_method,
            "num_layers": config.recompute_num_layers,
            "modules": list(config.recompute_modules),
            "core_attn": bool(decoder.checkpoint_core_attention),
            "mlp": [layer.recompute_mlp for layer in decoder.layers],
            "layernorm": [layer.recompute_input_layernorm for layer in decoder.layers],
        }
        if config.recompute_granularity == "full":
            # Megatron-Core needs CUDA for a real forward pass; replace its (BF16) checkpoint function by one that
            # records the layers each call would recompute and passes the hidden states through.
            chunks: list[int] = []
            real = tensor_parallel.checkpoint

            def record_chunk(
                function: Any, distribute: bool, hidden: torch.Tensor, *args: Any, chunks: list[int] = chunks
            ) -> Any:
                cells = dict(zip(function.__code__.co_freevars, function.__closure__, strict=True))
                chunks.append(cells["end"].cell_contents - cells["start"].cell_contents)  # layers in this chunk
                return hidden, args[1]  # (hidden_states, context), as the checkpointed layers would

            tensor_parallel.checkpoint = record_chunk
            try:
                decoder.train()
                hidden = torch.zeros(16, 1, module.arch.hidden_size, dtype=torch.bfloat16, requires_grad=True)
                decoder(hidden_states=hidden, attention_mask=None)
            finally:
                tensor_parallel.checkpoint = real
            record["checkpointed_chunks"] = chunks
        out[name] = record
    strategy.teardown()
    return out


@pytest.mark.multiprocess
def test_recompute_settings_reach_the_megatron_model(tmp_path: Path) -> None:
    cases = [
        ("full", {"num_layers": 4}, RecomputeSettings("full")),
        ("full_uniform2", {"num_layers": 4}, RecomputeSettings("full", num_layers=2)),
        ("full_block", {"num_layers": 4}, RecomputeSettings("full", method="block")),
        ("selective", {}, RecomputeSettings("selective")),
        ("selective_mlp", {}, RecomputeSettings("selective", modules=["mlp", "layernorm"])),
    ]
    (built,) = run_distributed(_build_worker, 1, tmp_path, cases)
    full = built["full"]
    assert (full["granularity"], full["method"], full["num_layers"]) == ("full", "uniform", 1)
    assert full["checkpointed_chunks"] == [1, 1, 1, 1]  # every layer checkpointed on its own
    assert built["full_uniform2"]["checkpointed_chunks"] == [2, 2]  # two chunks of two layers
    block = built["full_block"]
    assert (block["method"], block["num_layers"], block["checkpointed_chunks"]) == ("block", 4, [1, 1, 1, 1])
    assert not full["core_attn"] and full["mlp"] == [False] * 4
    selective = built["selective"]
    assert (selective["granularity"], selective["method"], selective["num_layers"]) == ("selective", None, None)
    assert selective["modules"] == ["core_attn"] and selective["core_attn"] and selective["mlp"] == [False, False]
    mlp = built["selective_mlp"]
    assert mlp["modules"] == ["mlp", "layernorm"] and not mlp["core_attn"]
    assert mlp["mlp"] == [True, True] and mlp["layernorm"] == [True, True]


# ---------------------------------------------------------------------------------------------- refused early
def test_recompute_beyond_the_model_fails_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match=r"num_layers \(3, layers per chunk\) must be between 1 and the model's 2"):
        fit_never_built(MegatronPrecision(), activation_recompute=RecomputeSettings("full", num_layers=3))
    assert not torch.distributed.is_initialized()


def test_layernorm_recompute_with_transformer_engine_fails_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match=r"'layernorm' recomputes nothing"):
        fit_never_built(
            MegatronPrecision(),
            arch=get_preset("llama_tiny"),  # transformer_impl: transformer_engine
            activation_recompute=RecomputeSettings("selective", modules=["layernorm"]),
        )
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------- optimizer offload
@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True])
def test_offload_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        OptimizerOffloadSettings(fraction=fraction)


def test_offload_needs_the_distributed_optimizer() -> None:
    with pytest.raises(ValueError, match=r"optimizer_offload: needs use_distributed_optimizer=True"):
        MegatronCPStrategy(
            use_distributed_optimizer=False, overlap_param_gather=False, optimizer_offload=OptimizerOffloadSettings()
        )


def test_offload_with_fp8_weights_needs_delayed_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    with pytest.raises(ValueError, match=r"with FP8 weights \(fp8_param_gather\) it needs the delayed recipe"):
        fit_never_built(
            TEFP8Precision(recipe="current", fp8_param_gather=True), optimizer_offload=OptimizerOffloadSettings(0.5)
        )
    assert not torch.distributed.is_initialized()


def test_offload_settings_reach_megatron_optimizer_config() -> None:
    from megatron.core.optimizer import OptimizerConfig

    strategy = MegatronCPStrategy(optimizer_offload=OptimizerOffloadSettings(fraction=0.5, overlap_d2h_h2d=True))
    config = OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16, **strategy.optimizer_config_kwargs())
    assert config.optimizer_cpu_offload and config.optimizer_offload_fraction == 0.5
    assert config.overlap_cpu_optimizer_d2h_h2d and config.use_distributed_optimizer
    # Megatron's offload runs through the precision-aware path, with full-precision state (plain AdamW numerics).
    assert config.use_precision_aware_optimizer and config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    assert config.main_params_dtype == config.exp_avg_dtype == config.exp_avg_sq_dtype == torch.float32
    assert config.decoupled_weight_decay  # Megatron's CPU offload asserts AdamW mode
    plain = MegatronCPStrategy().optimizer_config_kwargs()
    assert plain == {"use_distributed_optimizer": True, "overlap_param_gather": True}


# ---------------------------------------------------------------------------------------------- YAML
def test_memory_settings_from_yaml_through_lightning_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = cpu_cli_of_example(
        monkeypatch, "llama3_8b_1gpu_fp8_recompute.yaml", "--trainer.strategy.activation_recompute.num_layers", "2"
    )
    strategy = parsed.trainer.strategy
    assert isinstance(strategy, MegatronCPStrategy)
    assert strategy.activation_recompute == RecomputeSettings("full", "uniform", 2, None)
    assert strategy.optimizer_offload == OptimizerOffloadSettings(fraction=0.5, overlap_d2h_h2d=False)
