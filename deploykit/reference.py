"""Reference runs in onnxruntime: what the FP32 model and the canonical model compute.

The canonical model *means* its Q/DQ arithmetic evaluated in float: quantize, round, clamp,
dequantize, then the float op. onnxruntime with graph optimizations off computes exactly that.
With them on it fuses Q/DQ into integer kernels whose rounding (and, on x86 without VNNI,
int16 saturation: see :mod:`deploykit.cpu`) is the runtime's own, so the fidelity reference
never uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from deploykit.backend import Runner
from deploykit.ortsession import session


class ReferenceRunner(Runner):
    """A Runner over :func:`deploykit.ortsession.session`: FP32 with optimizations, canonical QDQ
    without."""

    def __init__(self, path: Path | str, *, exact: bool) -> None:
        self.session = session(path, exact=exact)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, dict(feeds)))


def fp32_runner(path: Path | str) -> ReferenceRunner:
    return ReferenceRunner(path, exact=False)


def canonical_runner(path: Path | str) -> ReferenceRunner:
    return ReferenceRunner(path, exact=True)


def run_canonical(path: Path | str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The canonical model's outputs for ``feeds`` (exact Q/DQ semantics)."""
    return canonical_runner(path).run(feeds)
