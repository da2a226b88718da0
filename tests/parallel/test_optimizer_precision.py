"""Megatron's precision-aware optimizer as ``MegatronCPStrategy(optimizer_precision=...)``: the settings, their
refusals before anything is built, what reaches Megatron's ``OptimizerConfig``, the plan's bytes, ``llama-fp8 plan``
and the checkpoint record that refuses a resume into other optimizer-state dtypes (CPU)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8 import (
    MegatronCPStrategy,
    MegatronPrecision,
    OptimizerOffloadSettings,
    OptimizerPrecisionSettings,
    ParallelLayout,
    TEFP8Precision,
    get_preset,
)
from lightning_llama_fp8.checkpoint.info import CheckpointError, CheckpointInfo
from lightning_llama_fp8.checkpoint.preflight import optimizer_state_record, resume_records
from lightning_llama_fp8.checkpoint.resume import check_can_resume
from lightning_llama_fp8.cli.plan import plan_main
from lightning_llama_fp8.parallel.optimizer_precision import DEFAULT_OPTIMIZER_PRECISION_RECORD
from lightning_llama_fp8.plan import plan_training
from tests.helpers import fit_never_built
from tests.helpers.trainers import cpu_cli_of_example

PARAMS_8B = 8_030_261_248


# ---------------------------------------------------------------------------------------------- the settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exp_avg_dtype": "fp16"}, r"exp_avg_dtype must be one of fp32, bf16, got 'fp16'"),
        ({"exp_avg_sq_dtype": "fp8"}, r"exp_avg_sq_dtype must be one of fp32, bf16, got 'fp8'"),
        ({"store_param_remainders": "yes"}, r"store_param_remainders must be true or false"),
        ({"exp_avg_sq_dtype": "fp32"}, r"exp_avg_dtype \(bf16\) and exp_avg_sq_dtype \(fp32\) must be the same"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerPrecisionSettings(**kwargs)


def test_bytes_per_parameter_follow_what_fusedadam_keeps() -> None:
    assert OptimizerPrecisionSettings().bytes_per_parameter() == 2 + 2 + 2  # remainders, two bf16 moments
    assert OptimizerPrecisionSettings(store_param_remainders=False).bytes_per_parameter() == 4 + 2 + 2
    assert OptimizerPrecisionSettings("fp32", "fp32", store_param_remainders=False).bytes_per_parameter() == 12
    assert "fp32 moments, fp32 main weights" in OptimizerPrecisionSettings("fp32", "fp32", False).describe()


# ---------------------------------------------------------------------------------------------- refusals
def test_needs_the_distributed_optimizer() -> None:
    with pytest.raises(ValueError, match=r"optimizer_precision: needs use_distributed_optimizer=True"):
        MegatronCPStrategy(
            use_distributed_optimizer=False,
            overlap_param_gather=False,
            optimizer_precision=OptimizerPrecisionSettings(),
        )


def test_cannot_be_combined_with_offload() -> None:
    with pytest.raises(ValueError, match=r"cannot be combined with optimizer_offload"):
        MegatronCPStrategy(
            optimizer_offload=OptimizerOffloadSettings(0.5), optimizer_precision=OptimizerPrecisionSettings()
        )


@pytest.mark.parametrize(
    "settings", [OptimizerPrecisionSettings(), OptimizerPrecisionSettings("fp32", "fp32", store_param_remainders=False)]
)
def test_fp8_weights_are_refused_before_building(
    monkeypatch: pytest.MonkeyPatch, settings: OptimizerPrecisionSettings
) -> None:
    """Transformer Engine's FP8 Adam kernel takes fp32 moments and fp32 main weights only (Megatron-LM fails at its
    first step with bf16 moments; TE would give FP8 weights int16 remainders too, as their nominal dtype is bf16)."""
    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    with pytest.raises(ValueError, match=r"needs bf16 weights \(FP8 compute is fine\).*Set fp8_param_gather: false"):
        fit_never_built(TEFP8Precision(fp8_param_gather=True), optimizer_precision=settings)
    assert not torch.distributed.is_initialized()


def test_remainders_with_fully_reshardable_checkpoints_are_refused() -> None:
    """Megatron writes the int16 remainders into fully_reshardable's fp32 main weights and cannot load them back."""
    with pytest.raises(ValueError, match=r"store_param_remainders cannot go with checkpoint_optimizer_sharding="):
        MegatronCPStrategy(
            checkpoint_optimizer_sharding="fully_reshardable", optimizer_precision=OptimizerPrecisionSettings()
        )
    MegatronCPStrategy(
        checkpoint_optimizer_sharding="fully_reshardable",
        optimizer_precision=OptimizerPrecisionSettings(store_param_remainders=False),
    )


