"""Llama 3 architecture presets and their translation into Megatron-Core arguments.

One flat dataclass, :class:`LlamaConfig`, describes the architecture. Its defaults are Llama 3 8B, so a YAML
that only says ``num_layers: 4`` gets 8B-shaped layers. Parallelism and precision are *not* part of it: the
strategy and the precision plugin own those and hand their settings to :meth:`LlamaConfig.transformer_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightning_llama_fp8.validate import SettingError, as_bool, as_float, as_int

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

TransformerImpl = Literal["transformer_engine", "local"]
AttentionBackend = Literal["auto", "flash", "fused", "unfused", "local"]
CrossEntropyImpl = Literal["te", "native"]

#: The first Transformer Engine whose fused cross entropy is the one measured here (a bf16 copy of the logits and two
#: FP32 statistics per token kept for backward, the gradient rebuilt there in FP32: TE #3273, on top of #3193's FP32
#: gradients). 2.20.2 has it; the 2.19 branch does not. Before #3193, TE kept the gradient in the BF16 logits buffer,
#: which Megatron-LM saw diverge and still rejects by default; between the two, TE kept an FP32 gradient buffer.
TE_CROSS_ENTROPY_MIN_VERSION = "2.20.2"

log = logging.getLogger(__name__)


def te_fused_qkv_rope_support() -> bool:
    """Whether the installed Transformer Engine has the fused QKV RoPE kernel (assumed where TE is not installed, as
    for :func:`te_cross_entropy_support`)."""
    from lightning_llama_fp8._compat.versions import installed_version

    if installed_version("transformer_engine") is None:
        return True
    from lightning_llama_fp8._compat.transformer_engine import has_fused_qkv_rope

    return has_fused_qkv_rope()


def te_cross_entropy_support() -> tuple[bool, str | None]:
    """Whether the installed Transformer Engine has the fused cross entropy this package defaults to, and its version
    (``None`` where TE is not installed: then this package assumes the pinned stack's, for plans made on a machine
    without it, and the TE layer spec says TE is missing when a model is built)."""
    from packaging.version import InvalidVersion, Version

    from lightning_llama_fp8._compat.versions import installed_version

    installed = installed_version("transformer_engine")
    if installed is None:
        return True, None
    try:
        return Version(installed) >= Version(TE_CROSS_ENTROPY_MIN_VERSION), installed
    except InvalidVersion:
        return False, installed


#: LlamaConfig's whole-number fields, each >= 1.
SIZE_FIELDS: tuple[str, ...] = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                "num_query_groups", "kv_channels", "vocab_size", "seq_length", "rotary_base",
                                "make_vocab_size_divisible_by")  # fmt: skip
#: LlamaConfig's real-valued fields, each finite and > 0.
POSITIVE_REAL_FIELDS: tuple[str, ...] = ("rope_scaling_factor", "norm_epsilon", "init_method_std")
#: LlamaConfig's true/false fields.
SWITCH_FIELDS: tuple[str, ...] = ("rope_scaling", "tie_embeddings", "zero_centered_gamma", "cross_entropy_fusion",
                                  "apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                                  "bias_dropout_fusion")  # fmt: skip
#: LlamaConfig's true/false fields where None means "on where it applies".
OPTIONAL_SWITCH_FIELDS: tuple[str, ...] = ("fused_qkv_rope",)


@dataclass
class LlamaConfig:
    """A Llama 3 style decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention, no linear biases).

    Defaults are Llama 3 8B trained at sequence length 8192.
    """

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_attention_heads: int = 32
    num_query_groups: int = 8
    kv_channels: int = 128
    vocab_size: int = 128256
    seq_length: int = 8192
    rotary_base: int = 500_000
    # Llama 3.1/3.2 frequency scaling (low 1, high 4, original context 8192, as Megatron-Core implements it).
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    tie_embeddings: bool = False
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Megatron-LM's --apply-layernorm-1p: the norm weight is stored as (gamma - 1). Same function, better
    # numerics in low precision; the reference FP8 recipe turns it on.
    zero_centered_gamma: bool = False
    # Megatron pads the embedding so each tensor-parallel shard is a multiple of this.
    make_vocab_size_divisible_by: int = 128
    # "transformer_engine" is needed for FP8 and context parallelism; "local" is pure Megatron-Core and is
    # what the CPU tests build.
    transformer_impl: TransformerImpl = "transformer_engine"
    # Which TE attention kernel: "fused" is cuDNN (the reference recipe's --attention-backend fused),
    # "flash" is flash-attention, "auto" lets TE choose.
    attention_backend: AttentionBackend = "auto"
    cross_entropy_fusion: bool = True
    # Which fused cross entropy (with cross_entropy_fusion): "te" is Transformer Engine's Triton kernel, which
    # keeps a bf16 copy of the logits and per-token softmax statistics and rebuilds the gradient in FP32 in
    # backward: two passes over the logits where Megatron's "native" one (torch.compile'd) makes about six and
    # keeps an FP32 softmax.
    # Measured on an H200 at 8192 tokens x vocab 128256: 2.5 vs 12.6 ms per micro batch, half the memory kept for
    # backward, the same error against FP64; training 1.084x faster with losses within run-to-run noise
    # (benchmarks/results/2026-12-04-h200-cross-entropy/). None: "te" with the TE layer spec where the installed TE
    # is >= TE_CROSS_ENTROPY_MIN_VERSION (else "native", logged), "native" with the local spec (which runs without
    # TE). Megatron-LM's own validation still rejects "te" for a bug that later TE versions fixed; an explicit "te"
    # with an older TE is refused. Only with cross_entropy_fusion (without it Megatron runs its unfused one).
    cross_entropy_fusion_impl: CrossEntropyImpl | None = None
    # Kernel fusions Megatron-LM enables by default; they change speed, not the function computed.
    apply_rope_fusion: bool = True
    bias_activation_fusion: bool = True
    masked_softmax_fusion: bool = True
    bias_dropout_fusion: bool = True
    # Megatron's fused_single_qkv_rope: one Transformer Engine kernel applies RoPE to the fused QKV output and hands
    # attention its query, key and value, and one kernel in backward writes the QKV gradient whole. Without it
    # Megatron splits QKV, copies the query to regroup its heads, runs RoPE on query and key separately, and
    # concatenates their gradients: the same function computed, with more memory traffic per layer. Needs the
    # Transformer Engine layer spec and fused RoPE. Not with document masking (Megatron takes the split path for
    # packed sequences and asserts). None (default): on where it applies (``fused_qkv_rope_applies``), turned off by
    # the module for a data module that masks documents. One H100, 8 layers BF16, seq 8192: 9.7 ms less per step,
    # losses within run-to-run noise (benchmarks/results/2026-12-07-h100-bf16-levers/).
    fused_qkv_rope: bool | None = None

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_query_groups "
                f"({self.num_query_groups}): grouped-query attention shares each key/value head among "
                "num_attention_heads / num_query_groups query heads."
            )
        if self.transformer_impl not in ("transformer_engine", "local"):
            raise ValueError(f"transformer_impl must be transformer_engine or local, got {self.transformer_impl!r}.")
        backends = ("auto", "flash", "fused", "unfused", "local")
        if self.attention_backend not in backends:
            raise ValueError(f"attention_backend {self.attention_backend!r} is not one of {', '.join(backends)}.")
        if self.cross_entropy_fusion_impl not in (None, "te", "native"):
            raise ValueError(
                f"cross_entropy_fusion_impl must be 'te', 'native' or None, got {self.cross_entropy_fusion_impl!r}."
            )
        if self.cross_entropy_fusion_impl is not None and not self.cross_entropy_fusion:
            raise ValueError(
                f"cross_entropy_fusion_impl={self.cross_entropy_fusion_impl!r} has no effect with "
                "cross_entropy_fusion=False (Megatron then runs its unfused cross entropy); drop one of the two."
            )
        if self.cross_entropy_fusion_impl == "te" and self.transformer_impl == "local":
            raise ValueError(
                "cross_entropy_fusion_impl='te' needs Transformer Engine, which transformer_impl='local' runs "
                "without; use 'native' (or None: native with the local spec)."
            )
        if self.zero_centered_gamma and self.transformer_impl == "local":
            raise ValueError(
                "zero_centered_gamma needs transformer_impl='transformer_engine' (Megatron-Core's local spec builds "
                "RMSNorm from torch.nn.RMSNorm, which has no zero-centered weight)."
            )
        if self.fused_qkv_rope is True and (self.transformer_impl == "local" or not self.apply_rope_fusion):
            raise ValueError(
                "fused_qkv_rope needs transformer_impl='transformer_engine' and apply_rope_fusion=True (the kernel is "
                "Transformer Engine's fused RoPE, applied to the whole QKV output); turn it off or use the "
                "Transformer Engine layer spec with fused RoPE."
            )

    def _check_numbers(self) -> None:
        """Every number and switch is what it looks like (``validate``'s rules): sizes whole numbers >= 1 (an integral
        ``256.0`` from YAML is stored as 256; ``256.7`` is refused, not cut to 256), the real-valued fields finite and
        > 0, switches true or false. All problems are reported at once, each with the field, the value and the range."""
        problems = []
        for name in SIZE_FIELDS:
            try:
                setattr(self, name, as_int(getattr(self, name), name, at_least=1))
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        for name in POSITIVE_REAL_FIELDS:
            try:
                setattr(self, name, as_float(getattr(self, name), name, above=0))
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        for name in SWITCH_FIELDS:
            try:
                as_bool(getattr(self, name), name)
            except SettingError as err:
                problems.append(str(err).rstrip("."))
        for name in OPTIONAL_SWITCH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                problems.append(f"{name} must be true, false or null (on where it applies), got {value!r}")
        if problems:
            raise SettingError("LlamaConfig: " + "; ".join(problems) + ".")

    @property
    def fused_qkv_rope_applies(self) -> bool:
        """Whether fused QKV RoPE is on for data without document masking: ``fused_qkv_rope``, or by default with
        the TE layer spec, fused RoPE and a Transformer Engine that has the kernel."""
        if self.fused_qkv_rope is not None:
            return self.fused_qkv_rope
        return self.transformer_impl == "transformer_engine" and self.apply_rope_fusion and te_fused_qkv_rope_support()

    @property
    def cross_entropy_impl(self) -> Literal["te", "native", "unfused"]:
        """The cross entropy the model runs: "unfused" without ``cross_entropy_fusion``; else
        ``cross_entropy_fusion_impl``, or by default "te" with the TE layer spec where the installed Transformer Engine
        has the kernel (``te_cross_entropy_support``) and "native" otherwise."""
        if not self.cross_entropy_fusion:
            return "unfused"
        if self.cross_entropy_fusion_impl is not None:
            return self.cross_entropy_fusion_impl
        if self.transformer_impl != "transformer_engine":
            return "native"
        return "te" if te_cross_entropy_support()[0] else "native"

    @classmethod
    def from_hf(cls, path: str | os.PathLike[str] | dict[str, Any], **overrides: Any) -> LlamaConfig:
        """The architecture of a Hugging Face Llama 3 / 3.1 / 3.2 directory (its ``config.json``, or the parsed
        file); ``overrides`` set training-side fields such as ``seq_length``, ``zero_centered_gamma`` or
        ``transformer_impl``. Fields that ``config.json`` decides cannot be overridden; unsupported settings raise
        ``HFConfigError`` naming the field."""
        from lightning_llama_fp8.hf.config import HF_DEFINED_FIELDS, HFConfigError, hf_architecture

        fields, source = hf_architecture(path)
        fixed = sorted(set(overrides) & set(HF_DEFINED_FIELDS))
        if fixed:
            raise HFConfigError(f"{', '.join(fixed)} come from {source} and cannot be overridden.")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise HFConfigError(f"Unknown LlamaConfig field(s) {unknown}.")
        try:
            return cls(**{**fields, **overrides})
        except ValueError as err:
            raise HFConfigError(f"{source}: {err}") from err

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """The embedding size Megatron allocates: vocab rounded up to ``divisible_by * TP``."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    # ---------------------------------------------------------------- counting
    def num_parameters(self, tensor_model_parallel_size: int = 1) -> int:
        """Exact parameter count of the model Megatron builds (all shards together)."""
        h, kv = self.hidden_size, self.num_query_groups * self.kv_channels
        q = self.num_attention_heads * self.kv_channels
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.ffn_hidden_size  # gate, up (fused as fc1) and down projections
        norms = 2 * h
        embeddings = self.padded_vocab_size(tensor_model_parallel_size) * h
        output_layer = 0 if self.tie_embeddings else embeddings
        return self.num_layers * (attention + mlp + norms) + h + embeddings + output_layer

    def flops_per_token(self, causal: bool = False) -> float:
        """Training FLOPs per token (forward + backward), counted the way Megatron-LM reports TFLOP/s.

        Every matrix multiply costs 2 FLOPs per multiply-add and the backward pass twice the forward. By default
        attention scores are counted over the full ``seq x seq`` square, as in Megatron-LM's published table (its
        800 TFLOP/s for Llama 3 8B is ~0.0579 TFLOP per token). ``causal=True`` halves that term for the causal
        mask, as current Megatron-LM logs do (``num_floating_point_operations`` at d98e8a6), so the numbers
        compare with its ``throughput per GPU (TFLOP/s/GPU)`` lines.
        """
        h, s = self.hidden_size, self.seq_length
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        per_layer = 2 * (h * (q + 2 * kv) + q * h)  # QKV and output projections
        per_layer += 2 * 2 * s * q * (0.5 if causal else 1.0)  # QK^T and attention-weighted V
        per_layer += 2 * 3 * h * self.ffn_hidden_size  # SwiGLU MLP
        logits = 2 * h * self.padded_vocab_size()
        return 3.0 * (self.num_layers * per_layer + logits)

    # ---------------------------------------------------------------- megatron
    def transformer_config(self, **overrides: Any) -> TransformerConfig:
        """Build the Megatron ``TransformerConfig``.

        ``overrides`` carries what the strategy (TP/CP/SP sizes, CP comm type) and the precision plugin
        (bf16, FP8 recipe) decide; they win over the architecture defaults here.
        """
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.enums import AttnBackend

        cross_entropy = self.cross_entropy_impl
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            layernorm_zero_centered_gamma=self.zero_centered_gamma,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            # The fused RoPE kernel comes from Transformer Engine; the local spec runs without TE.
            apply_rope_fusion=self.apply_rope_fusion and self.transformer_impl == "transformer_engine",
            fused_single_qkv_rope=self.fused_qkv_rope_applies,  # the module overrides it for document masking
            bias_activation_fusion=self.bias_activation_fusion,
            masked_softmax_fusion=self.masked_softmax_fusion,
            bias_dropout_fusion=self.bias_dropout_fusion,
            cross_entropy_loss_fusion=self.cross_entropy_fusion,
            # Megatron reads the kernel choice only with the fusion on; "native" is its own default.
            cross_entropy_fusion_impl="native" if cross_entropy == "unfused" else cross_entropy,
            attention_backend=AttnBackend[self.attention_backend],
            # The loss is summed over tokens and divided once by the global token count (Megatron-LM's
            # --calculate-per-token-loss), so every layout computes the same per-token mean.
            calculate_per_token_loss=True,
            bf16=True,
            params_dtype=torch.bfloat16,
        )
        kwargs.update(overrides)
        self._check_cross_entropy(kwargs)
        return TransformerConfig(**kwargs)

    def _check_cross_entropy(self, kwargs: dict[str, Any]) -> None:
        """Refuse TE's cross entropy, asked for here or in the overrides, where the installed Transformer Engine lacks
        the kernel measured here; log where the default falls back to Megatron's for that reason."""
        supported, installed = te_cross_entropy_support()
        if supported or not kwargs.get("cross_entropy_loss_fusion"):
            return
        if kwargs.get("cross_entropy_fusion_impl") == "te":
            raise ValueError(
                f"cross_entropy_fusion_impl='te' needs Transformer Engine >= {TE_CROSS_ENTROPY_MIN_VERSION} (the fused "
                "cross entropy that keeps bf16 logits and rebuilds an FP32 gradient; older versions keep the gradient "
                f"in BF16 or a full FP32 buffer); this machine has {installed}. Upgrade Transformer Engine, or set "
                "LlamaConfig(cross_entropy_fusion_impl='native')."
            )
        if self.cross_entropy_fusion_impl is None and self.transformer_impl == "transformer_engine":
            log.info(
                "Cross entropy: Megatron's (native) fused kernel; Transformer Engine's, the default with TE >= %s, "
                "is not used with the installed TE %s.",
                TE_CROSS_ENTROPY_MIN_VERSION,
                installed,
            )

    def layer_spec(self) -> ModuleSpec:
        """The Megatron layer spec: Transformer Engine modules, or Megatron-Core's local ones."""
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_local_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )

        if self.transformer_impl == "transformer_engine":
            return get_gpt_layer_with_transformer_engine_spec()
        return get_gpt_layer_local_spec(normalization="RMSNorm")

    def build_model(
        self,
        config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ) -> GPTModel:
        """Instantiate Megatron's GPTModel (with pipeline parallelism: one chunk, see ``parallel/pipeline.py``).

        ``parallel_state`` must already be initialised. ``pre_process``: the chunk has the embedding;
        ``post_process``: the final norm, output layer and loss; ``vp_stage``: its virtual pipeline stage.
        """
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            config=config,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            transformer_layer_spec=self.layer_spec(),
            vocab_size=self.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=self.seq_length,
            share_embeddings_and_output_weights=self.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
        )


