"""Shared bench helpers: build a canonical model from a torch module, interleaved timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np


def canonical_from_module(module, example: dict[str, np.ndarray], calib: dict[str, np.ndarray], workdir: Path,
                          method: str = "entropy"):
    """Export ``module`` (dynamic batch), normalise, calibrate on ``calib``; returns CanonicalModel."""
    import torch

    from deploykit.model import export_torch
    from deploykit.testing import canonical_from_onnx

    src = export_torch(module, tuple(torch.from_numpy(v) for v in example.values()), workdir / "model.onnx",
                       list(example))
    return canonical_from_onnx(src, calib, workdir, "bench", method)


def interleaved_medians(runners: Mapping[str, Callable[[], object]], rounds: int = 20, per_round: int = 25,
                        warmup: int = 20, settle: int = 5) -> dict[str, float]:
    """Median latency (ms) of each callable, measured in alternating rounds in one process so
    that machine noise hits every contender alike. The first ``settle`` calls of each round are
    not timed: the previous contender's thread pool may still be spinning on the cores."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(settle):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}
