"""LlamaLightningModule (model.py): its optimizer settings and schedule, how it reads the strategy and precision,
and the model it builds."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_llama_fp8._compat.warnings import MANUAL_OPTIMIZATION_CHECKPOINT_WARNING
from lightning_llama_fp8.config import get_preset
from lightning_llama_fp8.model import LlamaLightningModule
from lightning_llama_fp8.precision import MegatronPrecision
from lightning_llama_fp8.strategy import MegatronCPStrategy
from lightning_llama_fp8.validate import SettingError
from tests.helpers import (
    free_port,
)
from tests.helpers.models import tiny_llama


def test_resumed_schedule_follows_this_runs_settings() -> None:
    """A run resumed with a longer schedule (decay over 8 steps instead of 4) keeps the step count and decays
    over 8 (Megatron-LM's --override-opt_param-scheduler), instead of silently keeping the checkpoint's schedule."""
    from types import SimpleNamespace

    from lightning_llama_fp8 import LlamaLightningModule, OptimizerSettings

    def scheduler(decay_steps: int) -> tuple[Any, dict[str, float]]:
        group = {"max_lr": 3e-4, "min_lr": 3e-5, "lr": 0.0, "weight_decay": 0.1, "wd_mult": 1.0, "lr_mult": 1.0}
        settings = OptimizerSettings(lr=3e-4, min_lr=3e-5, warmup_steps=1, decay_steps=decay_steps)
        module = LlamaLightningModule(tiny_llama(), settings)
        return module.lr_scheduler(SimpleNamespace(param_groups=[group])), group

    saved, _ = scheduler(4)
    for _ in range(3):
        saved.step(increment=1)
    resumed, group = scheduler(8)
    resumed.load_state_dict(saved.state_dict())
    reference, reference_group = scheduler(8)
    for _ in range(3):
        reference.step(increment=1)
    assert resumed.num_steps == 3 and resumed.lr_decay_steps == 8
    assert group["lr"] == pytest.approx(reference_group["lr"]) and group["lr"] > 3e-5


def test_llama_module_installs_the_checkpoint_warning_filter() -> None:
    from lightning_llama_fp8 import LlamaLightningModule

    with warnings.catch_warnings():
        warnings.resetwarnings()
        LlamaLightningModule("llama_tiny")
        assert any(
            action == "ignore" and message is not None and message.pattern == MANUAL_OPTIMIZATION_CHECKPOINT_WARNING
            for action, message, *_ in warnings.filters
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lr": 0.0}, r"lr must be a finite number > 0; got 0\.0"),
        ({"lr": 1e-4, "min_lr": 1e-3}, r"min_lr must be <= lr \(0\.0001\); got 0\.001"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0; got -0\.1"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be a finite number >= 0 and < 1; got 1\.0"),
        ({"decay_style": "cosin"}, r"decay_style must be one of cosine, linear"),
        ({"decoupled_lr": 5e-4, "decoupled_min_lr": 1e-3}, r"decoupled_min_lr must be <= decoupled_lr \(0\.0005\)"),
        ({"decoupled_min_lr": 1e-3}, r"decoupled_min_lr must be <= lr \(0\.0003\); got 0\.001"),
    ],
)
def test_optimizer_settings_refuse_what_megatron_asserts_on(overrides: dict, message: str) -> None:
    from lightning_llama_fp8 import OptimizerSettings

    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**overrides)


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("lr", math.inf, "a finite number > 0"),
        ("lr", "fast", "a finite number > 0"),
        ("min_lr", -1e-5, "a finite number >= 0"),
        ("min_lr", math.nan, "a finite number >= 0"),
        ("weight_decay", math.nan, "a finite number >= 0"),
        ("weight_decay", math.inf, "a finite number >= 0"),
        ("adam_beta1", -0.1, "a finite number >= 0 and <= 1"),
        ("adam_beta1", math.nan, "a finite number >= 0 and <= 1"),
        ("adam_beta2", 1.5, "a finite number >= 0 and <= 1"),
        ("adam_eps", 0.0, "a finite number > 0"),
        ("adam_eps", math.nan, "a finite number > 0"),
        ("clip_grad", -1.0, "a finite number >= 0"),
        ("clip_grad", math.nan, "a finite number >= 0"),
        ("clip_grad", True, "a finite number >= 0"),
        ("warmup_steps", 2.5, "a whole number >= 0"),
        ("warmup_steps", -1, "a whole number >= 0"),
        ("warmup_steps", True, "a whole number >= 0"),
        ("decay_steps", 0, "a whole number >= 1"),
        ("decay_steps", 1000.5, "a whole number >= 1"),
        ("decay_steps", math.inf, "a whole number >= 1"),
        ("decoupled_lr", 0.0, "a finite number > 0"),
        ("decoupled_lr", math.nan, "a finite number > 0"),
        ("decoupled_min_lr", -1e-6, "a finite number >= 0"),
    ],
)
def test_optimizer_settings_refuse_numbers_that_are_not_what_they_look_like(
    field: str, value: object, accepted: str
) -> None:
    """A warmup of 2.5 steps or a NaN weight decay used to be accepted and reach Megatron's scheduler."""
    from lightning_llama_fp8 import OptimizerSettings

    with pytest.raises(SettingError, match=rf"^OptimizerSettings: {field} must be {accepted}; got ") as err:
        OptimizerSettings(**{field: value})
    assert repr(value) in str(err.value)


def test_optimizer_settings_take_whole_numbers_and_numeric_strings_and_report_every_problem() -> None:
    from lightning_llama_fp8 import OptimizerSettings

    settings = OptimizerSettings(lr="3e-4", warmup_steps=100.0, decay_steps="1e3", clip_grad=0)
    assert (settings.lr, settings.warmup_steps, settings.decay_steps, settings.clip_grad) == (3e-4, 100, 1000, 0.0)
    assert type(settings.warmup_steps) is int and type(settings.decay_steps) is int and type(settings.lr) is float
    with pytest.raises(SettingError) as err:
        OptimizerSettings(warmup_steps=2.5, weight_decay=math.nan, adam_beta1=1.0)
    message = str(err.value)
    for field in ("weight_decay", "adam_beta1", "warmup_steps"):
        assert f"{field} must be" in message


def test_optimizer_schedule_needs_a_length_longer_than_warmup() -> None:
    from lightning_llama_fp8 import OptimizerSettings

    assert OptimizerSettings(warmup_steps=10).check_schedule(50) == 50
    assert OptimizerSettings(warmup_steps=10, decay_steps=20).check_schedule(-1) == 20
    with pytest.raises(ValueError, match=r"trainer.max_steps, which is not set"):
        OptimizerSettings().check_schedule(-1)
    with pytest.raises(ValueError, match=r"warmup_steps \(100\) must be smaller than decay_steps \(50\)"):
        OptimizerSettings().check_schedule(50)


@pytest.fixture
def tiny_module() -> LlamaLightningModule:
    return LlamaLightningModule(get_preset("llama_tiny", transformer_impl="local", apply_rope_fusion=False))


@pytest.fixture
def dist_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Rendezvous variables for Lightning's env:// init; monkeypatch restores whatever Lightning writes."""
    assert not torch.distributed.is_initialized(), "another test leaked a process group"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_trainer_builds_megatron_model_from_strategy_and_precision(
    tiny_module: LlamaLightningModule, dist_env: None
) -> None:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    strategy = MegatronCPStrategy()
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
    # The first steps of Trainer._run, through public methods: ``strategy.connect`` is what fit() calls to
    # attach the module (it sets strategy._lightning_module / strategy.model), and the ``trainer`` setter is
    # what the data connector uses to attach the trainer to the module.
    trainer.strategy.connect(tiny_module)
    tiny_module.trainer = trainer
    assert trainer.lightning_module is tiny_module
    try:
        trainer.strategy.setup_environment()
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert parallel_state.model_parallel_is_initialized()
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert parallel_state.get_context_parallel_world_size() == 1
        assert parallel_state.get_data_parallel_world_size() == 1
        assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
        assert strategy.transformer_config_kwargs() == {
            "tensor_model_parallel_size": 1,
            "context_parallel_size": 1,
            "sequence_parallel": False,
            "use_cpu_initialization": True,  # not on a GPU
            "deterministic_mode": False,  # Trainer(deterministic=...) not set
        }

        tiny_module.configure_model()
        model = tiny_module.model
        assert isinstance(model, GPTModel)
        config = model.config
        assert config.tensor_model_parallel_size == 1
        assert config.context_parallel_size == 1
        assert config.bf16 is True
        assert config.params_dtype is torch.bfloat16
        assert config.use_cpu_initialization is True
        assert config.calculate_per_token_loss is True
        assert config.fp8 is None
        assert sum(p.numel() for p in model.parameters()) == tiny_module.arch.num_parameters()
        assert model.embedding.word_embeddings.weight.dtype is torch.bfloat16
        assert model.embedding.word_embeddings.weight.device.type == "cpu"
        # The model is a registered child (what the strategy wraps in Megatron DDP), and building is idempotent.
        assert dict(tiny_module.named_children())["model"] is model
        tiny_module.configure_model()
        assert tiny_module.model is model
    finally:
        trainer.strategy.teardown()
    assert not parallel_state.model_parallel_is_initialized()


def test_module_rejects_non_megatron_strategy(tiny_module: LlamaLightningModule) -> None:
    trainer = Trainer(
        accelerator="cpu", strategy=SingleDeviceStrategy(device="cpu"), plugins=[MegatronPrecision()], logger=False
    )
    tiny_module.trainer = trainer
    with pytest.raises(
        TypeError, match=r"needs Trainer\(strategy=MegatronCPStrategy\(\.\.\.\)\); got SingleDeviceStrategy"
    ):
        tiny_module.transformer_config()
    with pytest.raises(TypeError, match="got SingleDeviceStrategy"):
        tiny_module.configure_model()
    assert tiny_module.model is None


def test_module_rejects_non_megatron_precision(tiny_module: LlamaLightningModule) -> None:
    trainer = Trainer(accelerator="cpu", devices=1, strategy=MegatronCPStrategy(), logger=False)
    tiny_module.trainer = trainer
    with pytest.raises(
        TypeError,
        match=r"needs plugins=\[TEFP8Precision\(\)\] \(FP8\) or plugins=\[MegatronPrecision\(\)\] "
        r"\(BF16\); got Precision\.$",
    ):
        tiny_module.transformer_config()


def test_module_reads_layout_and_precision_from_trainer(tiny_module: LlamaLightningModule) -> None:
    # transformer_config() needs no process group: TP 2 / SP / CP fields come from the strategy, bf16 from the plugin.
    strategy = MegatronCPStrategy(tensor_model_parallel_size=2, sequence_parallel=True)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[MegatronPrecision()], logger=False)
    tiny_module.trainer = trainer
    config = tiny_module.transformer_config()
    assert config.tensor_model_parallel_size == 2
    assert config.sequence_parallel is True
    assert config.context_parallel_size == 1
    assert config.use_cpu_initialization is True
    assert config.bf16 is True and config.params_dtype is torch.bfloat16
    assert config.num_layers == 2 and config.hidden_size == 256  # the tiny arch


