"""Saving from a plain training script without ``if __name__ == "__main__":``: the checkpoint writer's processes
(checkpoint/save_workers.py) must not run the script's top level again.

The scripts run in real subprocesses and save a distributed checkpoint through ``MegatronCPStrategy`` on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.multiprocess  # every test runs a training script in a subprocess

UNGUARDED_SCRIPT = """
    # A plain training script WITHOUT `if __name__ == "__main__":`.
    import os
    import sys
    from pathlib import Path

    import torch
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llama_fp8 import MockDataModule
    from tests.helpers import allow_dist_checkpointing_on_cpu, megatron_cpu_trainer

    print(f"top level runs in {__name__} pid {os.getpid()}", flush=True)
    allow_dist_checkpointing_on_cpu()


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch, batch_idx):
            return ((self.weight - 1.0) ** 2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    data = MockDataModule(seq_length=16, vocab_size=100, global_batch_size=2, micro_batch_size=1, num_workers=0)
    saver = ModelCheckpoint(dirpath=Path(sys.argv[1]), every_n_train_steps=2, save_top_k=-1)
    trainer = megatron_cpu_trainer(1, max_steps=4, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(Tiny(), datamodule=data)
    print("saved", sorted(p.name for p in Path(sys.argv[1]).iterdir()), flush=True)
"""


# Megatron's own default, for contrast: its writer's results queue through a `spawn`-started manager.
UNGUARDED_MEGATRON_DEFAULT = """
    import os
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    print(f"top level runs in {__name__} pid {os.getpid()}", flush=True)
    filesystem_async.get_write_results_queue()  # mp_mode="spawn", as its writer calls it on the first save
    print("queue made", flush=True)
"""


def run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train_unguarded.py"
    script.write_text(textwrap.dedent(source))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpts")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_unguarded_script_saves_checkpoints_and_runs_once(tmp_path: Path) -> None:
    result = run_script(tmp_path, UNGUARDED_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top level runs in") == 1, result.stdout
    assert "saved ['epoch=0-step=2.ckpt', 'epoch=0-step=4.ckpt']" in result.stdout
    from lightning_llama_fp8 import read_checkpoint_info

    assert read_checkpoint_info(tmp_path / "ckpts" / "epoch=0-step=4.ckpt").global_step == 4


def test_megatrons_default_writer_queue_would_run_an_unguarded_script_again(tmp_path: Path) -> None:
    """Why the strategy prepares the queue itself: Megatron's spawn start method re-runs the script's top level."""
    result = run_script(tmp_path, UNGUARDED_MEGATRON_DEFAULT)
    assert result.stdout.count("top level runs in") == 2, result.stdout  # __main__, then __mp_main__
    assert "top level runs in __mp_main__" in result.stdout
    assert result.returncode != 0 and "queue made" not in result.stdout