def test_without_transformer_engine_it_is_refused_before_building() -> None:
    """This CPU machine has no Transformer Engine; Megatron would fail building the optimizer, after the model."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match=r"Transformer Engine is not installed here"):
        fit_never_built(MegatronPrecision(), optimizer_precision=OptimizerPrecisionSettings())
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------- Megatron's config
@pytest.fixture
def fusedadam_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron's OptimizerConfig checks Transformer Engine's FusedAdam signature; a stand-in with the same
    arguments lets the CPU build the config (the optimizer itself needs CUDA)."""

    class FusedAdam:
        def __init__(
            self,
            params: Any = None,
            master_weight_dtype: Any = None,
            exp_avg_dtype: Any = None,
            exp_avg_sq_dtype: Any = None,
            use_decoupled_grad: bool = False,
        ) -> None: ...

    optimizers = types.ModuleType("transformer_engine.pytorch.optimizers")
    optimizers.FusedAdam = FusedAdam  # type: ignore[attr-defined]
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.optimizers", optimizers)
    # and asks for Transformer Engine >= 2.1 (store_param_remainders); 2.20.2 is what the GPU machine runs
    monkeypatch.setattr("megatron.core.optimizer.optimizer_config.is_te_min_version", lambda version: True)


@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise"])
def test_fusedadam_keeps_the_main_weights_with_bf16_weights_for_every_recipe(
    fusedadam_signature: None, monkeypatch: pytest.MonkeyPatch, recipe: str
) -> None:
    """With bf16 weights Megatron's precision-aware path (main weights in FusedAdam, gradients read from the buffer,
    no fp32 copy) must hold for current and blockwise scaling too: the plugin gives the optimizer no recipe then."""
    from megatron.core.optimizer import OptimizerConfig

    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    strategy = MegatronCPStrategy(optimizer_precision=OptimizerPrecisionSettings())
    plugin = TEFP8Precision(recipe=recipe)
    config = OptimizerConfig(
        lr=1e-4,
        bf16=True,
        params_dtype=torch.bfloat16,
        **strategy.optimizer_config_kwargs(),
        **plugin.optimizer_config_kwargs(),
    )
    assert config.use_precision_aware_optimizer and config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    assert config.exp_avg_dtype == config.exp_avg_sq_dtype == torch.bfloat16
    assert config.main_params_dtype == torch.float32 and config.store_param_remainders
    # What the recipe would have done (why the plugin leaves it out with bf16 weights):
    with_recipe = OptimizerConfig(
        lr=1e-4,
        bf16=True,
        **strategy.optimizer_config_kwargs(),
        fp8_recipe={"current": "tensorwise"}.get(recipe, recipe),
    )
    assert with_recipe.use_precision_aware_optimizer_no_fp8_or_ds_fp8 == (recipe == "delayed")
    assert MegatronCPStrategy().optimizer_config_kwargs() == {
        "use_distributed_optimizer": True,
        "overlap_param_gather": True,
    }


