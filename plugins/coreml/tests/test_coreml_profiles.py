"""Core ML lowers the asymmetric activation profile exactly: every canonical zero point is stored
on its quantize/dequantize op (read back from the package), and the lowered program, evaluated
by the reference MIL interpreter (Linux has no Core ML runtime), computes the canonical model.
Declared float layers stay float. So the plugin declares "asymmetric"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("coremltools", reason="the Core ML backend needs it (pip install 'deploykit[coreml]')")
skip_unless_installed("torch", reason="the test models need torch (pip install torch==2.13.0)")

from deploykit.canonical import ASYMMETRIC, QdqGraph  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.testing import eval_feeds, make_canonical, make_target  # noqa: E402
from deploykit_coreml import CoreMLBackend, lowering  # noqa: E402


def _run_program():  # the test-only MIL interpreter beside test_coreml.py
    spec = importlib.util.spec_from_file_location("coreml_mil_reference", Path(__file__).with_name("mil_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_program


def _check(artifact, name):
    return next(c for c in artifact.checks if c.name == name)


def test_the_plugin_declares_both_profiles():
    assert set(CoreMLBackend.activation_profiles) == {"symmetric", ASYMMETRIC}


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])  # encoder: softmax probabilities at zp -128
def test_asymmetric_zero_points_are_stored_and_computed(kind, tmp_path):
    canonical = make_canonical(kind, tmp_path, activations=ASYMMETRIC)
    g = QdqGraph(canonical.model)
    nonzero = [n for n in canonical.model.graph.node if n.op_type == "QuantizeLinear" and int(g.params(n).zero_point)]
    assert len(nonzero) >= 2, "the test model should have non-zero activation zero points"

    artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, compute_precision="fp32"),
                                     tmp_path / f"{kind}.mlpackage")
    check = _check(artifact, "scales_match")
    assert check.status == "pass", check.message  # compares each stored zero point with the canonical one
    assert check.details["zero_points_compared"] >= len(nonzero)

    options = {"minimum_deployment_target": "iOS17", "compute_precision": "fp32", "compute_units": "ALL",
               "batch": "range", "batch_size": 1}
    lowered = lowering.build_program(canonical.model, "iOS17")
    mlmodel = lowering.convert(lowered, options, max_batch=8)
    feeds = eval_feeds(kind, 8)
    want = run_canonical(canonical.path, feeds)
    got = _run_program()(mlmodel._mil_program, {i.coreml_name: feeds[i.onnx_name] for i in lowered.inputs})
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5, np.abs(a - b).max()


def test_declared_float_layers_stay_float(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations=ASYMMETRIC, keep_float=("Gemm",))
    artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, compute_precision="fp32"),
                                     tmp_path / "islands.mlpackage")
    assert _check(artifact, "scales_match").status == "pass"
    audit = _check(artifact, "int8_fraction")
    floats = [layer for layer in audit.details["layers"] if not layer["int8_inputs"]]
    assert [layer["type"] for layer in floats] == ["linear"], audit.message  # the Gemm, and only it
    assert audit.details["int8_input_ops"] == audit.details["compute_ops"] - 1 >= 3
