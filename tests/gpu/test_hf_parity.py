"""Hugging Face parity on one GPU: our GPTModel (Transformer Engine spec) computes transformers' Llama.

For random Llama models (hidden 1024, 4 layers, 16 heads, 4 KV groups, vocab 128256; one with Llama 3.1 RoPE
scaling, one with tied embeddings) imported with ``load_hf_weights``: logits vs ``transformers.LlamaForCausalLM``
on the same tokens in FP32 and BF16 (max abs difference, KL divergence), greedy decoding of 32 tokens, and the
bitwise round trip HF -> ours -> HF. Then a model initialised from Hugging Face weights trains a few FP8 steps
with this project's trainer, is saved, exported with ``export_to_hf`` and loaded by transformers: its loss on a
fixed batch equals ours. Writes ``hf_parity.json`` into ``$HF_PARITY_OUT`` (or ``$GPU_RESULTS_DIR``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from tests.gpu.probes import megatron_on_one_gpu

# FP32 parity needs FP32 GEMMs: Transformer Engine's cuBLASLt GEMMs may run FP32 inputs on TF32 tensor cores, which
# torch's allow_tf32 flags do not reach. cuBLAS honours this variable for every handle created after it is set, and
# pytest imports this module before any test touches CUDA. Set it to 1 (as the hf-parity stage does once) to
# measure what TF32 costs.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0)  # fmt: skip
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
CASES = {
    "rope_scaling_untied": dict(rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False, max_position_embeddings=131072),
    "tied": dict(tie_word_embeddings=True, max_position_embeddings=8192),
}
# Tolerances (logits of random models with initializer_range 0.1, so that they are peaked: std ~ 3).
# FP32: both sides in fp32 with TF32 off; the remaining difference is summation order.
FP32_MAX_ABS, FP32_KL = 2e-3, 1e-7
# BF16: both sides in bf16 round their activations at different points, and these random models' residual streams
# are large (~1e3), so bf16's own error is large too (first GPU run: max abs 2.3, KL 0.035 between the two). The
# tolerance is measured in the same test: against transformers in FP32, our BF16 logits may be at most this many
# times as far off as transformers' own BF16 logits (max abs difference and KL).
BF16_NOISE_FACTOR = 2.0
# Loss of the FP8-trained, exported model: transformers (BF16) vs ours with FP8 off (BF16) and on.
LOSS_BF16_ABS, LOSS_FP8_ABS = 0.01, 0.05
SEQ, BATCH, NEW_TOKENS = 256, 2, 32

RESULTS: dict[str, Any] = {"cases": [], "nvidia_tf32_override": os.environ["NVIDIA_TF32_OVERRIDE"]}
# Megatron-Core selects an attention backend by setting these in the process environment when a model is built
# with one, and refuses to build a later "auto" model while they are set: each test restores them.
ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@pytest.fixture(autouse=True)
def _restore_attention_env() -> Any:
    saved = {name: os.environ.get(name) for name in ATTENTION_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _out_dir() -> Path | None:
    out = os.environ.get("HF_PARITY_OUT") or os.environ.get("GPU_RESULTS_DIR")
    return Path(out) if out else None


def _write_results() -> None:
    RESULTS["card"] = torch.cuda.get_device_name()
    out = _out_dir()
    print("[hf_parity]", json.dumps(RESULTS)[:3000])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "hf_parity.json").write_text(json.dumps(RESULTS, indent=2))


def _make_hf(directory: Path, case: str, seed: int = 0) -> None:
    config = transformers.LlamaConfig(**SHAPE, **CASES[case], initializer_range=0.1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.to(torch.float32).save_pretrained(directory)


@pytest.fixture(scope="module")
def megatron_one_gpu() -> Any:
    """Megatron's parallel state on this one GPU (TP1, CP1), and its RNG tracker."""
    with megatron_on_one_gpu(port=29533):
        yield
    _write_results()