# -------------------------------------------------------------------- presets
def llama3_8b(**overrides: Any) -> LlamaConfig:
    """Llama 3 8B: 8,030,261,248 parameters."""
    return LlamaConfig(**overrides)


def llama3_1_8b(**overrides: Any) -> LlamaConfig:
    """Llama 3.1 8B: Llama 3 8B with RoPE frequency scaling (factor 8) for long context."""
    return LlamaConfig(**{"rope_scaling": True, "rope_scaling_factor": 8.0, **overrides})


def llama3_70b(**overrides: Any) -> LlamaConfig:
    """Llama 3 70B: 70,553,706,496 parameters."""
    shape = dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64)
    return LlamaConfig(**{**shape, **overrides})


def llama3_2_1b(**overrides: Any) -> LlamaConfig:
    """Llama 3.2 1B: tied embeddings, RoPE scaling factor 32; 1,235,814,400 parameters."""
    shape = dict(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        kv_channels=64,
        tie_embeddings=True,
        rope_scaling=True,
        rope_scaling_factor=32.0,
    )
    return LlamaConfig(**{**shape, **overrides})


def llama3_2_3b(**overrides: Any) -> LlamaConfig:
    """Llama 3.2 3B: tied embeddings, RoPE scaling factor 32; 3,212,749,824 parameters."""
    shape = dict(
        num_layers=28,
        hidden_size=3072,
        ffn_hidden_size=8192,
        num_attention_heads=24,
        kv_channels=128,
        tie_embeddings=True,
        rope_scaling=True,
        rope_scaling_factor=32.0,
    )
    return LlamaConfig(**{**shape, **overrides})