def test_settings_from_yaml_through_lightning_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = cpu_cli_of_example(
        monkeypatch, "llama3_8b_1gpu_fp8.yaml", "--trainer.strategy.optimizer_precision.store_param_remainders", "false"
    )
    settings = parsed.trainer.strategy.optimizer_precision
    assert settings == OptimizerPrecisionSettings("bf16", "bf16", store_param_remainders=False)
    assert isinstance(parsed.trainer.precision_plugin, MegatronPrecision)


# ---------------------------------------------------------------------------------------------- the plan
def test_plan_counts_the_precision_aware_state_and_no_gradient_copy() -> None:
    layout = ParallelLayout()
    default = plan_training("llama3_8b", layout, 1, 8, 1, "fp8", optimizer_precision=None)
    bf16 = plan_training("llama3_8b", layout, 1, 8, 1, "fp8", optimizer_precision=OptimizerPrecisionSettings())
    assert default.parameters_per_gpu == bf16.parameters_per_gpu == PARAMS_8B
    assert default.memory.optimizer == 12 * PARAMS_8B and default.memory.optimizer_step == 4 * PARAMS_8B
    assert bf16.memory.optimizer == 6 * PARAMS_8B and bf16.memory.optimizer_step == 0
    # FP8 compute on bf16 weights: TE's FP8 copy and transpose of every linear weight, counted in both.
    linear = bf16.parameter_counts.linear
    assert bf16.memory.fp8_weight_cache == default.memory.fp8_weight_cache == 2 * linear
    fp8_weights = plan_training("llama3_8b", layout, 1, 8, 1, "fp8", fp8_param_gather=True)
    assert fp8_weights.memory.fp8_weight_cache == 0
    with pytest.raises(ValueError, match="needs bf16 weights"):
        plan_training(
            "llama3_8b", layout, 1, 8, 1, "fp8", fp8_param_gather=True, optimizer_precision=OptimizerPrecisionSettings()
        )
    with pytest.raises(ValueError, match="store_param_remainders cannot go with"):
        plan_training(
            "llama3_8b", layout, 1, 8, 1, "fp8", optimizer_precision=OptimizerPrecisionSettings(),
            checkpoint_optimizer_sharding="fully_reshardable",
        )  # fmt: skip


