"""Ctrl-C and SIGTERM during a build, delivered only at safe points.

Why: a KeyboardInterrupt raised while a vendor SDK (OpenVINO, TensorFlow Lite) runs native
code on its own threads crashed the process (SIGSEGV) instead of stopping it. So the CLI
blocks SIGINT/SIGTERM in the main thread first thing (:func:`block`), before numpy's BLAS,
onnxruntime or any SDK starts a thread: every thread inherits the mask, so the kernel keeps
the signal pending instead of handing it to some native thread (where Python's handler would
still interrupt the main thread at an arbitrary point). A build then polls for it where
stopping is safe: progress updates between batches, and between steps. During a target the
first signal waits for the target to finish (it is journaled, so a rerun keeps it); a second
one stops at once. Commands other than ``build`` unblock the main thread (:func:`unblock`)
and get plain Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from deploykit.errors import Terminated

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_state: dict[str, Any] = {"active": False, "holding": "", "noted": 0}


def block() -> set[Any] | None:
    """Block SIGINT/SIGTERM in the calling (main) thread; returns the mask to restore."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return {signal.Signals(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)}


def unblock() -> None:
    """Deliver SIGINT/SIGTERM to the main thread again (plain Ctrl-C; other threads keep them blocked)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def restore(old: set[Any] | None) -> None:
    """Put back the mask :func:`block` returned; a signal still pending then is dropped (the work is over)."""
    if old is None:
        return
    _state.update(active=False, holding="", noted=0)
    with contextlib.suppress(BaseException):
        while _take() is not None:
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM for the duration of a build (main thread only, POSIX only)."""
    if _state["active"] or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    _state.update(active=True, holding="", noted=0)
    try:
        yield
        checkpoint()
    finally:
        _state.update(active=False, holding="", noted=0)
        with contextlib.suppress(KeyboardInterrupt, Terminated):  # a late signal: the build is over anyway
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _take() -> int | None:
    pending = signal.sigpending() & _SIGNALS
    if not pending:
        return None
    info = signal.sigtimedwait(pending, 0)
    return info.si_signo if info is not None else None


def _raise(signo: int) -> None:
    if signo == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def checkpoint() -> None:
    """Raise KeyboardInterrupt / Terminated here if a signal is pending (a safe point)."""
    if not _state["active"]:
        return
    signo = _take()
    if signo is None:
        return
    if _state["holding"] and not _state["noted"]:
        _state["noted"] = signo
        print(f"\ndeploykit: stopping after {_state['holding']} finishes (it is kept for the rerun); "
              f"press Ctrl-C again to stop now", file=sys.stderr, flush=True)
        return
    _raise(signo)


@contextlib.contextmanager
def hold(step: str) -> Iterator[None]:
    """Inside, a first signal is noted and raised only when the block ends."""
    if not _state["active"]:
        yield
        return
    _state["holding"] = step
    try:
        yield
    finally:
        _state["holding"] = ""
    noted, _state["noted"] = _state["noted"], 0
    if noted:
        _raise(int(noted))
    checkpoint()
