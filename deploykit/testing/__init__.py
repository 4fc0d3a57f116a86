"""Helpers for plugin authors and deploykit's own tests: targets with defaults, small canonical
models, and the backend conformance suite (``deploykit.testing.conformance``)."""

from __future__ import annotations

from typing import Any

from deploykit.backend import Backend
from deploykit.targets import Device, Target


def make_target(backend: type[Backend], name: str | None = None, device: str = "local",
                batch_sizes: tuple[int, ...] = (1,), thresholds: dict[str, float] | None = None,
                warmup: int = 2, runs: int = 10, **options: Any) -> Target:
    """A Target for ``backend`` with its option defaults, overridden by ``options``."""
    unknown = set(options) - set(backend.options)
    if unknown:
        raise KeyError(f"{backend.name} has no options {sorted(unknown)}")
    opts = {k: o.default for k, o in backend.options.items()}
    opts.update(options)
    return Target(name or backend.name, backend.name, Device(device, "cpu"), opts, dict(thresholds or {}),
                  tuple(batch_sizes), warmup, runs)
