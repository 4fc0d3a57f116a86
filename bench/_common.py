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

    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing.models import export_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    src = export_onnx(module.eval(), tuple(torch.from_numpy(v) for v in example.values()), workdir / "model.onnx",
                      list(example))
    fp32 = model.normalise(model.load_onnx(src), str(src))
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    return write_canonical(quantize(fp32, source, method), fp32, workdir, "bench")


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