# ---------------------------------------------------------------------------------------------- document masking
def _masked_batch(micro_batch_size: int, num_microbatches: int, seq: int = 64) -> dict[str, Any]:
    """A DataLoader batch of MockDataModule with document masking (documents of 1 to 4095 tokens: seq 4096 holds
    several)."""
    from lightning_llama_fp8.data import MockDataModule

    data = MockDataModule(
        seq_length=seq, vocab_size=1000, global_batch_size=micro_batch_size * num_microbatches,
        micro_batch_size=micro_batch_size, train_samples=micro_batch_size * num_microbatches, val_samples=0,
        num_workers=0, document_masking=True,
    )  # fmt: skip
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_forward_inputs_pack_each_micro_batch_into_one_sequence() -> None:
    from lightning_llama_fp8.model import forward_inputs

    batch = _masked_batch(micro_batch_size=2, num_microbatches=1, seq=4096)
    micro = {key: value[0] for key, value in batch.items()}
    inputs, loss_mask = forward_inputs(micro, cp_group=None)
    assert set(inputs) == {"input_ids", "position_ids", "attention_mask", "labels", "packed_seq_params"}
    for key, name in (("tokens", "input_ids"), ("position_ids", "position_ids"), ("labels", "labels")):
        assert torch.equal(inputs[name], micro[key].reshape(1, 2 * 4096)), key  # sample 0, then sample 1
    assert torch.equal(loss_mask, micro["loss_mask"].reshape(1, -1)) and inputs["attention_mask"] is None
    params = inputs["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == list(batch["cu_seqlens"][0])
    assert len(batch["cu_seqlens"][0]) > 3  # several documents to keep apart
    lengths = [b - a for a, b in zip(batch["cu_seqlens"][0][:-1], batch["cu_seqlens"][0][1:], strict=True)]
    assert params.max_seqlen_q == params.max_seqlen_kv == max(lengths)
    logits_inputs, _ = forward_inputs(micro, cp_group=None, with_labels=False)
    assert "labels" not in logits_inputs and "packed_seq_params" in logits_inputs


@pytest.mark.parametrize("masking", [False, True])
def test_schedule_gets_the_packed_shape_and_every_micro_batch_its_documents(
    tiny_module: LlamaLightningModule, monkeypatch: pytest.MonkeyPatch, masking: bool
) -> None:
    """With document masking Megatron's schedule runs [1, mbs x seq] micro batches (the activation shape pipeline
    stages exchange), and each forward step builds the packed parameters of its own micro batch."""
    import megatron.core.pipeline_parallel as pipeline_parallel
    from megatron.core import parallel_state

    import lightning_llama_fp8.model as model_module

    batch = _masked_batch(micro_batch_size=2, num_microbatches=3)
    if not masking:
        del batch["cu_seqlens"]
    calls: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []

    def schedule(**kwargs: Any) -> list[Any]:
        calls.append(kwargs)
        for _ in range(kwargs["num_microbatches"]):
            kwargs["forward_step_func"](kwargs["data_iterator"], lambda **inputs: seen.append(inputs))
        return []

    monkeypatch.setattr(pipeline_parallel, "get_forward_backward_func", lambda: schedule)
    monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda: None)
    monkeypatch.setattr(model_module, "split_for_context_parallel", lambda micro, group: micro)  # CP 1
    monkeypatch.setattr(model_module, "reduce_pipeline_loss", lambda reports, device: (torch.ones(()),) * 3)
    tiny_module.model = torch.nn.Identity()  # one chunk (the schedule above never calls it)
    tiny_module.forward_backward(batch, forward_only=True)
    (call,) = calls
    assert call["num_microbatches"] == 3
    assert (call["seq_length"], call["micro_batch_size"]) == ((2 * 64, 1) if masking else (64, 2))
    assert len(seen) == 3
    for index, inputs in enumerate(seen):
        if masking:
            assert inputs["input_ids"].shape == (1, 2 * 64)
            assert inputs["packed_seq_params"].cu_seqlens_q.tolist() == list(batch["cu_seqlens"][index])
        else:
            assert inputs["input_ids"].shape == (2, 64) and "packed_seq_params" not in inputs


