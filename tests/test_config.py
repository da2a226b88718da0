"""Llama 3 presets: published parameter counts (analytic and as Megatron-Core builds them), the TransformerConfig
they produce, vocabulary padding, FLOPs and preset lookup. CPU only; models are built with the local
(pure Megatron-Core) layer spec, the big ones on the meta device."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from lightning_llama_fp8.config import PRESETS, LlamaConfig, get_preset, llama3_8b, llama3_8b_4layers
from lightning_llama_fp8.validate import SettingError
from tests.helpers import megatron_single_process_groups

# Parameter counts of the released checkpoints (Meta's model cards / Hugging Face safetensors totals).
PUBLISHED = {
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}
TIED = {"llama3_2_1b", "llama3_2_3b"}
VOCAB = 128_256


def cpu_arch(name: str, **overrides: object) -> LlamaConfig:
    """A preset that Megatron-Core can build without Transformer Engine (local spec, no fused RoPE)."""
    return get_preset(name, transformer_impl="local", apply_rope_fusion=False, **overrides)


@pytest.fixture(scope="module")
def megatron_tp1() -> Iterator[None]:
    """A 1-process gloo group and Megatron's parallel_state at TP 1, CP 1 (what GPTModel's layers read)."""
    with megatron_single_process_groups():
        yield


def meta_build(arch: LlamaConfig) -> torch.nn.Module:
    """Build the full-size GPTModel without allocating memory."""
    with torch.device("meta"):
        return arch.build_model(arch.transformer_config(use_cpu_initialization=True, perform_initialization=False))


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_analytic_count_matches_published(name: str) -> None:
    assert get_preset(name).num_parameters() == PUBLISHED[name]


def test_every_documented_count_is_tested() -> None:
    # Presets not in PUBLISHED are ours (tiny, 4-layer benchmark); everything Meta released is checked above.
    assert set(PRESETS) - set(PUBLISHED) == {"llama3_8b_4layers", "llama_tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_megatron_builds_published_count(name: str, megatron_tp1: None) -> None:
    arch = cpu_arch(name)
    model = meta_build(arch)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]

    embedding = model.embedding.word_embeddings.weight
    assert tuple(embedding.shape) == (VOCAB, arch.hidden_size)
    if name in TIED:
        # Megatron skips allocating the LM head and multiplies by the word embedding instead.
        assert model.share_embeddings_and_output_weights is True
        assert model.output_layer.weight is None
        assert model.shared_embedding_or_output_weight() is embedding
    else:
        assert model.share_embeddings_and_output_weights is False
        head = model.output_layer.weight
        assert head is not None and head is not embedding
        assert tuple(head.shape) == (VOCAB, arch.hidden_size)


def test_4layer_benchmark_preset_is_8b_with_4_layers(megatron_tp1: None) -> None:
    arch = llama3_8b_4layers()
    assert arch == dataclasses.replace(llama3_8b(), num_layers=4)
    per_layer = (PUBLISHED["llama3_8b"] - 2 * VOCAB * 4096 - 4096) // 32
    assert arch.num_parameters() == 4 * per_layer + 2 * VOCAB * 4096 + 4096
    model = meta_build(cpu_arch("llama3_8b_4layers"))
    assert sum(p.numel() for p in model.parameters()) == arch.num_parameters()
    assert len(model.decoder.layers) == 4


@pytest.mark.parametrize(
    "name,base,scaling_factor",
    [("llama3_8b", 500_000, None), ("llama3_1_8b", 500_000, 8.0), ("llama3_2_1b", 500_000, 32.0)],
)
def test_rope_base_and_llama31_scaling_reach_the_model(
    name: str, base: int, scaling_factor: float | None, megatron_tp1: None
) -> None:
    # RotaryEmbedding computes inv_freq on the CPU even inside the meta-device context.
    arch = cpu_arch(name)
    inv_freq = meta_build(arch).rotary_pos_emb.inv_freq
    dim = arch.kv_channels
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if scaling_factor is None:
        torch.testing.assert_close(inv_freq, plain)
        return
    # Llama 3.1 scaling: wavelengths shorter than 8192/4 keep their frequency, longer than 8192 are divided by
    # the factor, the band in between is interpolated.
    wavelen = 2 * torch.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192
    assert high.any() and low.any()
    torch.testing.assert_close(inv_freq[high], plain[high])
    torch.testing.assert_close(inv_freq[low], plain[low] / scaling_factor)
    middle = ~high & ~low
    assert torch.all(inv_freq[middle] < plain[middle]) and torch.all(inv_freq[middle] > plain[middle] / scaling_factor)


def test_real_cpu_build_of_tiny_preset(megatron_tp1: None) -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    arch = cpu_arch("llama_tiny")
    model = arch.build_model(arch.transformer_config(use_cpu_initialization=True))
    assert isinstance(model, GPTModel)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    assert sum(p.numel() for p in params.values()) == arch.num_parameters() == 2_098_432

    # RMSNorm before attention and MLP in every layer, plus the final norm.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * arch.num_layers + 1
    assert all(n.eps == arch.norm_epsilon and tuple(n.weight.shape) == (arch.hidden_size,) for n in norms)
    assert all(torch.all(n.weight == 1.0) for n in norms)  # gamma = 1 (zero_centered_gamma off)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())

    # Weights in bf16 (params_dtype). The local spec's norms are torch.nn.RMSNorm, which Megatron's
    # WrappedTorchNorm builds without params_dtype, so they stay fp32; TE's RMSNorm (the GPU spec) is bf16.
    norm_ids = {id(n.weight) for n in norms}
    assert {p.dtype for p in params.values() if id(p) not in norm_ids} == {torch.bfloat16}
    assert {n.weight.dtype for n in norms} == {torch.float32}

    # No biases anywhere.
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    assert len(linears) == 4 * arch.num_layers + 1  # qkv, proj, fc1, fc2 per layer + LM head
    assert all(m.bias is None for m in linears)
    assert not [name for name in params if "bias" in name]

    kv = arch.kv_channels
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        # GQA: Q for every head, K and V once per query group, fused in one projection.
        qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * kv
        assert qkv_out == (8 + 2 * 4) * 32 != 3 * arch.num_attention_heads * kv
        assert tuple(attention.linear_qkv.weight.shape) == (qkv_out, arch.hidden_size)
        assert tuple(attention.linear_proj.weight.shape) == (arch.hidden_size, arch.num_attention_heads * kv)
        # SwiGLU: gate and up projections fused in fc1 (2 x ffn), down projection fc2.
        assert tuple(mlp.linear_fc1.weight.shape) == (2 * arch.ffn_hidden_size, arch.hidden_size)
        assert tuple(mlp.linear_fc2.weight.shape) == (arch.hidden_size, arch.ffn_hidden_size)
        assert mlp.config.gated_linear_unit and mlp.config.activation_func is F.silu

    # init_method_std reaches the weights: N(0, 0.02), output projections scaled by 1/sqrt(2 L) (Megatron).
    def std(p: torch.Tensor) -> float:
        return p.float().std().item()

    assert std(params["embedding.word_embeddings.weight"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["decoder.layers.0.mlp.linear_fc1.weight"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["decoder.layers.0.mlp.linear_fc2.weight"]) == pytest.approx(0.02 / 2, rel=0.05)
    assert params["output_layer.weight"] is not params["embedding.word_embeddings.weight"]


# ---------------------------------------------------------------------------------------------- TransformerConfig
def test_transformer_config_llama_fields() -> None:
    arch = cpu_arch("llama3_8b")
    config = arch.transformer_config()
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (32, 4096, 14336)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (32, 8, 128)
    assert config.normalization == "RMSNorm"
    assert config.layernorm_epsilon == 1e-5
    assert config.layernorm_zero_centered_gamma is False
    assert config.gated_linear_unit is True
    assert config.activation_func is F.silu
    assert config.add_bias_linear is False
    assert config.calculate_per_token_loss is True
    assert config.bf16 is True and config.fp16 is False
    assert config.params_dtype is torch.bfloat16
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert config.init_method_std == 0.02
    assert config.apply_rope_fusion is False  # our override
    assert config.cross_entropy_loss_fusion is True
    assert config.tensor_model_parallel_size == 1 and config.context_parallel_size == 1
    assert config.sequence_parallel is False


def test_zero_centered_gamma_maps_to_layernorm_1p() -> None:
    # The TE spec (the one that supports it); no TE kernel is needed just to build the config.
    for flag in (True, False):
        arch = get_preset("llama_tiny", apply_rope_fusion=False, zero_centered_gamma=flag)
        assert arch.transformer_config().layernorm_zero_centered_gamma is flag


def test_zero_centered_gamma_with_local_spec_is_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="zero_centered_gamma needs transformer_impl='transformer_engine'"):
        cpu_arch("llama_tiny", zero_centered_gamma=True)


def test_unknown_attention_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="attention_backend 'flashattn' is not one of auto, flash"):
        cpu_arch("llama_tiny", attention_backend="flashattn")


@pytest.mark.parametrize("backend", ["auto", "flash", "fused", "unfused", "local"])
def test_attention_backend_maps_to_megatron_enum(backend: str) -> None:
    from megatron.core.transformer.enums import AttnBackend

    config = cpu_arch("llama_tiny", attention_backend=backend).transformer_config()
    assert config.attention_backend is AttnBackend[backend]
    assert config.attention_backend.name == backend


def test_fusion_flags_follow_the_arch() -> None:
    arch = cpu_arch(
        "llama_tiny",
        cross_entropy_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
    )
    config = arch.transformer_config()
    assert not config.cross_entropy_loss_fusion
    assert not config.bias_activation_fusion
    assert not config.masked_softmax_fusion
    assert not config.bias_dropout_fusion


def test_overrides_win_over_arch_defaults() -> None:
    # What the strategy and the precision plugin pass.
    config = cpu_arch("llama_tiny").transformer_config(
        tensor_model_parallel_size=2,
        context_parallel_size=2,
        sequence_parallel=True,
        cp_comm_type="a2a",
        calculate_per_token_loss=False,
        hidden_dropout=0.1,
    )
    assert config.tensor_model_parallel_size == 2
    assert config.context_parallel_size == 2
    assert config.sequence_parallel is True
    assert config.cp_comm_type == "a2a"
    assert config.calculate_per_token_loss is False
    assert config.hidden_dropout == 0.1
    fp32 = cpu_arch("llama_tiny").transformer_config(bf16=False, params_dtype=torch.float32)
    assert fp32.bf16 is False and fp32.params_dtype is torch.float32


# ---------------------------------------------------------------------------------------------- vocab padding
@pytest.mark.parametrize("tp,padded", [(1, 128_256), (2, 128_256), (4, 128_512), (8, 129_024)])
def test_padded_vocab_size(tp: int, padded: int) -> None:
    # 128256 = 1002 x 128 = 501 x 256 = 250.5 x 512 = 125.25 x 1024.
    arch = llama3_8b()
    assert arch.padded_vocab_size(tp) == padded
    assert padded % (128 * tp) == 0 and padded - VOCAB < 128 * tp
    # Untied: embedding and LM head both grow.
    assert arch.num_parameters(tp) - arch.num_parameters() == 2 * (padded - VOCAB) * 4096
    # Tied: one matrix grows.
    tied = get_preset("llama3_2_1b")
    assert tied.num_parameters(tp) - tied.num_parameters() == (padded - VOCAB) * 2048


def test_padded_vocab_size_rounds_up_a_custom_vocab() -> None:
    arch = LlamaConfig(vocab_size=1100, make_vocab_size_divisible_by=128)
    # Multiples of 128, 256, 512, 1024 at or above 1100.
    assert [arch.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [1152, 1280, 1536, 2048]
    exact = LlamaConfig(vocab_size=1024, make_vocab_size_divisible_by=64)
    assert [exact.padded_vocab_size(tp) for tp in (1, 16, 32)] == [1024, 1024, 2048]


# ---------------------------------------------------------------------------------------------- FLOPs
def megatron_lm_flops_per_token(arch: LlamaConfig) -> float:
    """Megatron-LM's num_floating_point_operations (training/training.py) for one token, dense GPT, SwiGLU."""
    L, h, s = arch.num_layers, arch.hidden_size, arch.seq_length
    g, a, ffn, V = arch.num_query_groups, arch.num_attention_heads, arch.ffn_hidden_size, arch.padded_vocab_size()
    query_projection_ratio = arch.num_attention_heads * arch.kv_channels / h
    return 12 * L * h**2 * ((1 + g / a + s / h) * query_projection_ratio + 1.5 * ffn / h + V / (2 * L * h))


