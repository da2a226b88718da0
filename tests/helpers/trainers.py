"""Lightning Trainers for the CPU tests, the strategy without Megatron's DDP, a logger that keeps what it gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy


def cpu_trainer(**kwargs: object) -> Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or summary."""
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )


class StrategyWithoutDDP(MegatronCPStrategy):
    """``MegatronCPStrategy`` for plain torch modules on the CPU.

    Megatron's DDP wrapper needs CUDA, so this strategy skips only that wrapping (the precision's optimizer-step
    context gets an empty module list); everything else it does under Lightning (parallel groups, data sharding, the
    hooks around the optimizer step, checkpoints, vetoes) runs for real.
    """

    def _wrap_megatron_modules(self) -> None:
        self._ddp_modules = []


def megatron_cpu_trainer(world_size: int, **kwargs: object) -> Trainer:
    """A quiet CPU Trainer with ``StrategyWithoutDDP`` and ``MegatronPrecision`` on ``world_size`` gloo processes."""
    from lightning_llama_fp8 import MegatronPrecision

    return cpu_trainer(devices=world_size, strategy=StrategyWithoutDDP(), plugins=[MegatronPrecision()], **kwargs)


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call as ``(step, {name: float})``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def fp8_records(self) -> dict[int | None, dict[str, float]]:
        """The ``fp8/`` metrics (FP8StatsMonitor's) of each step; a step logged twice fails the test."""
        out: dict[int | None, dict[str, float]] = {}
        for step, metrics in self.records:
            fp8 = {k: v for k, v in metrics.items() if k.startswith("fp8/")}
            if fp8:
                assert step not in out, f"step {step} logged twice"
                out[step] = fp8
        return out


class NeverBuilt(LlamaLightningModule):
    """Fails the test if Lightning gets as far as building the model."""

    def configure_model(self) -> None:
        raise AssertionError("configure_model ran: the error came too late")


def fit_never_built(plugin: object, arch: Any = None, **strategy_kwargs: Any) -> None:
    """``Trainer.fit`` of a tiny model on one CPU process that must fail before the model is built."""
    from lightning_llama_fp8 import MockDataModule, get_preset

    module = NeverBuilt(arch or get_preset("llama_tiny", transformer_impl="local"))
    data = MockDataModule(seq_length=256, vocab_size=1024, global_batch_size=4, micro_batch_size=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronCPStrategy(**strategy_kwargs),
        plugins=[plugin],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)


def quiet_trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    """A single-process CPU Trainer writing under ``tmp_path``, without logger or summary but with its progress bar."""
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu", devices=1, logger=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs
    )


def cpu_cli_of_example(monkeypatch: Any, example: str, *overrides: str) -> Any:
    """``llama-fp8 fit --config examples/configs/<example>`` as LightningCLI parses it (nothing run, no pre-flight), on
    the CPU in BF16, with ``overrides`` (``--flag value`` pairs) after the config."""
    import lightning_llama_fp8.cli.fit as cli
    from tests.helpers.paths import REPO_ROOT

    monkeypatch.setattr(cli, "preflight", lambda config, **kwargs: None)
    return cli.LlamaCLI(
        LlamaLightningModule,
        cli.GPTDataModule,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config",
            str(REPO_ROOT / "examples" / "configs" / example),
            "--trainer.accelerator",
            "cpu",
            "--trainer.plugins",
            "lightning_llama_fp8.MegatronPrecision",
            *overrides,
        ],
        save_config_kwargs={"overwrite": True},
    )