def test_fused_qkv_rope_with_document_masking_is_refused_before_building() -> None:
    from types import SimpleNamespace

    module = LlamaLightningModule(get_preset("llama_tiny", apply_rope_fusion=True, fused_qkv_rope=True))
    data = SimpleNamespace(seq_length=module.arch.seq_length, vocab_size=module.arch.vocab_size, document_masking=True)
    module._trainer = SimpleNamespace(datamodule=data, max_steps=1000)
    with pytest.raises(ValueError, match=r"fused_qkv_rope cannot go with data\.document_masking"):
        module.setup("fit")
    data.document_masking = False
    module.setup("fit")
    assert module.model is None  # the check builds nothing
    # A batch with document boundaries from elsewhere (no masking data module) is refused at the step.
    module.model = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"boundaries \(document masking\) and fused QKV RoPE is on .* Set "
                       r"model.arch.fused_qkv_rope: false"):  # fmt: skip
        module.forward_backward(_masked_batch(micro_batch_size=1, num_microbatches=1), forward_only=True)


def test_fused_qkv_rope_by_default_is_off_for_a_masking_data_module_and_on_otherwise() -> None:
    from types import SimpleNamespace

    module = LlamaLightningModule(get_preset("llama_tiny", apply_rope_fusion=True))
    data = SimpleNamespace(seq_length=module.arch.seq_length, vocab_size=module.arch.vocab_size, document_masking=True)
    module._trainer = SimpleNamespace(datamodule=data, max_steps=1000)
    module.setup("fit")
    assert module.fused_qkv_rope_in_use is False
    data.document_masking = False
    module.setup("fit")
    assert module.fused_qkv_rope_in_use is True
    # Megatron's config gets the module's choice, over the architecture's default (on here).
    strategy = MegatronCPStrategy()
    strategy.transformer_config_kwargs = dict  # type: ignore[method-assign]  # the layout's fields: not needed
    module._trainer = SimpleNamespace(datamodule=data, max_steps=1000, strategy=strategy, precision_plugin=None)
    module._trainer.precision_plugin = MegatronPrecision()
    module.arch.transformer_config = lambda **overrides: overrides  # type: ignore[method-assign]
    data.document_masking = True
    module.setup("fit")
    assert module.transformer_config()["fused_single_qkv_rope"] is False


