"""GPU stages: the record each stage of ``benchmarks/stages.py`` is, and the session that runs one.

A stage is a named piece of GPU evidence sized to one device call: the commands it runs (from the repository root,
with ``src`` and the root on ``PYTHONPATH``), the time it may take, the environment knobs it reads and the files it
leaves in its output directory. ``StageSession`` runs a stage's steps in order, each within the time the stage has
left; like the shell script it replaces, it goes on after a failed step, and it exits non-zero when any step failed.
With ``dry_run`` it prints each command instead of running it.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: Exit status of a command stopped at its time limit (that of GNU ``timeout``, which the shell script used).
TIMED_OUT = 124
#: Seconds a command stopped at its time limit gets between SIGTERM and SIGKILL (time to flush its logs).
KILL_GRACE_S = 10
#: Common to every stage: the device the stage ran on and the commit it ran (files in the output directory).
COMMON_OUTPUTS = ("device.txt", "commit.txt")

_FIELD = re.compile(r"\{(\w+)\}")
_WORDS_FIELD = re.compile(r"\{\*(\w+)\}")


class StageUsageError(Exception):
    """The stage cannot run with these settings (a knob it needs is unset, arguments it does not take)."""


@dataclass(frozen=True)
class Command:
    """One command line of a stage, written as a shell splits it into words (no pipes, no redirections).

    In a word, ``{out}`` is the stage's output directory and ``{NAME}`` the value of the stage's knob ``NAME``; a
    word that is only ``{*NAME}`` becomes the knob's value split into words (an unquoted ``$NAME`` in a shell).
    """

    line: str
    #: File (a template, like the words) that gets the command's stdout and stderr.
    log: str | None = None
    #: With ``log``: the output also goes to the console as it comes (``2>&1 | tee LOG``).
    tee: bool = False
    #: Print the output's last lines once the command ended (``> LOG 2>&1; tail -N LOG``, or ``2>&1 | tail -N``).
    tail: int = 0
    #: Environment variables for this command only (values are templates).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Run only when every earlier step of the stage succeeded (the shell's ``&&``).
    after_success: bool = False


#: A step: a command line, or a function that runs its commands through the session (loops, summaries).
Step = Command | Callable[["StageSession"], None]


@dataclass(frozen=True)
class Stage:
    """One GPU stage: what it is for, what it needs, what it runs and what it leaves in its output directory."""

    name: str
    #: GPUs the stage needs on one machine.
    gpus: int
    #: One line: what the stage shows, with its issue number.
    purpose: str
    #: Seconds the whole stage may take; a command still running then is stopped (the device allows 600 per call).
    limit_s: int
    steps: tuple[Step, ...]
    #: Files and folders under the output directory (templates like a command's words), besides COMMON_OUTPUTS.
    outputs: tuple[str, ...]
    #: Environment variables the stage reads, with their defaults ("" for none): the stage's settings.
    knobs: Mapping[str, str] = field(default_factory=dict)
    #: How to use it: what a knob changes, the command to run afterwards, how long it took where measured.
    notes: str = ""
    #: Whether extra command-line arguments after OUT_DIR are passed on to the stage.
    takes_args: bool = False


class StageSession:
    """Runs one stage into ``out``: the common preparation, then each step within the stage's time limit."""

    def __init__(
        self,
        stage: Stage,
        out: Path,
        *,
        dry_run: bool = False,
        args: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stage = stage
        self.out = out
        self.dry_run = dry_run
        self.args = tuple(args)
        self.started = time.monotonic()
        root = Path.cwd()  # commands name repository paths relative to it, as the shell script did with $PWD
        env = dict(os.environ if environ is None else environ)
        inherited = env.get("PYTHONPATH")
        env.update(
            PYTHONPATH=f"{root}/src:{root}" + (f":{inherited}" if inherited else ""),
            PYTHONUNBUFFERED="1",
            GPU_RESULTS_DIR=str(out),
        )
        self.env = env
        #: Every command run (or, in a dry run, printed), as its words.
        self.commands: list[list[str]] = []
        self.failures: list[str] = []

    # ------------------------------------------------------------------------------------------ the whole stage
    def run_stage(self) -> int:
        """Prepare the output directory, run every step, report; the exit status (0: every step succeeded)."""
        if self.args and not self.stage.takes_args:
            raise StageUsageError(f"takes no arguments after OUT_DIR (got {shlex.join(self.args)})")
        if self.dry_run:
            self._describe_stage()
        self._prepare()
        for step in self.stage.steps:
            if isinstance(step, Command):
                if step.after_success and self.failures:
                    self._fail(f"not run, an earlier step failed: {step.line}")
                    continue
                self.run(
                    self.words(step.line),
                    log=None if step.log is None else Path(self.fill(step.log)),
                    tee=step.tee,
                    tail=step.tail,
                    env={name: self.fill(value) for name, value in step.env.items()},
                )
            else:
                try:
                    step(self)
                except StageUsageError:
                    raise
                except Exception:  # a stage's own code failed: report it as a failed step, like a command
                    traceback.print_exc()
                    self._fail(f"{_function_name(step)} raised (traceback above)")
        return self._report()

    def _prepare(self) -> None:
        """What every stage starts with: its output directory, the device it runs on, the commit it runs."""
        if self.dry_run:
            settings = ("PYTHONPATH", "PYTHONUNBUFFERED", "GPU_RESULTS_DIR")
            print("environment: " + " ".join(f"{name}={shlex.quote(self.env[name])}" for name in settings))
        self.mkdir(self.out)
        device = self.out / "device.txt"
        self.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], stdout=device, check=False
        )
        if not self.dry_run and device.is_file() and (cards := device.read_text().splitlines()[1:]):
            print("device: " + "; ".join(cards), flush=True)
        # The device tool copies the working tree, whose .git may lag behind it: STAGE_COMMIT=<hash> records the
        # commit that really ran (plus "dirty" when the tree had changes); else the copy's HEAD, marked as such.
        commit = self.env.get("STAGE_COMMIT")
        if not commit:
            head = self.capture(["git", "rev-parse", "HEAD"], hide_errors=True, placeholder="<git rev-parse HEAD>")
            commit = f"{head.strip()} (HEAD of the copy; may lag the working tree)"
        self.write_text(self.out / "commit.txt", commit + "\n")

    def _describe_stage(self) -> None:
        stage = self.stage
        print(f"stage {stage.name}: {stage.purpose}")
        print(f"GPUs: {stage.gpus}; time limit: {stage.limit_s} s")
        for name, default in stage.knobs.items():
            print(f"knob {name} (default {default!r}): {self.knob(name)!r}")
        outputs = [*COMMON_OUTPUTS, *stage.outputs]
        print("outputs: " + ", ".join(str(self.out / self.fill(path)) for path in outputs))
        if stage.notes:
            print("notes: " + stage.notes)
        print("dry run: the commands, in order, none of them run")

    def _report(self) -> int:
        if self.dry_run:
            return 0
        elapsed = self.elapsed_s()
        if self.failures:
            print(f"stage {self.stage.name}: {len(self.failures)} step(s) failed in {elapsed:.0f} s:", file=sys.stderr)
            for failure in self.failures:
                print(f"  {failure}", file=sys.stderr)
            return 1
        print(f"stage {self.stage.name}: every step succeeded in {elapsed:.0f} s", flush=True)
        return 0

    # ------------------------------------------------------------------------------------------ settings
    def knob(self, name: str) -> str:
        """The stage's setting ``name``: the environment variable when set and not empty, else its default."""
        if name not in self.stage.knobs:
            raise KeyError(f"stage {self.stage.name} reads {name}, which its record does not list among its knobs")
        return self.env.get(name) or self.stage.knobs[name]

    def fill(self, template: str, fields: Mapping[str, object] | None = None) -> str:
        """``template`` with each ``{NAME}`` replaced: by ``fields[NAME]``, ``{out}`` by the output directory, else by
        the value of the stage's knob ``NAME``."""

        def value(match: re.Match[str]) -> str:
            name = match[1]
            if fields is not None and name in fields:
                return str(fields[name])
            return str(self.out) if name == "out" else self.knob(name)

        return _FIELD.sub(value, template)

    def words(self, line: str, **fields: str | Path | Sequence[str]) -> list[str]:
        """A command line split into words as a shell splits it, each word's fields filled in (see ``fill``).

        A word that is only ``{*NAME}`` becomes several: ``fields[NAME]`` (a sequence as it is, a string split at
        whitespace) or the knob's value split at whitespace, as an unquoted ``$NAME`` in a shell.
        """
        result: list[str] = []
        for word in shlex.split(line):
            whole = _WORDS_FIELD.fullmatch(word)
            if whole is None:
                result.append(self.fill(word, fields))
                continue
            value = fields[whole[1]] if whole[1] in fields else self.knob(whole[1])
            result += value.split() if isinstance(value, str) else [str(item) for item in value]
        return result

    def elapsed_s(self) -> float:
        """Seconds since the stage started (the shell's ``$SECONDS``)."""
        return time.monotonic() - self.started

    # ------------------------------------------------------------------------------------------ steps
    def run(
        self,
        argv: Sequence[str | Path],
        *,
        log: Path | None = None,
        tee: bool = False,
        tail: int = 0,
        stdout: Path | None = None,
        stderr: Path | None = None,
        env: Mapping[str, str] | None = None,
        limit_s: float | None = None,
        check: bool = True,
    ) -> int:
        """Run one command from the repository root and return its exit status (``TIMED_OUT`` when stopped).

        Output: to ``log`` (stdout and stderr together; with ``tee`` also to the console), or to ``stdout`` and
        ``stderr`` apart, else to the console; ``tail`` prints its last lines afterwards. ``env`` adds variables for
        this command; ``limit_s`` bounds it below the time the stage has left. With ``check``, a non-zero exit
        counts as a failed step.
        """
        if tee and tail:
            raise ValueError("tee shows all of the output already: tail is for output kept in a log")
        words = [str(word) for word in argv]
        env = dict(env or {})
        shown = _shell_line(words, env, log=log, tee=tee, tail=tail, stdout=stdout, stderr=stderr, limit_s=limit_s)
        self.commands.append(words)
        print(f"$ {shown}", flush=True)
        if self.dry_run:
            return 0
        timeout = self._time_left(limit_s)
        if timeout <= 0:
            self._fail(f"not run, the stage's {self.stage.limit_s} s are spent: {shown}")
            return TIMED_OUT
        code, timed_out = _execute(
            words, {**self.env, **env}, timeout, log=log, tee=tee, tail=tail, stdout=stdout, stderr=stderr
        )
        if timed_out:
            print(f"stopped after {timeout:.0f} s: {shown}", file=sys.stderr, flush=True)
        if code and check:
            self._fail(f"{'timed out' if timed_out else f'exit {code}'}: {shown}")
        return code

    def capture(
        self,
        argv: Sequence[str | Path],
        *,
        limit_s: float | None = None,
        max_lines: int | None = None,
        hide_errors: bool = False,
        placeholder: str = "",
    ) -> str:
        """A command's stdout (its first ``max_lines`` lines), for a value the stage uses; its exit status does not
        count. ``hide_errors``: stderr to /dev/null. In a dry run: ``placeholder``."""
        words = [str(word) for word in argv]
        head = f" | head -{max_lines}" if max_lines else ""
        print(f"$ $({_shell_line(words, {}, limit_s=limit_s)}{' 2>/dev/null' if hide_errors else ''}{head})")
        self.commands.append(words)
        if self.dry_run:
            return placeholder
        try:
            process = subprocess.Popen(
                words,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL if hide_errors else None,
                text=True,
                errors="replace",
            )
        except OSError as error:
            print(f"{words[0]}: {error}", file=sys.stderr)
            return ""
        assert process.stdout is not None
        timer = threading.Timer(self._time_left(limit_s), _stop, (process,))
        timer.start()
        lines: list[str] = []
        try:
            for line in process.stdout:
                lines.append(line)
                if max_lines is not None and len(lines) >= max_lines:
                    break  # as `| head -N`: the rest is not wanted
        finally:
            timer.cancel()
            if process.poll() is None and max_lines is not None and len(lines) >= max_lines:
                _stop(process, grace_s=1)
            process.stdout.close()
            process.wait()
        return "".join(lines)

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a Python step (a summary) in this process; an exception counts as a failed step."""
        shown = f"{_function_name(function)}({', '.join(repr(str(arg)) for arg in args)})"
        print(f"$ python: {shown}", flush=True)
        if self.dry_run:
            return
        try:
            function(*args)
        except Exception:
            traceback.print_exc()
            self._fail(f"{shown} raised (traceback above)")

    def export(self, name: str, value: str) -> None:
        """Set an environment variable for every later command of the stage."""
        print(f"$ export {name}={shlex.quote(value)}", flush=True)
        self.env[name] = value

    def mkdir(self, path: Path) -> None:
        print(f"$ mkdir -p {shlex.quote(str(path))}", flush=True)
        if not self.dry_run:
            path.mkdir(parents=True, exist_ok=True)

    def remove_tree(self, path: Path) -> None:
        print(f"$ rm -rf {shlex.quote(str(path))}", flush=True)
        if self.dry_run:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def copy(self, source: Path | str, target: Path) -> None:
        """Copy a file; a missing source counts as a failed step."""
        print(f"$ cp {shlex.quote(str(source))} {shlex.quote(str(target))}", flush=True)
        self.commands.append(["cp", str(source), str(target)])
        if self.dry_run:
            return
        try:
            shutil.copyfile(source, target)
        except OSError as error:
            print(f"cp: {error}", file=sys.stderr)
            self._fail(f"cp {source} {target}: {error}")

    def write_text(self, path: Path, text: str) -> None:
        print(f"$ write {shlex.quote(str(path))}", flush=True)
        if not self.dry_run:
            path.write_text(text)

    def say(self, text: str) -> None:
        """Print what a stage reports on the console (exit statuses, log tails); nothing in a dry run."""
        if text and not self.dry_run:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """Explain a dry run's next command (a condition it runs under); nothing in a real run."""
        if self.dry_run:
            print(f"# {text}")

    def _time_left(self, limit_s: float | None) -> float:
        left = self.stage.limit_s - self.elapsed_s()
        return left if limit_s is None else min(limit_s, left)

    def _fail(self, message: str) -> None:
        print(f"step failed: {message}", file=sys.stderr, flush=True)
        self.failures.append(message)


