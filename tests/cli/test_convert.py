"""``llama-fp8 convert`` (cli/convert.py): a training checkpoint to a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_llama_fp8.hf.files import INDEX_FILE


@pytest.mark.multiprocess
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


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf", "five"])
def test_convert_refuses_a_shard_size_that_is_not_a_positive_number(
    size: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 or -1 used to write one shard per tensor, nan to end in a traceback; refused before the checkpoint is read."""
    from lightning_llama_fp8.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["convert", str(tmp_path / "no-checkpoint"), str(tmp_path / "out"), "--max-shard-size-gb", size])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --max-shard-size-gb: the value must be a finite number > 0; got '{size}'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_convert_refuses_a_checkpoint_record_of_1e9_layers(
    imported: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record edited to 1e9 layers is compared with the stored tensors' shapes before anything is sized from it."""
    import json
    import shutil
    import time

    from lightning_llama_fp8.checkpoint.info import INFO_FILENAME
    from lightning_llama_fp8.cli import main

    copy = tmp_path / "copy.ckpt"
    shutil.copytree(imported["ckpt"], copy)
    info = json.loads((copy / INFO_FILENAME).read_text())
    info["arch"]["num_layers"] = 10**9
    (copy / INFO_FILENAME).write_text(json.dumps(info))
    started = time.perf_counter()
    assert main(["convert", str(copy), str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 30
    assert "1000000000" in capsys.readouterr().err.replace(",", "")
    assert not (tmp_path / "out").exists()


def test_convert_given_a_run_folder_names_its_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_llama_fp8.cli import main
    from tests.helpers.checkpoints import fake_resumable_checkpoint

    fake_resumable_checkpoint(tmp_path)  # tmp_path/step=8.ckpt
    assert main(["convert", str(tmp_path), str(tmp_path.parent / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"llama-fp8 convert: {tmp_path} is a folder of checkpoints, not a checkpoint: give one of: step=8.ckpt" in err
    )
    assert not (tmp_path.parent / "out").exists()


def test_convert_over_a_run_folder_is_refused_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: "Nothing convert writes destroys what exists"; --overwrite once deleted any output directory."""
    from lightning_llama_fp8.cli import main
    from tests.helpers.checkpoints import fake_resumable_checkpoint

    (tmp_path / "source").mkdir()
    (tmp_path / "run").mkdir()
    source, other = fake_resumable_checkpoint(tmp_path / "source"), fake_resumable_checkpoint(tmp_path / "run")
    assert main(["convert", str(source), str(tmp_path / "run"), "--overwrite"]) == 2
    assert "holds training checkpoints (step=8.ckpt); it is not replaced, even with --overwrite" in (
        capsys.readouterr().err
    )
    assert (other / "lightning_llama_fp8.json").is_file()