def test_fused_qkv_rope_of_a_built_model_stands_and_masked_data_is_refused_for_it() -> None:
    from types import SimpleNamespace

    module = LlamaLightningModule(get_preset("llama_tiny", apply_rope_fusion=True))
    data = SimpleNamespace(seq_length=module.arch.seq_length, vocab_size=module.arch.vocab_size, document_masking=False)
    module._trainer = SimpleNamespace(datamodule=data, max_steps=1000)
    module.setup("fit")
    module.model = torch.nn.Identity()  # built with fused QKV RoPE by this fit
    data.document_masking = True
    with pytest.raises(ValueError, match=r"model was built with fused QKV RoPE .* Build a new LlamaLightningModule"):
        module.setup("fit")


def test_module_takes_mappings_for_its_settings_and_refuses_other_types() -> None:
    """A dict arch or optimizer (as from JSON) failed later with "'dict' object has no attribute ..."."""
    from lightning_llama_fp8 import LlamaLightningModule, OptimizerSettings, get_preset

    module = LlamaLightningModule({"num_layers": 2, "hidden_size": 256}, optimizer={"lr": 1e-4, "warmup_steps": 5})
    assert (module.arch.num_layers, module.arch.hidden_size) == (2, 256)
    assert module.optim == OptimizerSettings(lr=1e-4, warmup_steps=5)
    with pytest.raises(ValueError, match=r"model.arch has no field 'num_layer'; LlamaConfig's fields are num_layers"):
        LlamaLightningModule({"num_layer": 2})
    with pytest.raises(TypeError, match=r"arch must be a preset name, a LlamaConfig .*; got 123"):
        LlamaLightningModule(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be OptimizerSettings .*; got 0.1"):
        LlamaLightningModule(get_preset("llama_tiny"), optimizer=0.1)  # type: ignore[arg-type]
