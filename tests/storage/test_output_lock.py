"""One writer per output: a second writer is refused at once naming the first; a dead holder blocks no one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_llama_fp8.storage.output_lock import OutputBusyError, OutputLock, lock_path, output_lock


def test_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out", "llama-fp8 convert"):
        assert lock_path(tmp_path / "out").exists()
        with pytest.raises(OutputBusyError, match=r"being written by another process \(llama-fp8 convert, process"):
            OutputLock(tmp_path / "out", "llama-fp8 convert").acquire()
    assert not lock_path(tmp_path / "out").exists()
    with output_lock(tmp_path / "out", "again"):  # free again once released
        pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from lightning_llama_fp8.storage.output_lock import OutputLock\n"
        f"OutputLock({str(tmp_path / 'out')!r}, 'killed').acquire()\n"
        "os._exit(9)\n"  # dies holding it, without releasing: the file stays, the OS drops the lock
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    assert lock_path(tmp_path / "out").exists()
    with output_lock(tmp_path / "out", "next run"):
        pass


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from lightning_llama_fp8.storage.output_lock import OutputLock\n"
        f"OutputLock({str(tmp_path / 'out')!r}, 'llama-fp8 preprocess').acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=rf"llama-fp8 preprocess, process {holder.pid}"):
            OutputLock(tmp_path / "out", "second").acquire()
    finally:
        holder.communicate("\n", timeout=30)