def _our_model(hf_dir: Path, dtype: torch.dtype) -> Any:
    from lightning_llama_fp8 import LlamaConfig
    from lightning_llama_fp8.hf import load_hf_weights

    arch = LlamaConfig.from_hf(hf_dir, seq_length=SEQ + NEW_TOKENS)
    from megatron.core.transformer.enums import AttnBackend

    # FP32 runs TE's unfused attention: its fused and flash kernels take 16-bit inputs only.
    backend = {} if dtype == torch.bfloat16 else {"attention_backend": AttnBackend.unfused}
    config = arch.transformer_config(bf16=dtype == torch.bfloat16, params_dtype=dtype, **backend)
    model = arch.build_model(config).cuda().eval()
    load_hf_weights(model, hf_dir, arch, 0, 1)
    return arch, model


def _our_logits(model: Any, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return logits[..., :vocab].float()


def _hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def _greedy(step: Any, prompt: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by repeated full forward passes; returns the tokens and each step's last logits."""
    tokens, last = prompt, []
    for _ in range(NEW_TOKENS):
        logits = step(tokens)[:, -1]
        last.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1] :], last


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other)."""
    p = torch.log_softmax(reference, -1)
    q = torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(megatron_one_gpu: Any, tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf_dir = tmp_path / "hf"
    _make_hf(hf_dir, case)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").cuda()
    hf.eval()
    arch, ours = _our_model(hf_dir, dtype)
    vocab = arch.vocab_size
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=generator).cuda()
    reference, mine = _hf_logits(hf, tokens), _our_logits(ours, tokens, vocab)
    max_abs, kl = float((reference - mine).abs().max()), _kl(reference, mine)
    layer_diffs = _hidden_state_diffs(hf, ours, tokens)

    prompt = tokens[:1, :16]
    hf_tokens, hf_last = _greedy(lambda t: _hf_logits(hf, t), prompt)
    our_tokens, _ = _greedy(lambda t: _our_logits(ours, t, vocab), prompt)
    greedy_equal = bool(torch.equal(hf_tokens, our_tokens))
    first_difference, gap = None, None
    if not greedy_equal:
        first_difference = int((hf_tokens != our_tokens).nonzero()[0, 1])
        top2 = hf_last[first_difference].topk(2, dim=-1).values[0]
        gap = float(top2[0] - top2[1])

    roundtrip = _roundtrip_bitwise(hf_dir, arch, ours)
    against_fp32 = _bf16_against_fp32(hf_dir, tokens, reference, mine) if dtype == torch.bfloat16 else None
    RESULTS["cases"].append({
        "name": case, "dtype": str(dtype).removeprefix("torch."), "max_abs_logit_diff": max_abs, "kl": kl,
        "greedy_tokens_equal": greedy_equal, "greedy_first_difference": first_difference,
        "greedy_top2_gap_at_difference": gap, "roundtrip_bitwise": roundtrip,
        "logit_std": float(reference.std()), "tokens": [BATCH, SEQ], "hidden_state_max_abs_diff": layer_diffs,
        "against_transformers_fp32": against_fp32,
    })  # fmt: skip
    assert roundtrip
    if against_fp32 is None:
        assert max_abs <= FP32_MAX_ABS and kl <= FP32_KL, (max_abs, kl)
        assert greedy_equal, (hf_tokens, our_tokens)
    else:
        for metric in ("max_abs_logit_diff", "kl"):
            ours_error, their_error = against_fp32["ours_bf16"][metric], against_fp32["transformers_bf16"][metric]
            assert ours_error <= BF16_NOISE_FACTOR * their_error, (metric, against_fp32)
        # BF16 noise may flip a near-tie: allowed only where transformers' own top-2 gap is within the noise.
        assert greedy_equal or gap <= 2 * max_abs, (first_difference, gap, max_abs)


def _bf16_against_fp32(hf_dir: Path, tokens: torch.Tensor, theirs: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    """How far transformers' BF16 logits and ours are from transformers' FP32 logits on the same tokens."""
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    reference = _hf_logits(hf32.cuda().eval(), tokens)
    del hf32

    def error(logits: torch.Tensor) -> dict[str, float]:
        return {"max_abs_logit_diff": float((reference - logits).abs().max()), "kl": _kl(reference, logits)}

    return {"transformers_bf16": error(theirs), "ours_bf16": error(ours)}


def _hidden_state_diffs(hf: Any, ours: Any, tokens: torch.Tensor) -> dict[str, float]:
    """Where the two models part: max abs difference after the embedding, each layer and the final norm."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            captured[name] = value.detach().transpose(0, 1).float()  # Megatron is [s, b, h]; transformers [b, s, h]

        return hook

    decoder = ours.decoder
    handles = [ours.embedding.register_forward_hook(keep("embedding"))]
    handles += [layer.register_forward_hook(keep(f"layer_{i}")) for i, layer in enumerate(decoder.layers)]
    handles.append(decoder.final_layernorm.register_forward_hook(keep("final_norm")))
    try:
        _our_logits(ours, tokens, 1)
        with torch.no_grad():
            theirs = hf(tokens, output_hidden_states=True).hidden_states  # embedding, layers 0..L-2, final norm
    finally:
        for handle in handles:
            handle.remove()
    names = ["embedding"] + [f"layer_{i}" for i in range(len(decoder.layers) - 1)] + ["final_norm"]
    assert len(theirs) == len(names), (len(theirs), names)
    return {
        name: float((captured[name] - state.float()).abs().max()) for name, state in zip(names, theirs, strict=True)
    }