def test_llama_fp8_plan_says_whether_the_one_gpu_8b_fits(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--arch", "llama3_8b", "--gpus", "1", "--global-batch-size", "8", "--micro-batch-size", "1"]
    assert plan_main([*common, "--precision", "fp8", "--optimizer-precision", "off", "--gpu-memory-gib", "139.8"]) == 1
    default = capsys.readouterr().out
    assert "Megatron's default: fp32 main weights and Adam moments" in default
    assert re.search(r"Fits 139.8 GiB per GPU +no,", default)
    args = [*common, "--precision", "fp8", "--no-fp8-param-gather", "--optimizer-precision", "bf16"]
    assert plan_main([*args, "--gpu-memory-gib", "139.8"]) == 0
    out = capsys.readouterr().out
    assert "precision-aware Adam: bf16 moments, fp32 main weights as 16-bit remainders" in out
    assert re.search(r"\n  optimizer +44\.87 GiB\n", out) and "optimizer step" not in out
    assert re.search(r"Fits 139.8 GiB per GPU +yes", out)
    code = plan_main([*common, "--precision", "fp8", "--fp8-param-gather", "--optimizer-precision", "bf16"])
    assert code != 0
    assert "needs bf16 weights" in capsys.readouterr().err


def test_plan_reads_the_setting_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import REPO_ROOT

    config = REPO_ROOT / "examples" / "configs" / "llama3_8b_1gpu_fp8.yaml"
    assert plan_main(["--config", str(config), "--gpu-memory-gib", "139.8"]) == 0
    out = capsys.readouterr().out
    assert "precision-aware Adam: bf16 moments" in out and "FP8 param gather off" in out
    # --optimizer-precision changes the moments and keeps the config's other fields
    text = config.read_text().replace("store_param_remainders: true", "store_param_remainders: false")
    (tmp_path / "whole_main_weights.yaml").write_text(text)
    assert plan_main(["--config", str(tmp_path / "whole_main_weights.yaml"), "--optimizer-precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "precision-aware Adam: fp32 moments, fp32 main weights, no fp32 gradient copy" in out
    assert re.search(r"\n  optimizer +89\.75 GiB\n", out)  # 4 + 4 + 4 bytes per parameter


# ---------------------------------------------------------------------------------------------- checkpoints
def _info(**overrides: Any) -> CheckpointInfo:
    fields: dict[str, Any] = dict(
        path=Path("ck"), global_step=10, tensor_model_parallel_size=1, context_parallel_size=1, world_size=1,
        optimizer_sharding="dp_reshardable",
    )  # fmt: skip
    return CheckpointInfo(**{**fields, **overrides})


def test_resume_into_other_optimizer_state_dtypes_is_refused_naming_both() -> None:
    bf16 = OptimizerPrecisionSettings().checkpoint_record()
    # An older checkpoint (no record) holds Megatron's default state.
    with pytest.raises(CheckpointError, match=r"holds optimizer state as Megatron's default .* this run keeps it as "
                       r"precision-aware Adam \(exp_avg bf16, exp_avg_sq bf16, main-weight remainders\)"):  # fmt: skip
        check_can_resume(_info(), None, 1, 1, with_optimizer=True, optimizer_state=bf16)
    with pytest.raises(CheckpointError, match=r"Resume with the checkpoint's optimizer_precision \(\{exp_avg_dtype: "
                       r"bf16, exp_avg_sq_dtype: bf16, store_param_remainders: true\}\)"):  # fmt: skip
        check_can_resume(
            _info(optimizer_state=bf16), None, 1, 1, with_optimizer=True,
            optimizer_state=dict(DEFAULT_OPTIMIZER_PRECISION_RECORD),
        )  # fmt: skip
    check_can_resume(_info(optimizer_state=bf16), None, 1, 1, with_optimizer=True, optimizer_state=dict(bf16))
    check_can_resume(_info(), None, 1, 1, with_optimizer=True, optimizer_state=dict(DEFAULT_OPTIMIZER_PRECISION_RECORD))
    # Weights alone (validate) load whatever the optimizer state.
    check_can_resume(_info(optimizer_state=bf16), None, 1, 1, with_optimizer=False, optimizer_state=None)


def test_checkpoints_record_the_strategys_optimizer_state() -> None:
    settings = OptimizerPrecisionSettings("bf16", "bf16", store_param_remainders=False)
    strategy = MegatronCPStrategy(optimizer_precision=settings)
    assert optimizer_state_record(strategy) == {
        "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16", "store_param_remainders": False, "precision_aware": True,
    }  # fmt: skip
    assert optimizer_state_record(MegatronCPStrategy()) == DEFAULT_OPTIMIZER_PRECISION_RECORD
    module = types.SimpleNamespace(_trainer=types.SimpleNamespace(strategy=strategy, datamodule=None), optim=None)
    assert resume_records(module)["optimizer_state"] == settings.checkpoint_record()


def test_the_fp8_weight_cache_counts_only_the_layers_that_run_in_fp8() -> None:
    layout = ParallelLayout()
    every = plan_training("llama3_8b", layout, 1, 8, 1, "fp8", fp8_recipe="current")
    kept = plan_training(
        "llama3_8b", layout, 1, 8, 1, "fp8", fp8_recipe="current", bf16_first_layers=2, bf16_last_layers=2
    )
    assert kept.memory.fp8_weight_cache == every.memory.fp8_weight_cache * 28 // 32
    bf16 = plan_training("llama3_8b", layout, 1, 8, 1, "bf16")
    assert bf16.memory.fp8_weight_cache == 0
    # With pipeline stages each stage counts its own FP8 layers: the first stage holds the two BF16 ones here.
    staged = plan_training(
        "llama3_8b", ParallelLayout(pipeline_model_parallel_size=2), 2, 8, 1, "fp8", fp8_recipe="current",
        bf16_first_layers=2,
    )  # fmt: skip
    first, last = (stage.memory.fp8_weight_cache for stage in staged.stages)
    assert first == last * 14 // 16


# ---------------------------------------------------------------------------------------------- "auto", the default
def _resolved_for_a_new_run(
    monkeypatch: pytest.MonkeyPatch,
    plugin: Any = None,
    arch_impl: str = "transformer_engine",
    te_installed: bool = True,
    **strategy_kwargs: Any,
) -> MegatronCPStrategy:
    """A strategy attached to a Trainer and a tiny module, after its check of the memory settings (setup_environment
    runs it first, before any process group): ``optimizer_precision_in_use`` resolved for a new run."""
    from lightning.pytorch import Trainer

    from tests.helpers.trainers import NeverBuilt

    for module in ("strategy", "parallel.optimizer_precision"):
        monkeypatch.setattr(f"lightning_llama_fp8.{module}.transformer_engine_installed", lambda: te_installed)
    monkeypatch.setattr("lightning_llama_fp8.fp8.support.fp8_support", lambda *args, **kwargs: (True, ""))
    strategy = MegatronCPStrategy(**strategy_kwargs)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[plugin or MegatronPrecision()])
    module = NeverBuilt(get_preset("llama_tiny", transformer_impl=arch_impl))
    module.trainer = trainer
    strategy.connect(module)
    strategy._check_memory_settings(module.arch)
    return strategy


def test_auto_is_fp32_moments_and_remainders_where_the_precision_aware_optimizer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fp32 = OptimizerPrecisionSettings("fp32", "fp32", store_param_remainders=True)
    assert MegatronCPStrategy().optimizer_precision == "auto"
    for plugin in (MegatronPrecision(), TEFP8Precision()):  # BF16, and FP8 compute on bf16 weights
        strategy = _resolved_for_a_new_run(monkeypatch, plugin)
        assert strategy.optimizer_precision_in_use == fp32
        kwargs = strategy.optimizer_config_kwargs()
        assert kwargs["use_precision_aware_optimizer"] and kwargs["store_param_remainders"]
        assert kwargs["exp_avg_dtype"] == kwargs["exp_avg_sq_dtype"] == kwargs["main_params_dtype"] == torch.float32
        assert optimizer_state_record(strategy) == fp32.checkpoint_record()
    # fully_reshardable checkpoints cannot hold remainders: whole fp32 main weights.
    whole = _resolved_for_a_new_run(monkeypatch, checkpoint_optimizer_sharding="fully_reshardable")
    assert whole.optimizer_precision_in_use == OptimizerPrecisionSettings("fp32", "fp32", store_param_remainders=False)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("FP8 weights", {"plugin": TEFP8Precision(fp8_param_gather=True)}),
        ("optimizer offload", {"optimizer_offload": OptimizerOffloadSettings(0.5)}),
        ("no distributed optimizer", {"use_distributed_optimizer": False, "overlap_param_gather": False}),
        ("local layer spec", {"arch_impl": "local"}),
        ("no Transformer Engine", {"te_installed": False}),
        ("asked for Megatron's own", {"optimizer_precision": None}),
    ],
)
def test_auto_is_megatrons_default_optimizer_elsewhere(
    monkeypatch: pytest.MonkeyPatch, case: str, kwargs: dict[str, Any]
) -> None:
    strategy = _resolved_for_a_new_run(monkeypatch, **kwargs)
    assert strategy.optimizer_precision_in_use is None, case
    assert "use_precision_aware_optimizer" not in strategy.optimizer_config_kwargs() or case == "optimizer offload"
    assert optimizer_state_record(strategy) == DEFAULT_OPTIMIZER_PRECISION_RECORD


