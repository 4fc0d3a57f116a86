"""Progress bars on stderr (tqdm), off when stderr is not a terminal or output is JSON."""

from __future__ import annotations

import os
import sys
from typing import Any

_enabled = None


def set_enabled(value: bool | None) -> None:
    global _enabled
    _enabled = value


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    from tqdm import tqdm

    from deploykit import signals

    class _Bar(tqdm):  # type: ignore[misc,type-arg]
        def update(self, n: float | None = 1) -> bool | None:
            signals.checkpoint()  # between batches: a safe point to stop on Ctrl-C
            return super().update(n)

    return _Bar(total=total, desc=desc, unit=unit, disable=not enabled(), leave=False, file=sys.stderr,
                dynamic_ncols=True)
