"""One writer per output at a time: ``<output>.lock`` held with an advisory lock for as long as a command writes.

The operating system drops the lock when its process ends however it ends, so a killed run never leaves a lock
that blocks the next one; the file also says who holds it (process, host, command, start time) for the error
the second writer gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

LOCK_SUFFIX = ".lock"


class OutputBusyError(FileExistsError):
    """Another process is writing the same output."""


def lock_path(output: str | os.PathLike[str]) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


class OutputLock:
    """Hold ``<output>.lock`` from :meth:`acquire` to :meth:`release` (or for a ``with`` block).

    :meth:`acquire` raises :class:`OutputBusyError` at once if another process holds it; ``command`` (e.g.
    ``"llama-fp8 preprocess"``) is recorded for that process's error message.
    """

    def __init__(self, output: str | os.PathLike[str], command: str) -> None:
        self.output, self.command, self.path = Path(output), command, lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self._fd = _acquire(self.path, self.output, self.command)
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so nobody locks the old file after it is gone
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def output_lock(output: str | os.PathLike[str], command: str) -> OutputLock:
    """``with output_lock(output, command):`` holds ``<output>.lock`` for the block (see :class:`OutputLock`)."""
    return OutputLock(output, command)


def _acquire(path: Path, output: str | os.PathLike[str], command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"{output} is being written by another process ({holder}); wait for it to finish or choose "
                f"another output. (The lock {path} is released when that process ends.)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder before us removed this file on release: lock the one now at that path
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (
            f"{record.get('command', 'a command')}, process {record.get('pid')} on {record.get('host')}, "
            f"started {record.get('started')}"
        )
    except (OSError, ValueError):
        return "a process that has not yet said who it is"
