"""TensorRT refuses an asymmetric canonical model up front, in one line, without TensorRT."""

from __future__ import annotations

import pytest

from deploykit.errors import LoweringError
from deploykit.testing import make_canonical, make_target, skip_unless_installed
from deploykit_tensorrt import TensorRTBackend

skip_unless_installed("torch", reason="the test models are exported from torch (pip install torch==2.13.0)")


def test_asymmetric_model_is_refused_in_one_line(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations="asymmetric")
    target = make_target(TensorRTBackend, name="a100-trt")
    checks, _ = TensorRTBackend().preflight(canonical, target)
    (check,) = checks
    assert check.status == "fail" and "\n" not in check.message
    assert "'a100-trt'" in check.message and "--activations symmetric" in check.message
    with pytest.raises(LoweringError, match=r"target 'a100-trt'.*--activations symmetric"):
        TensorRTBackend().lower(canonical, target, tmp_path / "m.engine")


def test_float_islands_pass_the_tensorrt_lint(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations="symmetric", keep_float=("Gemm",))
    checks, _ = TensorRTBackend().preflight(canonical, make_target(TensorRTBackend))
    lint = next(c for c in checks if c.name == "tensorrt_lint")
    assert lint.status == "pass", lint.message
