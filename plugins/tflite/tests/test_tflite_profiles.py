"""TFLite lowers the asymmetric activation profile exactly (each tensor's int8 zero point is the
flatbuffer's zero point, the LiteRT interpreter stays within one int8 step of the canonical
model) and keeps declared float layers float, so the plugin declares "asymmetric"."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("tensorflow")
skip_unless_installed("ai_edge_litert")
skip_unless_installed("torch", reason="the test models are exported from torch (pip install torch==2.13.0)")

from deploykit.canonical import ASYMMETRIC, QdqGraph  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.testing import eval_feeds, make_canonical, make_target  # noqa: E402
from deploykit_tflite import TFLiteBackend  # noqa: E402


def test_the_plugin_declares_both_profiles():
    assert set(TFLiteBackend.activation_profiles) == {"symmetric", ASYMMETRIC}


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_asymmetric_zero_points_are_kept_and_outputs_match(kind, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    canonical = make_canonical(kind, tmp_path, activations=ASYMMETRIC)
    g = QdqGraph(canonical.model)
    zero_points = {int(g.params(n).zero_point) for n in canonical.model.graph.node if n.op_type == "QuantizeLinear"}
    assert len(zero_points - {0}) >= 2, "the test model should have non-zero activation zero points"
    backend, target = TFLiteBackend(), make_target(TFLiteBackend, threads=2)
    artifact = backend.lower(canonical, target, tmp_path / f"{kind}.tflite")
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message  # scales AND zero points
    assert checks["full_integer"].status == "pass", checks["full_integer"].message

    it = Interpreter(model_path=str(artifact.path))
    stored = {int(zp) for t in it.get_tensor_details() if t["dtype"] == np.int8
              for zp in t["quantization_parameters"]["zero_points"]}
    assert zero_points - {0} <= stored, "every canonical activation zero point is some int8 tensor's zero point"

    feeds = eval_feeds(kind, 64)
    got = backend.load(artifact, target).run(feeds)[0]
    want = run_canonical(canonical.path, feeds)[0]
    step = canonical.calibration.scale(canonical.model.graph.output[0].name)  # the output's int8 step
    off = np.abs(got - want) / step
    assert (off <= 1.0 + 1e-3).mean() >= 0.99, f"{kind}: {(off <= 1.001).mean():.3f} within one step (max {off.max():.2f})"


def test_declared_float_layers_stay_float(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations=ASYMMETRIC, keep_float=("Gemm",))
    backend, target = TFLiteBackend(), make_target(TFLiteBackend, threads=2)
    artifact = backend.lower(canonical, target, tmp_path / "islands.tflite")
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    gemm = [n.name for n in canonical.model.graph.node if n.op_type == "Gemm"]
    assert checks["full_integer"].status == "info" and gemm[0] in checks["full_integer"].message
    feeds = eval_feeds("resnet", 32)
    got = backend.load(artifact, target).run(feeds)[0]
    want = run_canonical(canonical.path, feeds)[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), np.abs(got - want).max()


def test_asymmetric_encoder_keeps_the_softmax_probabilities_full_grid(tmp_path):
    """The asymmetric profile puts attention's softmax probabilities on zero point -128 ([0, max]
    in 256 steps): the flatbuffer keeps that zero point and every canonical scale, and the
    embeddings stay those of the canonical model."""
    canonical = make_canonical("encoder", tmp_path, activations=ASYMMETRIC)
    g = QdqGraph(canonical.model)
    producer = {o: n for n in canonical.model.graph.node for o in n.output}
    probabilities = [n for n in canonical.model.graph.node if n.op_type == "QuantizeLinear"
                     and producer[n.input[0]].op_type == "Softmax"]
    assert probabilities and all(int(g.params(n).zero_point) == -128 for n in probabilities)
    backend, target = TFLiteBackend(), make_target(TFLiteBackend, threads=2)
    artifact = backend.lower(canonical, target, tmp_path / "encoder.tflite")
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message  # scales AND zero points
    from ai_edge_litert.interpreter import Interpreter

    stored = {(float(np.float32(t["quantization_parameters"]["scales"][0])), int(t["quantization_parameters"]["zero_points"][0]))
              for t in Interpreter(model_path=str(artifact.path)).get_tensor_details()
              if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) == 1}
    for q in probabilities:
        assert (float(np.float32(g.params(q).scale.reshape(-1)[0])), -128) in stored, q.name
    feeds = eval_feeds("encoder", 16)
    want = run_canonical(canonical.path, feeds)[0]
    got = backend.load(artifact, target).run(feeds)[0]
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
