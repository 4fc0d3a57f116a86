"""onnxruntime session options as deploykit opens its sessions: quiet, and with the thread count
the process was given.

onnxruntime takes one intra-op thread per core whatever ``OMP_NUM_THREADS`` says, while torch and
NumPy's BLAS follow it. Processes sharing the cores (pytest-xdist workers, parallel jobs on one
machine) then each spin a full set of threads: three digits-CNN builds (onnxruntime target,
evaluation and latency) took 3.6-4.6 s of CPU with onnxruntime's two threads on this 2-core
machine at load ~8, and 1.7 s with one thread. So deploykit's sessions take ``OMP_NUM_THREADS``
as their intra-op thread count when it is set; unset, onnxruntime chooses as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx


def threads() -> int:
    """``OMP_NUM_THREADS`` as a positive int, or 0 (onnxruntime's default: one per core)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def session_options() -> Any:
    """A new ``onnxruntime.SessionOptions``: warnings and errors only, threads as :func:`threads`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads():
        opts.intra_op_num_threads = threads()
    return opts


def session(model: onnx.ModelProto | Path | str, *, exact: bool) -> Any:
    """An onnxruntime CPU session on a model or a model file, with :func:`session_options`.
    ``exact`` turns graph optimizations off: Q/DQ pairs then run as the canonical model defines
    them (quantize, round, dequantize in float) instead of being fused into int8 kernels."""
    import onnxruntime as ort

    opts = session_options()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def exposing(model: onnx.ModelProto, tensors: Sequence[str]) -> Any:
    """An onnxruntime session on ``model`` with graph optimizations off (every tensor exists,
    Q/DQ simulated in float exactly as the canonical model defines them) and ``tensors``
    exposed as outputs after the model's own."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    return session(m, exact=True)