# ---------------------------------------------------------------------------------------------- processes
def _execute(
    argv: list[str],
    env: Mapping[str, str],
    timeout: float,
    *,
    log: Path | None,
    tee: bool,
    tail: int,
    stdout: Path | None,
    stderr: Path | None,
) -> tuple[int, bool]:
    """Run ``argv`` with its output where ``StageSession.run`` says; the exit status and whether it timed out."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as files:
        if tail and log is None:  # `2>&1 | tail -N`: the output is kept until the end, then its last lines shown
            log = Path(scratch) / "output"
        if log is not None:
            combined = files.enter_context(log.open("wb"))
            out_file: IO[bytes] | int | None = subprocess.PIPE if tee else combined
            err_file: IO[bytes] | int | None = subprocess.STDOUT
        else:
            out_file = None if stdout is None else files.enter_context(stdout.open("wb"))
            err_file = None if stderr is None else files.enter_context(stderr.open("wb"))
        try:
            process = subprocess.Popen(argv, env=dict(env), stdout=out_file, stderr=err_file)
        except OSError as error:
            print(f"{argv[0]}: {error}", file=sys.stderr, flush=True)
            return (127 if isinstance(error, FileNotFoundError) else 126), False
        pump = None
        if tee:
            assert process.stdout is not None
            pump = threading.Thread(target=_tee, args=(process.stdout, combined), daemon=True)
            pump.start()
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 0.001))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(process)
        except BaseException:  # interrupted: take the command and what it started down with the runner
            _stop(process, grace_s=2)
            raise
        if pump is not None:
            # Like `| tee`, to the end of the output; after a stop, whatever still holds the pipe gets the grace time.
            pump.join(timeout=KILL_GRACE_S if timed_out else None)
        if tail and log is not None:
            combined.flush()
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                print("\n".join(lines), flush=True)
    if timed_out:
        return TIMED_OUT, True
    code = process.returncode
    return (128 - code if code < 0 else code), False  # killed by signal N: 128 + N, as a shell reports it


def _tee(source: IO[bytes], log: IO[bytes]) -> None:
    """Copy a command's output to its log and to the console as it comes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    read = getattr(source, "read1", source.read)
    try:
        while chunk := read(1 << 16):
            log.write(chunk)
            log.flush()
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True))
    except (OSError, ValueError):  # the log was closed after a stop while something still wrote to the pipe
        pass


