"""Fixtures shared by test files of several folders; each builds its data once per test session."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_llama_fp8.hf.files import INDEX_FILE
from tests.helpers import run_distributed
from tests.helpers.checkpoints import save_worker
from tests.helpers.corpora import write_corpus
from tests.helpers.gpus import Machine, te_support_checks
from tests.helpers.hf_models import LLAMA31_ROPE, import_and_save_worker, make_hf_model


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves the process environment as it found it. In-process fits set Lightning's launcher variables
    (LOCAL_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT) and the strategy's own; a later test's subprocess that
    inherited them took itself for one rank of a launched job (seen: a two-rank preemption run waiting forever for
    the rank its launcher never started, and "[rank: 0]" prefixes on a command's console)."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of the tiny Llama saved by two gloo ranks at TP2, and the full weights it holds."""
    root = tmp_path_factory.mktemp("tp2")
    path = root / "step=7.ckpt"
    weights = run_distributed(save_worker, 2, root / "workers", str(path), 2)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)  # both ranks gathered the same model
    return path, weights[0]


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's weights saved by MegatronCPStrategy on one process (megatron-core's real torch_dist writer)."""
    root = tmp_path_factory.mktemp("llama")
    run_distributed(save_worker, 1, root / "workers", str(root / "step=7.ckpt"), 1)
    return root / "step=7.ckpt"


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two random Megatron corpora of 60 documents: token ids 0..99 (``low``) and 500..599 (``high``)."""
    root = tmp_path_factory.mktemp("corpora")
    low = write_corpus(root / "low", 60, 0, 100, seed=1)  # token ids 0..99
    write_corpus(root / "high", 60, 500, 600, seed=2)  # token ids 500..599
    return {"root": root, "low": str(root / "low"), "high": str(root / "high"), "low_docs": low}


@pytest.fixture(scope="session", params=["untied-gqa-rope-tp2", "tied-tp2"])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Hugging Face model imported by two gloo ranks at TP2 and saved as a training checkpoint."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    if request.param.startswith("untied"):
        state = make_hf_model(hf_dir, groups=4, rope_scaling=LLAMA31_ROPE, vocab=1000, max_shard_size="100KB")
    else:
        state = make_hf_model(hf_dir, groups=2, tie=True, vocab=1000)
    ckpt_dir = root / "step=3.ckpt"
    ranks = run_distributed(import_and_save_worker, 2, root / "workers", str(hf_dir), str(ckpt_dir), 2)
    return {"hf_dir": hf_dir, "state": state, "ckpt": ckpt_dir, "ranks": ranks}


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Hugging Face Llama in several safetensors shards (tests copy it before changing it)."""
    directory = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(directory, groups=2, max_shard_size="100KB")
    assert (directory / INDEX_FILE).is_file()
    return directory


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> Callable[[Machine], None]:
    """Install a fake GPU (torch.cuda) and a fake Transformer Engine with its support checks."""

    def install(machine: Machine) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: machine.name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: machine.capability)
        te = types.ModuleType("transformer_engine")
        pytorch = types.ModuleType("transformer_engine.pytorch")
        te.__version__ = machine.te_version  # type: ignore[attr-defined]
        te.pytorch = pytorch  # type: ignore[attr-defined]
        for name, check in te_support_checks(machine).items():
            if name not in machine.missing_checks:
                setattr(pytorch, name, check)
        monkeypatch.setitem(sys.modules, "transformer_engine", te)
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)

    return install