def _roundtrip_bitwise(hf_dir: Path, arch: Any, model: Any) -> bool:
    """Our parameters mapped back to Hugging Face tensors equal the file's (in the parameters' dtype)."""
    from lightning_llama_fp8.hf.files import SafetensorsDir
    from lightning_llama_fp8.hf.mapping import _hf_tensors, parse_megatron_name

    weights = SafetensorsDir(hf_dir)
    for name, param in model.named_parameters():
        kind, layer = parse_megatron_name(name)
        for hf_name, value in _hf_tensors(kind, layer, param.detach().cpu(), arch).items():
            if not torch.equal(value.to(param.dtype), weights.read(hf_name).to(param.dtype)):
                return False
    return True


# ---------------------------------------------------------------------------------------------- trained in FP8
@pytest.mark.parametrize("fp8_weights", [False, True], ids=["bf16-weights", "fp8-weights"])
def test_fp8_trained_model_exports_to_transformers(megatron_one_gpu: Any, tmp_path: Path, fp8_weights: bool) -> None:
    from megatron.core import parallel_state

    from lightning_llama_fp8 import LlamaConfig, LlamaLightningModule, MegatronPrecision, MockDataModule, TEFP8Precision
    from lightning_llama_fp8.checkpoint.info import CheckpointError
    from lightning_llama_fp8.hf import export_to_hf
    from lightning_llama_fp8.hf.export import SOURCE_MAIN, SOURCE_MODEL
    from lightning_llama_fp8.hf.files import SafetensorsDir
    from tests.gpu.probes import StepProbe, one_gpu_trainer, short_run_optimizer

    parallel_state.destroy_model_parallel()  # the Trainer's strategy sets up its own
    hf_dir = tmp_path / "hf"
    _make_hf(hf_dir, "rope_scaling_untied")
    steps = 4
    arch = LlamaConfig.from_hf(hf_dir, seq_length=SEQ)
    module = LlamaLightningModule(arch=arch, optimizer=short_run_optimizer(steps), init_weights=str(hf_dir))
    plugin = TEFP8Precision(fp8_param_gather=fp8_weights)
    probe = StepProbe()
    assert isinstance(plugin, MegatronPrecision)
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, arch.vocab_size, (BATCH, SEQ + 1), generator=generator).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    at_end = _SaveAndMeasureAtTrainEnd(tmp_path, inputs, labels, arch.vocab_size, plugin, measure_bf16=not fp8_weights)
    trainer = one_gpu_trainer(plugin, steps, [probe, at_end])
    trainer.strategy.checkpoint_optimizer_sharding = "fully_reshardable" if fp8_weights else "dp_reshardable"
    data = MockDataModule(seq_length=SEQ, vocab_size=arch.vocab_size, global_batch_size=4, micro_batch_size=2)
    trainer.fit(module, datamodule=data)

    out = tmp_path / "exported"
    report = export_to_hf(at_end.checkpoint, out)
    assert report.weights_source == (SOURCE_MAIN if fp8_weights else SOURCE_MODEL)
    exported, original = SafetensorsDir(out), SafetensorsDir(hf_dir)
    # Trained 4 steps at lr <= 1.5e-5 from the Hugging Face weights: the export stays next to them, relative to each
    # tensor's largest value (one bf16 rounding step is <= 2^-8 of it; first GPU run: 0.0039 absolute on a norm
    # weight near 1, i.e. one step). A model whose fp32 main weights had kept the random initialisation would be
    # ~1 away (other random values of the same size).
    drift = max(_relative_difference(exported.read(n), original.read(n)) for n in original.names())

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf = hf.cuda().eval()
    hf_loss = float(torch.nn.functional.cross_entropy(_hf_logits(hf, inputs).flatten(0, 1), labels.flatten()))
    fp8_loss, bf16_loss = at_end.losses["fp8"], at_end.losses.get("bf16")
    refused = None
    if fp8_weights:  # the same run saved dp_reshardable: its fp32 main weights are not readable, so it is refused
        try:
            export_to_hf(at_end.dp_checkpoint, tmp_path / "dp_out")
        except CheckpointError as err:
            refused = str(err)[:200]
    RESULTS["cases"].append({
        "name": f"fp8_trained_{'fp8' if fp8_weights else 'bf16'}_weights", "dtype": "bf16", "steps": steps,
        "train_losses": probe.losses, "weights_source": report.weights_source, "hf_loss": hf_loss,
        "our_loss_fp8": fp8_loss, "our_loss_bf16": bf16_loss, "max_relative_weight_drift_from_hf": drift,
        "dp_reshardable_refused": refused, "max_abs_logit_diff": None, "kl": None, "greedy_tokens_equal": None,
        "roundtrip_bitwise": None,
    })  # fmt: skip
    assert drift < 2e-2, drift
    assert abs(fp8_loss - hf_loss) <= LOSS_FP8_ABS, (fp8_loss, hf_loss)
    if bf16_loss is not None:
        assert abs(bf16_loss - hf_loss) <= LOSS_BF16_ABS, (bf16_loss, hf_loss)
    if fp8_weights:
        assert refused is not None and "dp_reshardable" in refused