def _stop(process: subprocess.Popen[Any], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to a command and every process it started (torchrun's workers), SIGKILL to those left after
    ``grace_s``."""
    try:
        import psutil  # a dependency of the package (megatron-core's checkpoint writer starts its workers with it)
    except ImportError:  # then only the command itself can be reached
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
        process.wait()
        return
    try:
        parent = psutil.Process(process.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


# ---------------------------------------------------------------------------------------------- printing
def _shell_line(
    words: Sequence[str],
    env: Mapping[str, str],
    *,
    log: Path | None = None,
    tee: bool = False,
    tail: int = 0,
    stdout: Path | None = None,
    stderr: Path | None = None,
    limit_s: float | None = None,
) -> str:
    """A command as a shell line would run it (what a dry run prints, and what each real run prints first)."""
    line = " ".join([*(f"{name}={shlex.quote(value)}" for name, value in env.items()), shlex.join(words)])
    if limit_s is not None:
        line = f"timeout {limit_s:.0f} {line}"
    if log is not None:
        line += f" 2>&1 | tee {shlex.quote(str(log))}" if tee else f" > {shlex.quote(str(log))} 2>&1"
        if tail:
            line += f"; tail -{tail} {shlex.quote(str(log))}"
    else:
        if stdout is not None:
            line += f" > {shlex.quote(str(stdout))}"
        if stderr is not None:
            line += f" 2> {shlex.quote(str(stderr))}"
        if tail:
            line += f" 2>&1 | tail -{tail}"
    return line


def _function_name(function: Callable[..., Any]) -> str:
    return getattr(function, "__name__", repr(function))
