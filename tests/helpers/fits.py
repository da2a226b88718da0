"""``Trainer.fit`` of ``Recorder`` with ``ModelCheckpoint`` through ``MegatronCPStrategy`` (no Megatron DDP) in a gloo
process: what the steps saw, which hooks ran, the step reached and the error, for the checks that a fit is refused
before anything is built and that a resumed run goes on with the right samples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.helpers.distributed import run_distributed

SEQ, VOCAB, GBS = 64, 1000, 4


def recorded_fit(root: str, ckpt_path: str | None = None, **options: Any) -> dict[str, Any]:
    """One ``trainer.fit`` of a recording module on MegatronCPStrategy (without Megatron DDP: CPU) in this process.

    Returns the samples each step saw (one hash per sample), the module hooks that ran, the global step reached and
    the exception raised (None if the fit finished).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llama_fp8 import IndexedDataModule
    from tests.helpers.distributed import allow_dist_checkpointing_on_cpu
    from tests.helpers.models import Recorder, mock_data
    from tests.helpers.trainers import megatron_cpu_trainer

    allow_dist_checkpointing_on_cpu()

    gbs = options.pop("gbs", GBS)
    if "corpus" in options:
        data = IndexedDataModule(
            [options.pop("corpus")], split="100,0,0", val_samples=0, seq_length=SEQ, vocab_size=VOCAB,
            global_batch_size=gbs, micro_batch_size=1, num_workers=0,
        )  # fmt: skip
    else:
        data = mock_data(SEQ, gbs, VOCAB)
    module = options.pop("module", None) or Recorder(SEQ)
    saver = ModelCheckpoint(
        dirpath=options.pop("dirpath", Path(root, "ckpts")),
        every_n_train_steps=options.pop("every", 2),
        save_top_k=options.pop("save_top_k", -1),
        save_last=options.pop("save_last", None),
    )
    callbacks = [saver, *options.pop("callbacks", [])]
    weights_only = options.pop("weights_only", None)
    options.setdefault("limit_val_batches", 0)
    trainer = megatron_cpu_trainer(1, enable_checkpointing=True, callbacks=callbacks, **options)
    error: BaseException | None = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=weights_only)
    except Exception as err:
        error = err
    return {
        "seen": getattr(module, "seen", []),
        "hooks": getattr(module, "hooks", []),
        "step": trainer.global_step,
        "error": error,
        "data_built": data.train_dataset is not None,
    }


def fits_in_process(rank: int, world_size: int, runs: list[tuple[str | None, dict[str, Any]]], root: str) -> list[Any]:
    out = []
    for ckpt_path, options in runs:
        result = recorded_fit(root, ckpt_path, **dict(options))
        result["error"] = None if result["error"] is None else (type(result["error"]).__name__, str(result["error"]))
        out.append(result)
    return out


def run_fits(tmp_path: Path, *runs: tuple[str | None, dict[str, Any]]) -> list[dict[str, Any]]:
    """The fits, one after another, in one spawned gloo process (the strategy starts torch.distributed)."""
    (results,) = run_distributed(fits_in_process, 1, tmp_path / "workers", list(runs), str(tmp_path))
    return results


def assert_refused_before_building(result: dict[str, Any], error_type: str, pattern: str) -> None:
    assert result["error"] is not None, "the fit was not refused"
    assert result["error"][0] == error_type, result["error"]
    assert re.search(pattern, result["error"][1]), result["error"][1]
    assert result["seen"] == [] and "configure_model" not in result["hooks"]
