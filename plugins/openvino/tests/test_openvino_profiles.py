"""OpenVINO lowers the asymmetric profile exactly (zero points become FakeQuantize ranges) and
keeps float islands float, naming them in its audit; a wrong zero point is caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploykit.canonical import QdqGraph
from deploykit.checks import compare
from deploykit.testing import eval_feeds, make_canonical, make_target, skip_unless_installed

pytest.importorskip("openvino", reason="pip install 'deploykit[openvino]'")
skip_unless_installed("torch", reason="the test models are exported from torch (pip install torch==2.13.0)")
from deploykit_openvino import OpenVINOBackend  # noqa: E402
from deploykit_openvino.verify import verify_scales  # noqa: E402


def _plain(path, feeds):
    from deploykit.ortsession import session

    return session(path, exact=True).run(None, feeds)


@pytest.mark.parametrize("kind", ["resnet", "encoder"])
def test_asymmetric_lowering_keeps_zero_points(kind, tmp_path):
    canonical = make_canonical(kind, tmp_path, activations="asymmetric")
    backend, target = OpenVINOBackend(), make_target(OpenVINOBackend)
    artifact = backend.lower(canonical, target, tmp_path / "m.xml")
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    assert checks["int8_fraction"].value == 1.0, checks["int8_fraction"].message  # attention included
    # the softmax probabilities (zero point -128, [0, max] in 256 steps) read as uint8 with zero point 0, the same
    # grid: with a zero point OpenVINO would run those MatMuls in f32
    assert len(artifact.metadata["uint8_operands"]) == (2 if kind == "encoder" else 0)
    assert artifact.metadata["activation_profile"] == "asymmetric"
    feeds = eval_feeds(kind, 32)
    # OpenVINO's integer kernels round on their own (the random-weight test encoder: 9.3% rel-L2, as symmetric)
    assert compare(_plain(canonical.path, feeds), backend.load(artifact, target).run(feeds))["rel_l2"] < 0.1


def test_wrong_zero_point_is_caught(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations="asymmetric")
    artifact = OpenVINOBackend().lower(canonical, make_target(OpenVINOBackend), tmp_path / "m.xml")
    import openvino as ov

    ir = ov.Core().read_model(str(artifact.path))
    shifted = onnx.ModelProto()
    shifted.CopyFrom(canonical.model)
    g = QdqGraph(shifted)
    q = next(n for n in shifted.graph.node if n.op_type == "QuantizeLinear" and int(g.params(n).zero_point) != 0)
    name = f"{q.name}_shifted_zp"
    shifted.graph.initializer.append(numpy_helper.from_array(np.array(int(g.params(q).zero_point) + 1, np.int8), name))
    q.input[2] = name
    check = verify_scales(ir, shifted)
    assert check.status == "fail" and q.name in check.message and "zp=" in check.message


def test_float_islands_are_float_and_named(tmp_path):
    canonical = make_canonical("resnet", tmp_path, activations="asymmetric", keep_float=("Gemm",))
    artifact = OpenVINOBackend().lower(canonical, make_target(OpenVINOBackend), tmp_path / "m.xml")
    audit = next(c for c in artifact.checks if c.name == "int8_fraction")
    gemm = [n.name for n in canonical.model.graph.node if n.op_type == "Gemm"]
    assert audit.value == 1.0  # every layer the canonical model quantizes runs int8
    declared = audit.details["declared_float_layers"]
    assert [d["name"] for d in declared] == gemm and all(d["precision"] not in ("i8", "u8") for d in declared)
    assert "declared float" in audit.message and artifact.metadata["float_layers"] == gemm
