"""Progress on stderr: one rich display for the whole command, nested steps, ETA.

Every step longer than a second or two (calibration passes, recipes, evaluation, latency
runs, lowering) opens a :func:`step`. Steps nest: a step opened inside another is shown
indented under it, and when a step ends its bar is replaced by one kept line with its
elapsed time, so the terminal ends up with a timed log of what ran. Messages printed while
the display is live go through :func:`echo` so they land above the bars instead of through
them.

The display is on only when stderr is a terminal (not under ``CI``, not with ``--json``).
Off, steps cost nothing and print nothing; with ``-v`` each finished step is still logged
with its duration.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("deploykit.progress")
T = TypeVar("T")

_enabled: bool | None = None
_lock = threading.RLock()
_display: Any = None  # rich.progress.Progress while any step is open
_depth = 0


def set_enabled(value: bool | None) -> None:
    """Force the display on or off (None: decide from the terminal)."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty() and not os.environ.get("CI")


def console() -> Any:
    """The rich console on stderr (the live display's, while one is open)."""
    from rich.console import Console

    with _lock:
        if _display is not None:
            return _display.console
    return Console(stderr=True, highlight=False, soft_wrap=True)


def echo(message: str) -> None:
    """Print one line on stderr, above the live bars when they are showing."""
    with _lock:
        if _display is not None:
            _display.console.print(message, markup=False, highlight=False, soft_wrap=True)
            return
    print(message, file=sys.stderr, flush=True)


class EchoHandler(logging.Handler):
    """A logging handler that prints through :func:`echo` (``-v`` lines never tear the bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo(self.format(record))
        except Exception:  # noqa: BLE001  # pragma: no cover - logging must never raise
            self.handleError(record)


def _route_native_output(display: Any) -> None:
    """Lines that reach fd 2 from native code (see :mod:`deploykit.vendorlog`) print through the
    live display's console while it is up."""
    from deploykit import vendorlog

    if display is None:
        vendorlog.set_sink(None)
        return
    console_ = display.console

    def sink(text: str) -> None:
        for line in text.replace("\r\n", "\n").replace("\r", "\n").splitlines():
            console_.print(line, markup=False, highlight=False, soft_wrap=True)

    vendorlog.set_sink(sink)


def _new_display() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=Console(stderr=True, highlight=False), transient=True, redirect_stdout=False, redirect_stderr=False,
        refresh_per_second=8)


class Step:
    """One step of work: ``update(n)`` as it advances; ``total`` may be set once it is known."""

    def __init__(self, description: str, total: float | None = None, unit: str = "it") -> None:
        self.description, self.unit = description, unit
        self._total = total
        self.completed = 0.0
        self.started = 0.0
        self.seconds = 0.0
        self._task: Any = None
        self._level = 0

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Step:  # noqa: PYI034
        global _display, _depth
        self.started = time.monotonic()
        if not enabled():
            return self
        with _lock:
            if _display is None:
                _display = _new_display()
                _display.start()
                _route_native_output(_display)
            self._level = _depth
            _depth += 1
            self._task = _display.add_task("  " * self._level + self.description, total=self._total,
                                           unit=self.unit)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _display, _depth
        self.seconds = time.monotonic() - self.started
        done = f"{self.completed:g}" + (f"/{self._total:g}" if self._total is not None else "")
        outcome = "" if exc_type is None else " (interrupted)" if exc_type is KeyboardInterrupt else " (failed)"
        log.debug("%s: %s %s in %.2f s%s", self.description, done, self.unit, self.seconds, outcome)
        if self._task is None:
            return
        with _lock:
            display = _display
            if display is None:
                return
            display.remove_task(self._task)
            display.console.print(f"{'  ' * self._level}{self.description}  {done} {self.unit}  "
                                  f"{_clock(self.seconds)}{outcome}", markup=False, highlight=False)
            _depth -= 1
            if _depth <= 0:
                _route_native_output(None)
                display.stop()
                _display, _depth = None, 0

    # --- advancing -------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        from deploykit import signals

        signals.checkpoint()  # between batches: a safe point to stop on Ctrl-C/SIGTERM
        self.completed += n
        if self._task is not None:
            with _lock:
                if _display is not None:
                    _display.update(self._task, advance=n)

    @property
    def total(self) -> float | None:
        return self._total

    @total.setter
    def total(self, value: float | None) -> None:
        self._total = value
        if self._task is not None:
            with _lock:
                if _display is not None:
                    _display.update(self._task, total=value)


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds >= 3600 else \
        f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def step(description: str, total: float | None = None, unit: str = "it") -> Step:
    """``with step("calibrate: ranges", total=512, unit="sample") as s: ... s.update(n)``."""
    return Step(description, total, unit)


def bar(total: float | None = None, desc: str = "", unit: str = "it") -> Step:
    """:func:`step` with the argument order of the first call sites (tqdm's)."""
    return Step(desc, total, unit)


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` inside one step, advancing it by one per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with step(description, total, unit) as s:
        for item in items:
            yield item
            s.update()
