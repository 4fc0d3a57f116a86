"""On-target checks shared by every backend, driven through the Runner: latency, accuracy
against the FP32 reference (and labels), fidelity against the canonical model in onnxruntime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from deploykit.backend import Runner


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median

    def to_json(self) -> dict:
        return self.__dict__.copy()


def measure_latency(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int = 10, runs: int = 100) -> LatencyStats:
    """Warm up, then time ``runs`` calls of ``runner.run(feeds)`` one by one."""
    for _ in range(warmup):
        runner.run(feeds)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        runner.run(feeds)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    p50 = float(np.percentile(ms, 50))
    return LatencyStats(batch, runs, p50, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                        float(ms.mean()), batch / (p50 / 1e3) if p50 > 0 else 0.0)
