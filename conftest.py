"""Settings for the whole suite (tests/ and every plugin's tests/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent

#: the test files that cost most, heaviest first (CPU seconds in a 2-worker run at load 5-10,
#: 2026-12-07 13:19: 48, 28, 23, 12, 13, 13, 11, 11, 10, 9, 8, 8, 8, 7, 7, 6, 5; a GROUPS unit
#: starts where its first file is). With ``--dist loadfile`` a file runs whole on one worker;
#: xdist hands files out in order as workers free up, so these go first and the many light files
#: fill in at the end, instead of a heavy file with few tests (xdist's default order is by test
#: count) starting last on one worker while the other idles (test_openvino.py, 11 s, was last).
HEAVY_FIRST = (
    "tests/test_qat.py",
    "plugins/coreml/tests/test_coreml.py",
    "plugins/coreml/tests/test_coreml_encoders.py",
    "tests/test_build.py",
    "plugins/tflite/tests/test_tflite.py",
    "tests/test_agent.py",
    "plugins/openvino/tests/test_openvino.py",
    "tests/test_realnets.py",
    "tests/test_matrix.py",
    "tests/test_plugins.py",
    "tests/test_vendorlog.py",
    "tests/test_jobs.py",
    "tests/test_ray_executor.py",
    "tests/test_reliability.py",
    "tests/test_adopt.py",
    "tests/test_properties.py",
    "tests/test_quantize.py",
)

#: test files that import the same heavy SDK run on the same worker: ``--dist loadfile`` hands
#: out files one at a time, so the TFLite files and the Core ML files were spread over both
#: workers and each worker imported TensorFlow (~9 s of CPU) and coremltools (+ sympy, ~3 s)
#: (2026-12-07, pytest-cpu plugin runs: after grouping one worker imports each).
#: A group is one work unit (see pytest_xdist_make_scheduler); it starts where its first file
#: is in the run order.
GROUPS = {
    "plugins/tflite/tests/": "plugins/tflite/tests",
    "plugins/coreml/tests/": "plugins/coreml/tests",
    # torch's dynamo exporter (onnxscript, its op registry: ~4 s of CPU to load) and transformers:
    # QAT exports, the real networks' exports and the Python API's build from a torch module;
    # AdaRound trains with torch.optim, whose import loads torch._dynamo (~1.7 s). Whichever
    # worker drew test_build.py or test_recipes.py loaded them again (cpu plugin, 12:20 and 13:07).
    "tests/test_qat.py": "torch exports",
    "tests/test_realnets.py": "torch exports",
    "tests/test_build.py": "torch exports",
    "tests/test_recipes.py": "torch exports",
}

#: the math libraries' own thread pools: torch's intra-op pool and NumPy's BLAS read these when
#: they start (onnxruntime, OpenVINO and LiteRT take their threads from the target's options)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist (``-n auto``: one worker process per core) each worker gets its share of
    the cores for torch and BLAS, not every core: two workers each running two spinning OpenMP
    threads on two cores spent 4x the CPU on a small model's training steps (0.14 s instead of
    0.025 s per step). The workers are started after this hook and inherit the variables; a
    variable the caller set is kept. Also: hypothesis is imported without assertion rewriting
    (:func:`_import_without_assert_rewriting`), and xdist's loadscope reordering is turned off
    so the workers take the files in the order pytest_collection_modifyitems gives them."""
    _import_without_assert_rewriting("hypothesis")
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order
    workers = len(config.getoption("tx", None) or [])
    if workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ:
        per_worker = str(max(1, (os.cpu_count() or 1) // workers))
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, per_worker)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Everything alive when a test starts (the SDKs imported so far, the module fixtures) is
    moved out of the garbage collector's reach (``gc.freeze()``), so a full collection scans
    only what the current test made. A worker that has imported torch, TensorFlow and
    coremltools holds ~600,000 objects and a full ``gc.collect()`` takes 0.3-0.5 s of CPU:
    coremltools runs one at the end of every conversion and pytest five at the end of the
    session, besides Python's own full collections. ``test_coreml.py`` alone: 30.6 -> 26.3 CPU s,
    maximum RSS 398 -> 406 MB (what was frozen and later becomes cyclic garbage stays)."""
    import gc

    gc.freeze()


def _import_without_assert_rewriting(name: str) -> None:
    """Import a plugin's package as Python does, not through pytest's assertion rewriter. pytest
    rewrites the asserts of every module of a distribution that provides a pytest plugin
    (hypothesis: its 100-odd modules) and caches the result as bytecode, which it cannot write
    when PYTHONDONTWRITEBYTECODE is set: it then re-parses and rewrites them in every process
    that imports the package (the controller at its terminal summary, every worker collecting
    test_properties.py), 2-2.5 s of CPU each instead of 0.4 s. Only the package's own
    internal asserts are affected, never a test's."""
    import importlib
    import importlib.util
    import sys

    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    rewriters = [finder for finder in sys.meta_path if type(finder).__name__ == "AssertionRewritingHook"]
    for finder in rewriters:
        sys.meta_path.remove(finder)
    try:
        importlib.import_module(name)
    finally:
        sys.meta_path[:0] = rewriters


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """HEAVY_FIRST's files first, in that order; the rest as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.resolve().relative_to(ROOT).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)


def work_unit(path: str) -> str:
    """The xdist work unit of a test file (its path relative to the root): its GROUPS entry, else itself."""
    return next((group for prefix, group in GROUPS.items() if path.startswith(prefix)), path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, pytest never calls this
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the files of a GROUPS entry in one work unit (pytest-xdist's own
    LoadFileScheduling, the unit of work widened from a file to a group)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(super()._split_scope(nodeid))

    return GroupedFileScheduling(config, log)
