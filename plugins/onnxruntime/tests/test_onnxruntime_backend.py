"""The onnxruntime backend: its rewrites are bit-exact, it passes the conformance suite."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deploykit.canonical import QdqGraph
from deploykit.checks import compare
from deploykit.errors import ConfigError
from deploykit.ortsession import session
from deploykit.reference import run_canonical
from deploykit.testing import eval_feeds, make_canonical, make_target
from deploykit.testing.conformance import run_conformance
from deploykit_onnxruntime import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def canonicals(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    return {kind: make_canonical(kind, root / kind, method="entropy") for kind in ("resnet", "mobilenet", "encoder")}


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_lowering_is_lossless(kind, activations, canonicals, tmp_path):
    canonical = canonicals[kind]
    backend = OnnxRuntimeBackend()
    feeds = eval_feeds(kind, 32)
    # With onnxruntime's fusions off, both models run the plain Q/DQ semantics: the rewrites
    # themselves must change nothing at all.
    plain = make_target(OnnxRuntimeBackend, activations=activations, threads=1, graph_optimization_level="disable")
    artifact = backend.lower(canonical, plain, tmp_path / "m.onnx")
    assert {c.name: c.status for c in artifact.checks} == {"scales_match": "pass"}
    want = session(canonical.path, exact=True).run(None, feeds)
    assert compare(want, backend.load(artifact, plain).run(feeds))["max_abs_error"] == 0.0
    # With every fusion on, onnxruntime's integer kernels (e.g. uint8 pooling) round on their
    # own; stay within a hair of the canonical model.
    fused = make_target(OnnxRuntimeBackend, activations=activations, threads=1)
    want = run_canonical(canonical.path, feeds)
    assert compare(want, backend.load(artifact, fused).run(feeds))["rel_l2"] < 1e-3
    lowered = onnx.load(str(artifact.path))
    g = QdqGraph(lowered)
    from deploykit_onnxruntime import input_quantizers

    kept = input_quantizers(lowered)  # the model inputs' quantizers stay int8 (docs/layers.md)
    act_types = {g.params(n).zero_point.dtype for n in lowered.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not g.is_weight_dq(n) and n.name not in kept}
    assert act_types == {np.dtype(activations)}
    assert {g.params(n).zero_point.dtype for n in lowered.graph.node if n.name in kept} <= {np.dtype(np.int8)}
    assert bool(kept) == (kind != "encoder")  # the encoder's inputs are token ids: nothing to quantize
    if kind != "encoder":  # CNNs: every Relu/Clip between int8 convs became an integer Clip
        assert artifact.metadata["integer_relu_clip"] > 0
        assert not [n for n in lowered.graph.node if n.op_type == "Relu"
                    and g.dq_feeding(n.input[0]) is not None]


def test_canonical_model_is_not_modified(canonicals, tmp_path):
    canonical = canonicals["resnet"]
    before = canonical.model.SerializeToString()
    OnnxRuntimeBackend().lower(canonical, make_target(OnnxRuntimeBackend), tmp_path / "m.onnx")
    assert canonical.model.SerializeToString() == before


def test_runner_options_reach_the_session(canonicals, tmp_path):
    backend = OnnxRuntimeBackend()
    target = make_target(OnnxRuntimeBackend, threads=1, graph_optimization_level="basic")
    runner = backend.load(backend.lower(canonicals["resnet"], target, tmp_path / "m.onnx"), target)
    opts = runner.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_unavailable_provider_is_reported(canonicals):
    av = OnnxRuntimeBackend().probe(make_target(OnnxRuntimeBackend, execution_provider="CoreMLExecutionProvider"))
    assert av.can_lower and not av.can_run and "CoreMLExecutionProvider" in av.reason


def test_unknown_provider_is_a_config_error(canonicals):
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        OnnxRuntimeBackend().probe(make_target(OnnxRuntimeBackend, execution_provider="NoSuchExecutionProvider"))


def test_conformance(canonicals, tmp_path):
    report = run_conformance(OnnxRuntimeBackend, tmp_path, canonical=canonicals["resnet"])
    assert report.lowered and report.ran and report.metrics["cosine"] > 0.9999
    assert "DeploykitConformanceUnsupportedOp" in report.unsupported_error