def llama3_8b_4layers(**overrides: Any) -> LlamaConfig:
    """Llama 3 8B layer shapes, 4 layers: the one-GPU benchmark model (about 1.9B parameters)."""
    return LlamaConfig(**{"num_layers": 4, **overrides})


def llama_tiny(**overrides: Any) -> LlamaConfig:
    """A few-million-parameter Llama for tests and smoke runs (still GQA, SwiGLU, RoPE)."""
    shape = dict(
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=768,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=32,
        vocab_size=1024,
        seq_length=256,
    )
    return LlamaConfig(**{**shape, **overrides})


PRESETS: dict[str, Callable[..., LlamaConfig]] = {
    "llama3_8b": llama3_8b,
    "llama3_1_8b": llama3_1_8b,
    "llama3_70b": llama3_70b,
    "llama3_2_1b": llama3_2_1b,
    "llama3_2_3b": llama3_2_3b,
    "llama3_8b_4layers": llama3_8b_4layers,
    "llama_tiny": llama_tiny,
}


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """Look up a preset by name, applying field overrides."""
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"Unknown Llama preset {name!r}. Known presets: {known}.")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if unknown:
        raise ValueError(f"Unknown LlamaConfig field(s) {sorted(unknown)} in overrides for preset {name!r}.")
    return PRESETS[name](**overrides)