def test_flops_per_token_8b_matches_megatron_lm_closed_form() -> None:
    arch = llama3_8b()
    assert arch.seq_length == 8192
    by_hand = 12 * 32 * 4096**2 * ((1 + 8 / 32 + 8192 / 4096) + 1.5 * 14336 / 4096 + 128256 / (2 * 32 * 4096))
    assert arch.flops_per_token() == pytest.approx(by_hand, rel=1e-12)
    assert arch.flops_per_token() == pytest.approx(5.7913e10, rel=1e-4)


def test_causal_flops_match_what_megatron_lm_logs_today() -> None:
    """Megatron-LM d98e8a6 halves the attention-score term for the causal mask. Its log of the full 8B, TP1 CP2 on
    2 x H200, GBS 16 (benchmarks/results/2026-11-28-h200x2-s3): 5733.2 ms per iteration, 588.4 TFLOP/s/GPU."""
    arch = llama3_8b()
    attention_scores = 3 * 32 * 2 * 2 * 8192 * 4096  # per token: QK^T and AV, forward + backward, 32 layers
    assert arch.flops_per_token(causal=True) == pytest.approx(arch.flops_per_token() - attention_scores / 2)
    tokens_per_gpu_per_s = 16 * 8192 / 2 / 5.7332
    assert arch.flops_per_token(causal=True) * tokens_per_gpu_per_s / 1e12 == pytest.approx(588.4, rel=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flops_per_token_matches_megatron_lm_for_every_preset(name: str) -> None:
    arch = get_preset(name)
    assert arch.flops_per_token() == pytest.approx(megatron_lm_flops_per_token(arch), rel=1e-12)


def test_flops_formula_handles_query_width_unlike_hidden() -> None:
    # Heads x head_dim != hidden: Megatron-LM scales the attention terms by (heads x kv_channels) / hidden.
    arch = LlamaConfig(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=2, kv_channels=96)
    assert arch.flops_per_token() == pytest.approx(megatron_lm_flops_per_token(arch), rel=1e-12)
    longer = dataclasses.replace(arch, seq_length=2 * arch.seq_length)
    # Only the attention-score term grows with the sequence: 12 L s q per token, both passes.
    extra = 3 * 2 * 2 * arch.num_layers * arch.seq_length * arch.num_attention_heads * arch.kv_channels
    assert longer.flops_per_token() - arch.flops_per_token() == pytest.approx(extra, rel=1e-12)


# ---------------------------------------------------------------------------------------------- presets
def test_defaults_are_llama3_8b() -> None:
    assert LlamaConfig() == llama3_8b() == get_preset("llama3_8b")
    assert get_preset("llama3_1_8b") == dataclasses.replace(llama3_8b(), rope_scaling=True, rope_scaling_factor=8.0)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown Llama preset 'llama4_8b'\. Known presets: ") as err:
        get_preset("llama4_8b")
    message = str(err.value)
    assert all(name in message for name in PRESETS)
    assert ", ".join(sorted(PRESETS)) in message


def test_unknown_override_field_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown LlamaConfig field\(s\) \['layers'\] in overrides for preset 'llama3_8b'"
    ):
        get_preset("llama3_8b", layers=4)
    with pytest.raises(ValueError, match=r"\['heads', 'hidden'\]"):
        get_preset("llama_tiny", hidden=1, heads=2, num_layers=1)


