"""Settings for the whole suite (tests/ and every plugin's tests/)."""

from __future__ import annotations

import os

import pytest

#: the math libraries' own thread pools: torch's intra-op pool and NumPy's BLAS read these when
#: they start (onnxruntime, OpenVINO and LiteRT take their threads from the target's options)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist (``-n auto``: one worker process per core) each worker gets its share of
    the cores for torch and BLAS, not every core: two workers each running two spinning OpenMP
    threads on two cores spent 4x the CPU on a small model's training steps (0.14 s instead of
    0.025 s per step). The workers are started after this hook and inherit the variables; a
    variable the caller set is kept."""
    workers = len(config.getoption("tx", None) or [])
    if workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ:
        per_worker = str(max(1, (os.cpu_count() or 1) // workers))
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, per_worker)