def _relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


class _SaveAndMeasureAtTrainEnd(Callback):
    """At the end of training, while the strategy's process groups still exist: save the checkpoint(s) and compute
    our loss on the fixed batch (with FP8, and with FP8 off when the weights are BF16)."""

    def __init__(self, root: Path, inputs: torch.Tensor, labels: torch.Tensor, vocab: int, plugin: Any,
                 measure_bf16: bool) -> None:  # fmt: skip
        self.checkpoint, self.dp_checkpoint = root / "trained.ckpt", root / "trained_dp.ckpt"
        self.inputs, self.labels, self.vocab = inputs, labels, vocab
        self.plugin, self.measure_bf16 = plugin, measure_bf16
        self.losses: dict[str, float] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.save_checkpoint(self.checkpoint)
        if trainer.strategy.checkpoint_optimizer_sharding == "fully_reshardable":
            trainer.strategy.checkpoint_optimizer_sharding = "dp_reshardable"
            trainer.save_checkpoint(self.dp_checkpoint)
        model = pl_module.model
        model.eval()
        positions = torch.arange(self.inputs.shape[1], device=self.inputs.device).expand_as(self.inputs)

        def loss() -> float:
            with torch.no_grad():
                logits = model(input_ids=self.inputs, position_ids=positions, attention_mask=None)[..., : self.vocab]
            return float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten()))

        self.losses["fp8"] = loss()
        if self.measure_bf16:
            self.plugin.set_fp8_enabled(pl_module, False)
            self.losses["bf16"] = loss()
            self.plugin.set_fp8_enabled(pl_module, True)