def test_overrides_apply_and_win_over_preset_shape() -> None:
    arch = get_preset("llama3_8b", num_layers=4)
    assert arch.num_layers == 4
    assert arch == dataclasses.replace(llama3_8b(), num_layers=4)
    # Overrides beat the preset's own shape fields.
    assert get_preset("llama3_2_1b", tie_embeddings=False).tie_embeddings is False
    assert get_preset("llama3_1_8b", rope_scaling=False).rope_scaling is False
    assert get_preset("llama3_70b", num_layers=2).hidden_size == 8192
    assert get_preset("llama_tiny", seq_length=64).seq_length == 64


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_layers": 0}, r"^LlamaConfig: num_layers must be a whole number >= 1; got 0\.$"),
        (
            {"kv_channels": 0, "make_vocab_size_divisible_by": 0},
            r"kv_channels must be a whole number >= 1; got 0; make_vocab_size_divisible_by must be a whole number",
        ),
        ({"num_query_groups": 3}, r"num_attention_heads \(32\) must be a multiple of num_query_groups \(3\)"),
        ({"norm_epsilon": 0.0}, r"norm_epsilon must be a finite number > 0; got 0\.0"),
    ],
)
def test_llama_config_refuses_shapes_megatron_cannot_build(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**overrides)


def test_cross_entropy_is_tes_with_the_te_spec_and_megatrons_with_the_local_one() -> None:
    # TE's kernel rebuilds the logits' gradient in FP32 from two passes over the bf16 logits; the local spec runs
    # without TE, so it keeps Megatron's torch.compile'd one.
    assert get_preset("llama_tiny").cross_entropy_impl == "te"
    assert get_preset("llama_tiny", apply_rope_fusion=False).transformer_config().cross_entropy_fusion_impl == "te"
    assert cpu_arch("llama_tiny").cross_entropy_impl == "native"
    assert cpu_arch("llama_tiny").transformer_config().cross_entropy_fusion_impl == "native"
    explicit = get_preset("llama_tiny", apply_rope_fusion=False, cross_entropy_fusion_impl="native")
    assert explicit.transformer_config().cross_entropy_fusion_impl == "native"