def test_a_setting_that_is_not_auto_null_or_settings_is_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer_precision must be 'auto', null or OptimizerPrecisionSettings"):
        MegatronCPStrategy(optimizer_precision="fp32")  # type: ignore[arg-type]


def test_auto_resumes_a_checkpoint_with_its_own_optimizer_state(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = OptimizerPrecisionSettings()
    strategy = _resolved_for_a_new_run(monkeypatch)
    strategy.adopt_resumed_optimizer_state("ck", bf16.checkpoint_record())
    assert strategy.optimizer_precision_in_use == bf16
    assert (
        resume_records(types.SimpleNamespace(_trainer=strategy.lightning_module.trainer, optim=None))["optimizer_state"]
        == bf16.checkpoint_record()
    )
    strategy.adopt_resumed_optimizer_state("ck", {})  # written before the record existed: Megatron's default
    assert strategy.optimizer_precision_in_use is None
    # A run that cannot keep the checkpoint's state says so, naming the checkpoint and what to do.
    fp8_weights = _resolved_for_a_new_run(monkeypatch, TEFP8Precision(fp8_param_gather=True))
    refusal = r"Checkpoint ck keeps .* as precision-aware Adam .* this run cannot: optimizer_precision: needs bf16"
    with pytest.raises(CheckpointError, match=refusal):
        fp8_weights.adopt_resumed_optimizer_state("ck", bf16.checkpoint_record())
    # Settings given explicitly stay (check_can_resume compares them with the checkpoint's).
    explicit = _resolved_for_a_new_run(monkeypatch, optimizer_precision=None)
    explicit.adopt_resumed_optimizer_state("ck", bf16.checkpoint_record())
    assert explicit.optimizer_precision_in_use is None


def test_the_plan_resolves_auto_as_a_new_run_does() -> None:
    layout = ParallelLayout()
    auto = plan_training("llama3_8b", layout, 1, 8, 1, "fp8")  # bf16 weights: fp32 moments + remainders
    assert auto.optimizer_precision == OptimizerPrecisionSettings("fp32", "fp32")
    assert auto.memory.optimizer == 10 * PARAMS_8B and auto.memory.optimizer_step == 0
    fp8_weights = plan_training("llama3_8b", layout, 1, 8, 1, "fp8", fp8_param_gather=True)
    assert fp8_weights.optimizer_precision is None and fp8_weights.memory.optimizer_step == 4 * PARAMS_8B
    local = plan_training(get_preset("llama3_8b", transformer_impl="local"), layout, 1, 8, 1, "bf16")
    assert local.optimizer_precision is None


@pytest.mark.parametrize(("given", "expected"), [((), "auto"), (("null",), None), (("auto",), "auto")])
def test_auto_and_null_through_lightning_cli(monkeypatch: pytest.MonkeyPatch, given: tuple, expected: Any) -> None:
    flag = ("--trainer.strategy.optimizer_precision", *given) if given else ()
    parsed = cpu_cli_of_example(monkeypatch, "llama3_1b_1gpu_fp8.yaml", *flag)
    assert parsed.trainer.strategy.optimizer_precision == expected


@pytest.mark.parametrize("value", ["fp32", False, "on"])
def test_a_yaml_value_that_is_not_auto_null_or_a_mapping_says_what_is_accepted(value: Any) -> None:
    from lightning_llama_fp8.cli.config_file import optimizer_precision_from_yaml

    with pytest.raises(ValueError, match=r"optimizer_precision must be 'auto', null or OptimizerPrecisionSettings"):
        optimizer_precision_from_yaml(value)


def test_a_strategy_reused_for_another_fit_resolves_auto_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed fit adopts its checkpoint's state; the next fit with the same strategy object starts from "auto"
    again (setup_environment resolves it before any checkpoint is read)."""
    strategy = _resolved_for_a_new_run(monkeypatch)
    strategy.adopt_resumed_optimizer_state("ck", {})  # a default-optimizer checkpoint
    assert strategy.optimizer_precision_in_use is None
    strategy._check_memory_settings(strategy.lightning_module.arch)  # the next fit's setup_environment
    assert strategy.optimizer_precision_in_use == OptimizerPrecisionSettings("fp32", "fp32")
