"""Settings for the whole suite (tests/ and every plugin's tests/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

#: the test files that cost most, heaviest first (CPU seconds in a 2-worker run at load 7,
#: 2026-12-07: 44, 34, 29, 22, 20, 19, 14, 12, 12, 11, 10, 10). With ``--dist loadfile`` a file
#: runs whole on one worker; xdist hands files out in order as workers free up, so these go
#: first and the many light files fill in at the end, instead of a heavy file with few tests
#: (xdist's default order is by test count) starting last on one worker while the other idles.
HEAVY_FIRST = (
    "tests/test_qat.py",
    "plugins/coreml/tests/test_coreml.py",
    "plugins/coreml/tests/test_coreml_encoders.py",
    "tests/test_build.py",
    "plugins/tflite/tests/test_tflite.py",
    "tests/test_agent.py",
    "tests/test_matrix.py",
    "tests/test_adopt.py",
    "tests/test_vendorlog.py",
    "tests/test_jobs.py",
    "tests/test_ray_executor.py",
    "tests/test_reliability.py",
)

#: the math libraries' own thread pools: torch's intra-op pool and NumPy's BLAS read these when
#: they start (onnxruntime, OpenVINO and LiteRT take their threads from the target's options)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist (``-n auto``: one worker process per core) each worker gets its share of
    the cores for torch and BLAS, not every core: two workers each running two spinning OpenMP
    threads on two cores spent 4x the CPU on a small model's training steps (0.14 s instead of
    0.025 s per step). The workers are started after this hook and inherit the variables; a
    variable the caller set is kept."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order
    workers = len(config.getoption("tx", None) or [])
    if workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ:
        per_worker = str(max(1, (os.cpu_count() or 1) // workers))
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, per_worker)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """HEAVY_FIRST's files first, in that order; the rest as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.resolve().relative_to(ROOT).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)