def installed_te(monkeypatch: pytest.MonkeyPatch, te_version: str) -> None:
    """Make the package's version probe report this Transformer Engine version (TE is not installed on the CPU
    machines)."""
    from lightning_llama_fp8._compat import versions

    real_version = versions.installed_version
    monkeypatch.setattr(
        versions, "installed_version", lambda name: te_version if name == "transformer_engine" else real_version(name)
    )


def test_tes_cross_entropy_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="cross_entropy_fusion_impl='te' needs Transformer Engine, which"):
        cpu_arch("llama_tiny", cross_entropy_fusion_impl="te")
    with pytest.raises(ValueError, match="must be 'te', 'native' or None, got 'triton'"):
        get_preset("llama_tiny", cross_entropy_fusion_impl="triton")
    # A kernel choice without the fusion would be silently ignored: refused.
    for impl in ("te", "native"):
        with pytest.raises(ValueError, match=f"cross_entropy_fusion_impl='{impl}' has no effect with cross_entropy"):
            get_preset("llama_tiny", cross_entropy_fusion=False, cross_entropy_fusion_impl=impl)
    unfused = get_preset("llama_tiny", apply_rope_fusion=False, cross_entropy_fusion=False)
    assert unfused.cross_entropy_impl == "unfused"
    assert unfused.transformer_config().cross_entropy_loss_fusion is False


