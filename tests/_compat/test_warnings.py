"""The dependency warnings the package filters (_compat/warnings.py): each one is real (the installed dependency
raises it) and filtered exactly, nothing else; and what a user sees of them on the command line.

The command-line checks run ``llama-fp8`` in real subprocesses, so the import-time warnings of megatron-core and
Transformer Engine happen for real."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llama_fp8._compat.warnings import MANUAL_OPTIMIZATION_CHECKPOINT_WARNING
from tests.helpers import REPO_ROOT
from tests.helpers.gpus import no_gpu
from tests.helpers.models import Regression
from tests.helpers.trainers import quiet_trainer


def llama_fp8(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("llama-fp8")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_llama_fp8.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


DEPENDENCY_NOISE = re.compile(r"Warning|warnings\.warn|No CUDA runtime is found")


CONFIG_1B = REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml"


@pytest.mark.multiprocess
@pytest.mark.parametrize("args", [["plan", "--help"], ["fit", "--help"], ["validate", "--help"], ["--help"]])
def test_help_prints_no_dependency_warnings(args: list[str]) -> None:
    result = llama_fp8(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "usage:" in result.stdout


@pytest.mark.multiprocess
@no_gpu
def test_a_cpu_fit_prints_the_plan_and_its_reason_only() -> None:
    result = llama_fp8("fit", "--config", str(CONFIG_1B))
    assert result.returncode == 2
    assert not DEPENDENCY_NOISE.search(result.stderr), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0] == "Seed set to 1234"  # Lightning's seed_everything, from the config
    assert lines[1].startswith("Not training: no CUDA GPU is visible")
    assert "parameters" in result.stdout.lower()  # the plan


def test_the_checkpoint_warning_for_manual_optimization_is_real_and_filtered_exactly(tmp_path: Path) -> None:
    """Lightning warns on the first save of a manual-optimization module; the filter drops that message only."""

    def fit_and_collect(filtered: bool) -> list[str]:
        saver = ModelCheckpoint(dirpath=tmp_path / f"ckpts{filtered}", every_n_train_steps=1)
        trainer = quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[saver])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if filtered:
                from lightning_llama_fp8._compat.warnings import filter_manual_optimization_checkpoint_warning

                filter_manual_optimization_checkpoint_warning()
            trainer.fit(Regression(manual=True))
            warnings.warn("another Lightning warning", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    unfiltered = fit_and_collect(filtered=False)
    assert any(re.match(MANUAL_OPTIMIZATION_CHECKPOINT_WARNING, m) for m in unfiltered)
    filtered = fit_and_collect(filtered=True)
    assert not any(re.match(MANUAL_OPTIMIZATION_CHECKPOINT_WARNING, m) for m in filtered)
    assert "another Lightning warning" in filtered


OWN_WARNING = "a warning of lightning_llama_fp8 itself"


def shown_warnings(emit: Any) -> list[str]:
    """Messages of the warnings ``emit()`` raises that still show with the dependency filters installed.

    Every warning is shown ("always"), except what the filters drop: they are installed in front of that rule, as
    ``import lightning_llama_fp8`` installs them in front of the default ones. This package's own warning is raised
    after ``emit()`` and has to show.
    """
    from lightning_llama_fp8._compat.warnings import filter_dependency_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_dependency_warnings()
        emit()
        warnings.warn(OWN_WARNING, UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def warn_from(module: str, message: str, category: type[Warning]) -> None:
    """Raise ``message`` as if ``module`` had raised it (filters match the module of the warning's frame)."""
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


BARRIER_WARNING = (
    "barrier(): using the device under current context. "
    "You can specify `device_id` in `init_process_group` to mute this warning."
)


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group (torch.distributed.barrier needs one), destroyed afterwards if made here."""
    import torch.distributed as dist

    from tests.helpers import free_port

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if made:
        dist.destroy_process_group()


def test_torchs_barrier_device_warning_is_real_and_filtered_exactly(
    process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist
    import torch.distributed.c10d_logger
    import torch.distributed.distributed_c10d as c10d

    # barrier() as on a GPU node with a group not bound to a device: it warns, then (no GPU here) fails.
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(c10d, "_get_object_coll_device", lambda group=None: "cuda")
    c10d_logger = torch.distributed.c10d_logger.__name__  # barrier() is wrapped by its exception logger

    def barrier() -> None:
        with pytest.raises(RuntimeError):
            dist.barrier()
        warn_from(c10d_logger, "another c10d warning", UserWarning)
        warn_from("lightning_llama_fp8.strategy", BARRIER_WARNING, UserWarning)  # same text, this package's module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        barrier()
    assert [str(w.message) for w in caught] == [BARRIER_WARNING, "another c10d warning", BARRIER_WARNING]
    assert Path(caught[0].filename).name == "c10d_logger.py"  # as in the GPU run's stderr
    assert shown_warnings(barrier) == ["another c10d warning", BARRIER_WARNING, OWN_WARNING]


def test_the_model_summarys_precision_warning_is_real_and_filtered_exactly() -> None:
    from lightning.pytorch.utilities.model_summary import summarize

    from lightning_llama_fp8 import TEFP8Precision

    def summarize_an_fp8_module() -> None:
        trainer = Trainer(
            accelerator="cpu", plugins=[TEFP8Precision()], logger=False, enable_checkpointing=False, barebones=True
        )
        module = Regression()
        module.trainer = trainer
        summarize(module)
        warn_from("lightning.pytorch.utilities.model_summary.model_summary", "another summary warning", UserWarning)

    unfiltered: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summarize_an_fp8_module()
        unfiltered = [str(w.message) for w in caught]
    assert any(
        m.startswith("Precision transformer-engine-fp8 is not supported by the model summary") for m in unfiltered
    )
    assert shown_warnings(summarize_an_fp8_module) == ["another summary warning", OWN_WARNING]


def test_lightnings_pytree_deprecation_is_real_and_filtered_exactly() -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    def flatten() -> None:
        _tree_flatten([1, {"a": torch.zeros(1)}])
        warn_from("lightning.pytorch.utilities._pytree", "another pytree warning", FutureWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flatten()
    assert any("`isinstance(treespec, LeafSpec)` is deprecated" in str(w.message) for w in caught)
    assert shown_warnings(flatten) == ["another pytree warning", OWN_WARNING]


def logged(logger_name: str, emit: Any, filtered: bool = True) -> list[str]:
    """Messages ``emit(logger)`` logs on ``logger_name`` that pass that logger: with the dependency filters installed,
    or (``filtered=False``) with this package's filters taken off that logger for the call."""
    import logging

    from lightning_llama_fp8._compat.warnings import _DropMessage, filter_dependency_warnings

    filter_dependency_warnings()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    ours = [] if filtered else [f for f in logger.filters if isinstance(f, _DropMessage)]
    handler, level = Keep(), logger.level
    for f in ours:
        logger.removeFilter(f)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for f in ours:
            logger.addFilter(f)
    return records


def source_text(module: Any) -> str:
    """A module's source with adjacent string literals joined, to find a message split over several lines."""
    return re.sub(r'"\s+"', "", Path(module.__file__).read_text())


GPT_DEPRECATION = (
    "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes, no new features. Please reference the "
    "migration guide `docs/user-guide/hybrid-model-migration.md` for details on how to use `HybridModel`"
)


DDP_LAYOUT = (
    "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True. Auto-computing "
    "layout inside DDP. Callers should pre-compute layouts via DistributedOptimizer.compute_full_param_layout() and "
    "pass them in."
)


@pytest.mark.parametrize(
    "module,message",
    [
        ("megatron.core.models.gpt.gpt_model", GPT_DEPRECATION),
        ("megatron.core.distributed.distributed_data_parallel", DDP_LAYOUT),
    ],
)
def test_megatrons_log_records_are_filtered_exactly(module: str, message: str) -> None:
    import importlib
    import logging

    from megatron.core.utils import log_single_rank

    source = importlib.import_module(module)
    assert source.logger.name == module  # the logger the message is logged on
    assert message in source_text(source)  # the exact message of the installed megatron-core

    def emit(logger: logging.Logger) -> None:
        log_single_rank(logger, logging.WARNING, message)  # as megatron-core logs it
        log_single_rank(logger, logging.WARNING, "another Megatron message")

    assert logged(module, emit, filtered=False) == [message, "another Megatron message"]
    assert logged(module, emit) == ["another Megatron message"]


LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


def test_lightnings_tensor_core_advice_is_real_and_filtered_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from lightning.fabric.accelerators import cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "_is_ampere_or_later", lambda device=None: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    def emit(logger: logging.Logger) -> None:
        cuda._check_cuda_matmul_precision.__wrapped__(torch.device("cuda", 0))  # the real message, uncached
        rank_zero_info(LITLOGGER_TIP)  # kept on purpose: a logger a user may choose to install

    unfiltered = logged("lightning.pytorch.utilities.rank_zero", emit, filtered=False)
    assert unfiltered[0].startswith("You are using a CUDA device ('NVIDIA H200') that has Tensor Cores.")
    assert logged("lightning.pytorch.utilities.rank_zero", emit) == [LITLOGGER_TIP]


def test_megatrons_stale_te_cross_entropy_warning_is_real_and_filtered_exactly() -> None:
    # The TE layer spec's default cross entropy is TE's; megatron-core warns about a bug later TE versions fixed, on
    # every TransformerConfig. LlamaConfig refuses older TE versions itself (tests/test_config.py).
    from lightning_llama_fp8.config import get_preset

    def build_config() -> None:
        get_preset("llama_tiny", apply_rope_fusion=False).transformer_config()
        warn_from("megatron.core.transformer.transformer_config", "another config warning", UserWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_config()
    assert any(
        "Transformer Engine cross entropy loss fusion has known stability issues" in str(w.message) for w in caught
    )
    assert shown_warnings(build_config) == ["another config warning", OWN_WARNING]


def test_torchs_messages_about_megatron_cores_reads_are_hidden_only_while_it_reads() -> None:
    """Each message is real (tests/checkpoint/test_hooks.py loads a checkpoint with and sees none); hidden inside
    ``megatron_checkpoint_read_warnings_filtered`` only, so the same message about anyone else's call still shows."""
    from lightning_llama_fp8._compat.warnings import (
        MEGATRON_CHECKPOINT_READ_WARNINGS,
        megatron_checkpoint_read_warnings_filtered,
    )

    messages = {  # module: (message, category), as torch 2.11 raises them during megatron-core's load
        "torch.distributed.checkpoint.utils": (
            "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
            "process.",
            UserWarning,
        ),
        "torch.distributed.checkpoint.logger": (
            "The argument order of load has been changed. Please check the document to avoid future breakages.",
            UserWarning,
        ),
        "torch.distributed.checkpoint.default_planner": (
            "Please use DTensor instead and we are deprecating ShardedTensor.",
            FutureWarning,
        ),
    }
    assert len(MEGATRON_CHECKPOINT_READ_WARNINGS) == len(messages)

    def emit() -> None:
        for module, (message, category) in messages.items():
            warn_from(module, message, category)

    def emit_while_reading() -> None:
        with megatron_checkpoint_read_warnings_filtered():
            emit()

    assert shown_warnings(emit_while_reading) == [OWN_WARNING]
    assert shown_warnings(emit) == [*(message for message, _ in messages.values()), OWN_WARNING]


def test_the_checkpoint_directory_warning_is_hidden_only_for_the_resumed_runs_own_directory(tmp_path: Path) -> None:
    from lightning_llama_fp8._compat.warnings import own_checkpoint_directories_warning_filtered

    def fit_and_collect(directory: Path, own: list[str]) -> list[str]:
        directory.mkdir(exist_ok=True)
        (directory / "epoch=0-step=1.ckpt").write_text("")
        saver = ModelCheckpoint(dirpath=directory, every_n_train_steps=1)
        trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[saver])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with own_checkpoint_directories_warning_filtered(own):
                trainer.fit(Regression())
        return [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]

    own, other = Path(os.path.realpath(tmp_path / "own")), Path(os.path.realpath(tmp_path / "other"))
    assert fit_and_collect(own, [str(own)]) == []
    assert fit_and_collect(other, [str(own)]) == [f"Checkpoint directory {other} exists and is not empty."]
    assert fit_and_collect(own, []) == [f"Checkpoint directory {own} exists and is not empty."]  # a fresh run


def test_megatrons_rank_fallback_warning_before_distributed_is_real_and_filtered_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The corpus check of `llama-fp8 fit` opens Megatron's IndexedDataset before torch.distributed starts; megatron-core
    # asks for the rank before each of its INFO lines (seen in a GPU fit's stderr, 2026-12-07).
    import torch.distributed as dist

    from lightning_llama_fp8.data.indexed import check_corpus
    from tests.helpers.corpora import write_corpus

    assert not dist.is_initialized()
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    write_corpus(tmp_path / "corpus", documents=3, low=0, high=100)

    def check() -> None:
        check_corpus(str(tmp_path / "corpus"))
        warn_from("megatron.core._rank_utils", "another rank warning", UserWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check()
    assert any(str(w.message).startswith("Could not determine rank from torch.distributed") for w in caught)
    assert shown_warnings(check) == ["another rank warning", OWN_WARNING]
