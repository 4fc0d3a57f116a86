"""A function run in a child process forked from this one, for tests that need a real separate
process (a signal it receives, a server they kill, an exit code) but not a fresh interpreter.

Why: a fresh ``python -m deploykit.cli build`` spends its first ~0.8 s of CPU importing (~1.9 s with
ml_dtypes 0.7.0, see pyproject.toml), and an agent or a build imports more. A child forked
from a test process that has already imported deploykit starts in milliseconds. It is still a
process of its own: its own pid, signals, file descriptors, exit status; what it changes in
modules, the environment or the working directory stays in the child.

What a fork does not give: a fresh interpreter. A test about the console entry point, a clean
environment, what importing a module loads, or a variable read when a library starts (BLAS
threads) must start a new interpreter with :mod:`subprocess`. The child has only the forking
thread: thread pools of the parent (onnxruntime's, BLAS's) are started again on first use, so
the child must not use torch after the parent used its OpenMP pool (libgomp is not fork-safe).
On Linux the child gets SIGKILL when the thread that forked it ends (PR_SET_PDEATHSIG): fork
from a thread that outlives the child (a test's main thread). POSIX only.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping


class Forked:
    """``fn()`` running in a forked child, with ``cwd`` and ``env`` (the whole environment) set
    there and its stdout/stderr written to the given files (appended; ``None``: /dev/null).
    The child's exit code is what ``fn`` returns (an ``int`` or ``None`` for 0), the code of a
    ``SystemExit`` it raises, or 1 for any other exception (traceback on its stderr). The methods
    follow :class:`subprocess.Popen`: a child killed by a signal has ``returncode == -signo``."""

    def __init__(self, fn: Callable[[], int | None], *, cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None, stdout: str | Path | None = None,
                 stderr: str | Path | None = None) -> None:
        self.returncode: int | None = None
        sys.stdout.flush()  # what the parent buffered must not be written twice
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(fn, cwd, env, stdout, stderr)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        deadline = time.monotonic() + (timeout or 0.0)
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signo: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signo)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_forked(fn: Callable[[], int | None], *, cwd: str | Path | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``fn()`` in a forked child, waited for; its stdout and stderr as text, like
    ``subprocess.run(..., capture_output=True, text=True)``. A child still running after
    ``timeout`` seconds is killed and :class:`subprocess.TimeoutExpired` raised."""
    with tempfile.TemporaryDirectory(prefix="deploykit-forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = Forked(fn, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        text = {p: p.read_text(errors="replace") if p.exists() else "" for p in (out, err)}
        return subprocess.CompletedProcess([f"forked:{getattr(fn, '__name__', fn)!s}"], code, text[out], text[err])


def _child(fn: Callable[[], int | None], cwd: str | Path | None, env: Mapping[str, str] | None,
           stdout: str | Path | None, stderr: str | Path | None) -> None:
    code = 1
    try:
        try:
            if sys.platform == "linux":  # die with the parent: never outlive the test run holding its pipes
                import ctypes

                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            for fd, path, mode in ((0, None, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
                target = os.open(path if path is not None else os.devnull,
                                 mode | (os.O_CREAT | os.O_APPEND if path is not None else 0), 0o644)
                os.dup2(target, fd)
                os.close(target)
            # the parent's sys.stdout/stderr may be a test runner's capture: write to the fds instead
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                          errors="backslashreplace")
            if cwd is not None:
                os.chdir(cwd)
            if env is not None:
                wanted = dict(env)  # a copy: env may be os.environ itself
                os.environ.clear()
                os.environ.update(wanted)
            result = fn()
            code = 0 if result is None else int(result)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
    finally:
        os._exit(code)