@pytest.mark.parametrize("old", ["2.17.1", "2.19.1", "2.20.2.dev0", "not-a-version"])
def test_an_older_te_falls_back_to_megatrons_cross_entropy_by_default_and_refuses_it_when_asked(
    old: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    installed_te(monkeypatch, old)
    default = get_preset("llama_tiny", apply_rope_fusion=False)
    assert default.cross_entropy_impl == "native"
    with caplog.at_level(logging.INFO, logger="lightning_llama_fp8.config"):
        assert default.transformer_config().cross_entropy_fusion_impl == "native"
    assert f"is not used with the installed TE {old}" in caplog.text
    needs = rf"needs Transformer Engine >= 2\.20\.2 .*this machine has {re.escape(old)}"
    with pytest.raises(ValueError, match=needs):
        get_preset("llama_tiny", apply_rope_fusion=False, cross_entropy_fusion_impl="te").transformer_config()
    with pytest.raises(ValueError, match=needs):  # the same through the overrides the strategy passes
        default.transformer_config(cross_entropy_fusion_impl="te")
    native = get_preset("llama_tiny", apply_rope_fusion=False, cross_entropy_fusion_impl="native")
    assert native.transformer_config().cross_entropy_fusion_impl == "native"


@pytest.mark.parametrize("new", ["2.20.2", "2.21.0", "2.21.0.dev0+abc123"])
def test_a_te_with_the_kernel_runs_tes_cross_entropy(new: str, monkeypatch: pytest.MonkeyPatch) -> None:
    installed_te(monkeypatch, new)
    arch = get_preset("llama_tiny", apply_rope_fusion=False)
    assert arch.cross_entropy_impl == "te"
    assert arch.transformer_config().cross_entropy_fusion_impl == "te"


def test_llama_config_numbers_are_what_they_look_like() -> None:
    """256.7 is refused rather than cut to 256; an integral 256.0 (or "5e5", as PyYAML reads it) is the int."""
    with pytest.raises(
        ValueError, match=r"hidden_size must be a whole number >= 1; got 256\.7, which has a fractional"
    ):
        LlamaConfig(hidden_size=256.7)
    arch = LlamaConfig(hidden_size=4096.0, rotary_base="5e5", norm_epsilon="1e-5")
    assert (arch.hidden_size, arch.rotary_base, arch.norm_epsilon) == (4096, 500000, 1e-5)
    assert type(arch.hidden_size) is int and type(arch.rotary_base) is int and arch == LlamaConfig()
    problems = (
        r"^LlamaConfig: num_layers must be a whole number >= 1; got True \(bool\); "
        r"seq_length must be a whole number >= 1; got -1; "
        r"init_method_std must be a finite number > 0; got nan; "
        r"tie_embeddings must be true or false; got 'false' \(str\)\.$"
    )
    with pytest.raises(ValueError, match=problems):  # every problem at once
        LlamaConfig(num_layers=True, seq_length=-1, init_method_std=float("nan"), tie_embeddings="false")


def test_fused_qkv_rope_reaches_megatron_and_needs_te_fused_rope() -> None:
    # Megatron's config refuses fused RoPE where TE is missing (this CPU machine): built with it overridden off.
    on = get_preset("llama_tiny", apply_rope_fusion=True, fused_qkv_rope=True)
    assert on.transformer_config(apply_rope_fusion=False).fused_single_qkv_rope is True
    off = get_preset("llama_tiny", apply_rope_fusion=True, fused_qkv_rope=False)
    assert off.transformer_config(apply_rope_fusion=False).fused_single_qkv_rope is False
    # None (default): on where it applies, the TE layer spec with fused RoPE (TE's kernel assumed where TE is absent).
    default = get_preset("llama_tiny", apply_rope_fusion=True)
    assert default.fused_qkv_rope is None and default.fused_qkv_rope_applies
    assert default.transformer_config(apply_rope_fusion=False).fused_single_qkv_rope is True
    assert not cpu_arch("llama_tiny").fused_qkv_rope_applies  # the local spec
    assert not get_preset("llama_tiny", apply_rope_fusion=False).fused_qkv_rope_applies
    with pytest.raises(ValueError, match="fused_qkv_rope needs transformer_impl='transformer_engine'"):
        cpu_arch("llama_tiny", fused_qkv_rope=True)
    with pytest.raises(ValueError, match="and apply_rope_fusion=True"):
        get_preset("llama_tiny", apply_rope_fusion=False, fused_qkv_rope=True)
    with pytest.raises(SettingError, match="fused_qkv_rope"):
        get_preset("llama_tiny", fused_qkv_rope="yes")
