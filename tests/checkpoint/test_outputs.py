"""Where a run writes (output_locations) and whether a directory can be written there."""

from __future__ import annotations

from pathlib import Path


def test_output_locations_cover_loggers_and_te_debug_output(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from lightning_llama_fp8.callbacks import FP8StatsMonitor, NaNGuard
    from lightning_llama_fp8.checkpoint.outputs import output_locations, unwritable_reason

    monitor = FP8StatsMonitor.__new__(FP8StatsMonitor)  # only its settings are read; nothing of TE is set up
    monitor.te_debug_stats = ["underflows%"]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[NaNGuard(), monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    found = {(location.what, location.every_rank) for location in output_locations(trainer)}
    assert found == {
        ("NaNGuard report_dir", False),
        ("FP8StatsMonitor TE debug output", True),
        ("CSVLogger directory", False),
    }
    assert unwritable_reason(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    assert not list((tmp_path / "new" / "dir").iterdir())  # the probe file is gone
