"""Quiet vendor start-up logs in every process the ``deploykit`` command starts; all of it under ``-v``.

Why a filter on file descriptor 2 and not only environment variables: TensorFlow 2.21 writes its
absl lines (``cudart_stub.cc``, ``cuda_platform.cc:52] failed call to cuInit``, oneDNN, "All log
messages before absl::InitializeLog() ...") from C++ *before* ``absl::InitializeLog()`` runs, so
``TF_CPP_MIN_LOG_LEVEL`` does not reach them even when it is set before the first import. On a
machine with no GPU, ``E0000 ... failed call to cuInit: INTERNAL: CUDA error`` reads as a failure.

So :func:`install` points fd 2 at a pipe. A reader thread passes every line on to the real
stderr as it arrives, except lines that match :data:`NOISE`. Python's own ``sys.stderr`` is
re-opened on the real stderr meanwhile: deploykit's progress display, tables and messages are
neither delayed nor mistaken for a pipe (rich still sees a terminal). Child processes inherit
both the pipe and the quiet environment defaults, so they are filtered too.

``-v`` (``DEPLOYKIT_VERBOSE=1``, inherited by child processes) passes everything through and
leaves the vendors' own log levels alone.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

VERBOSE_ENV = "DEPLOYKIT_VERBOSE"

# Set as defaults (a user's own value wins) before any vendor is imported. They quiet what
# honours them; the fd-2 filter catches what does not.
QUIET_ENV: dict[str, str] = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ logging after absl::InitializeLog()
    "GLOG_minloglevel": "3",
    "GRPC_VERBOSITY": "ERROR",
    "KMP_WARNINGS": "0",  # OpenMP runtime notices
}

# Python loggers of vendor SDKs that chatter on import (untested versions of each other, ...).
VENDOR_LOGGERS = ("tensorflow", "absl", "coremltools", "openvino", "torch", "torchao", "nncf", "jax", "h5py")

# One line of vendor noise. Anchored, so a deploykit line that merely mentions TensorFlow passes.
NOISE = re.compile(
    r"""^(?:
        [IWEF]\d{4}\s[\d:.]+\s+\d+\s[\w./+-]+:\d+\]\s   # absl/glog native prefix
      | WARNING:\ All\ log\ messages\ before\ absl::InitializeLog\(\)
      | INFO:\ Created\ TensorFlow\ Lite\ XNNPACK\ delegate
      | INFO:\ Initialized\ TensorFlow\ Lite\ runtime
      | To\ enable\ the\ following\ instructions:.*rebuild\ TensorFlow   # cpu_feature_guard's 2nd line
      | WARNING:tensorflow:
      | WARNING:absl:
      | (?:scikit-learn|Torch|TensorFlow)\ version\ [\w.+]+\ (?:is\ not\ supported|has\ not\ been\ tested)
      | Failed\ to\ load\ _MLModelProxy|Failed\ to\ load\ _MLCPUComputeDeviceProxy|Failed\ to\ load\ _MLGPU
      | Failed\ to\ load\ _MLNeuralEngine|Failed\ to\ load\ _MLComputePlan|Failed\ to\ load\ _MLModelAsset
      | Fail\ to\ import\ BlobReader|Fail\ to\ import\ BlobWriter
      | OMP:\ Info\ \#
    )""",
    re.VERBOSE,
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def is_noise(line: str) -> bool:
    """True for a line (without its line ending) that only a vendor's start-up would print."""
    return bool(NOISE.match(line.lstrip("\r")))


def quiet_environment() -> None:
    """Quiet defaults for vendor SDKs; must run before the first vendor import."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_loggers(verbose_: bool) -> None:
    for name in VENDOR_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose_ else logging.ERROR)


class _Filter:
    """fd 2 -> pipe -> reader thread -> the real stderr, minus :data:`NOISE` lines."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.real_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        self.reader: BinaryIO = os.fdopen(read_fd, "rb", buffering=0)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.old_stderr = sys.stderr
        # Python keeps writing straight to the terminal (no delay, isatty() still true for rich).
        # Line-buffered without write_through: print()'s text and its newline leave in one write,
        # so a native line the pump passes on at the same moment cannot land in mid-line.
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(self.real_fd), "wb", buffering=0),
                                      encoding=getattr(self.old_stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace", line_buffering=True)
        self.thread = threading.Thread(target=self._pump, name="deploykit-vendorlog", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # signals go to the main thread (see deploykit/signals.py)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        pending = b""
        while True:
            try:
                chunk = self.reader.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            pending = self._emit(pending, final=False)
        self._emit(pending, final=True)

    def _emit(self, data: bytes, final: bool) -> bytes:
        """Write the complete lines (``\\n`` or ``\\r`` ended) of ``data``; return the unfinished tail."""
        out = []
        start = 0
        for m in re.finditer(rb"\r\n|\n|\r", data):
            line, segment = data[start:m.start()], data[start:m.end()]
            start = m.end()
            if verbose() or not is_noise(line.decode("utf-8", "replace")):
                out.append(segment)
        tail = data[start:]
        if final and tail:
            if verbose() or not is_noise(tail.decode("utf-8", "replace")):
                out.append(tail)
            tail = b""
        if out:
            sink = _sink
            try:
                if sink is not None:  # a live progress display: print above its bars, not through them
                    sink(b"".join(out).decode("utf-8", "replace"))
                else:
                    os.write(self.real_fd, b"".join(out))
            except Exception:  # noqa: BLE001  # the pump must survive a closed terminal or a stopped display
                pass
        return tail

    def stop(self) -> None:
        """Restore fd 2 and flush what the reader still holds (child processes may keep the pipe open)."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real_fd, 2)  # closes our end of the pipe's write side
        self.thread.join(timeout=1.0)
        sys.stderr = self.old_stderr


_active: _Filter | None = None
_lock = threading.Lock()
_sink: Callable[[str], None] | None = None


def set_sink(sink: Callable[[str], None] | None) -> None:
    """Where passed-through native lines go while set (the progress display's console), so a
    vendor line printed mid-build cannot shift the live bars and overwrite kept lines."""
    global _sink
    _sink = sink


def install() -> None:
    """Quiet environment defaults, vendor loggers at ERROR, and the fd-2 filter (once per process).

    Leaves fd 2 alone under ``-v``/``DEPLOYKIT_VERBOSE=1``, when fd 2 is closed, and when
    ``sys.stderr`` was already replaced (a test harness or a host program capturing it).
    """
    global _active
    quiet_environment()
    quiet_loggers(verbose())
    with _lock:
        if _active is not None or verbose():
            return
        if sys.stderr is not sys.__stderr__:  # someone (pytest's capsys, a host program) owns stderr
            return
        try:
            os.fstat(2)
        except OSError:
            return
        _active = _Filter()
    atexit.register(stop)


def set_verbose(value: bool) -> None:
    """``-v``: everything through from now on, in this process and the ones it starts."""
    if value:
        os.environ[VERBOSE_ENV] = "1"
        for key, default in QUIET_ENV.items():  # only our defaults; a user's own setting stays
            if os.environ.get(key) == default:
                del os.environ[key]
    quiet_loggers(value)


def stop() -> None:
    """Flush and remove the filter; safe to call twice (also registered with atexit)."""
    global _active
    with _lock:
        active, _active = _active, None
    if active is not None:
        active.stop()
