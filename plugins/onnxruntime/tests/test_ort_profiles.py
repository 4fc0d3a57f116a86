"""The onnxruntime lowering in the asymmetric profile and with float islands: bit-exact, and
ReLU/ReLU6 clips that clip nothing are dropped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from deploykit.canonical import QdqGraph
from deploykit.checks import compare
from deploykit.ortsession import session
from deploykit.testing import eval_feeds, make_canonical, make_target, skip_unless_installed
from deploykit_onnxruntime import OnnxRuntimeBackend

skip_unless_installed("torch", reason="the test models are exported from torch (pip install torch==2.13.0)")


def _plain(path, feeds):
    return session(path, exact=True).run(None, feeds)


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_asymmetric_lowering_is_bit_exact(kind, tmp_path):
    canonical = make_canonical(kind, tmp_path, activations="asymmetric")
    feeds = eval_feeds(kind, 32)
    target = make_target(OnnxRuntimeBackend, threads=1, graph_optimization_level="disable")
    backend = OnnxRuntimeBackend()
    artifact = backend.lower(canonical, target, tmp_path / "m.onnx")
    assert artifact.metadata["activation_profile"] == "asymmetric"
    assert {c.name: c.status for c in artifact.checks} == {"scales_match": "pass"}
    assert compare(_plain(canonical.path, feeds), backend.load(artifact, target).run(feeds))["max_abs_error"] == 0.0
    lowered = onnx.load(str(artifact.path))
    g, cg = QdqGraph(lowered), QdqGraph(canonical.model)
    by_name = {n.name: n for n in lowered.graph.node}
    inputs = {i.name for i in canonical.model.graph.input}
    for node in canonical.model.graph.node:  # zero point z became uint8 z + 128 (model inputs stay int8)
        if node.op_type == "QuantizeLinear" and node.name in by_name:
            z = int(cg.params(node).zero_point)
            got = g.params(by_name[node.name]).zero_point
            if node.input[0] in inputs:
                assert got.dtype == np.int8 and int(got) == z
            else:
                assert got.dtype == np.uint8 and int(got) == z + 128
    if kind == "resnet":  # every ReLU's [0, hi] range leaves nothing to clip
        assert len(artifact.metadata["noop_clips_dropped"]) == 6
        assert not [n for n in lowered.graph.node if n.op_type in ("Relu", "Clip")]


def test_symmetric_relu_still_clips(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations="symmetric")
    artifact = OnnxRuntimeBackend().lower(canonical, make_target(OnnxRuntimeBackend), tmp_path / "m.onnx")
    assert artifact.metadata["noop_clips_dropped"] == [] and artifact.metadata["integer_relu_clip"] == 6


def test_float_islands_run_float_and_are_named(tmp_path):
    canonical = make_canonical("mobilenet", tmp_path, activations="asymmetric", keep_float=("Gemm",))
    feeds = eval_feeds("mobilenet", 16)
    target = make_target(OnnxRuntimeBackend, threads=1, graph_optimization_level="disable")
    backend = OnnxRuntimeBackend()
    artifact = backend.lower(canonical, target, tmp_path / "m.onnx")
    gemm = [n.name for n in canonical.model.graph.node if n.op_type == "Gemm"]
    assert artifact.metadata["float_layers"] == gemm
    audit = next(c for c in artifact.checks if c.name == "float_layers")
    assert audit.value == len(gemm) and gemm[0] in audit.message
    assert compare(_plain(canonical.path, feeds), backend.load(artifact, target).run(feeds))["max_abs_error"] == 0.0