def check_data_matches_arch(arch: LlamaConfig, seq_length: int | None, vocab_size: int | None) -> None:
    """Raise ``ValueError`` if data of this ``seq_length`` / ``vocab_size`` (None: not known) cannot feed ``arch``."""
    if seq_length is not None and seq_length != arch.seq_length:
        raise ValueError(
            f"data.seq_length ({seq_length}) differs from model.arch.seq_length ({arch.seq_length}); "
            "set both to the same value."
        )
    if vocab_size is not None and vocab_size > arch.vocab_size:
        raise ValueError(
            f"data.vocab_size ({vocab_size}) exceeds model.arch.vocab_size ({arch.vocab_size}): token ids "
            "would index past the embedding."
        )


def llama_config_from_fields(fields: Mapping[str, Any], where: str = "model.arch") -> LlamaConfig:
    """A :class:`LlamaConfig` from a mapping of its fields (a YAML ``model.arch``); ``ValueError`` naming an unknown
    field and the fields there are (``LlamaConfig(**fields)`` would say only "unexpected keyword argument")."""
    known = [field.name for field in dataclasses.fields(LlamaConfig)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"{where} has no field {', '.join(map(repr, unknown))}; LlamaConfig's fields are {', '.join(known)}."
        )
    return LlamaConfig(**fields)
