"""The TFLite backend against the real converter and LiteRT interpreter: scales kept tensor by
tensor, outputs within one int8 step of the canonical model in onnxruntime, digits accuracy,
float fallback, errors and probe."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from deploykit.testing import skip_unless_installed

skip_unless_installed("tensorflow")
skip_unless_installed("ai_edge_litert")
ort = pytest.importorskip("onnxruntime")

from deploykit.backend import CanonicalModel  # noqa: E402
from deploykit.canonical import QdqGraph  # noqa: E402
from deploykit.errors import BackendUnavailable, LoweringError  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.testing import eval_feeds, imported_by_plugins, make_canonical, make_target  # noqa: E402
from deploykit.testing.conformance import run_conformance, unsupported_model  # noqa: E402
from deploykit_tflite import TFLiteBackend  # noqa: E402
from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph  # noqa: E402
from deploykit_tflite.verify import verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from zoo import fixed_into_conv, make_canonical_from, make_zoo_canonical, op_zoo2_cnn, token_mlp  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def canonicals(workdir) -> dict[str, CanonicalModel]:
    out = {kind: make_canonical(kind, workdir / kind) for kind in ("resnet", "mobilenet", "digits")}
    out["zoo"] = make_zoo_canonical(workdir / "zoo")
    out["zoo2"] = make_canonical_from(op_zoo2_cnn(), workdir / "zoo2", "zoo2")
    out["mlp"] = make_canonical_from(token_mlp(), workdir / "mlp", "mlp", shape=(4, 8))
    out["fixed"] = make_canonical_from(fixed_into_conv(), workdir / "fixed", "fixed", shape=(3, 8, 8))
    return out


@pytest.fixture(scope="module")
def lowered(canonicals, workdir):
    """kind -> (artifact, target) lowered once with the default options (int8 I/O)."""
    backend = TFLiteBackend()
    target = make_target(TFLiteBackend, threads=2)
    return {kind: (backend.lower(c, target, workdir / "out" / f"{kind}.tflite"), target)
            for kind, c in canonicals.items()}


def feeds_for(kind: str, n: int) -> dict[str, np.ndarray]:
    if kind in ("zoo", "zoo2"):
        return {"x": np.random.default_rng(3).random((n, 3, 16, 16), dtype=np.float32)}
    if kind == "fixed":
        return {"x": np.random.default_rng(3).random((n, 3, 8, 8), dtype=np.float32)}
    if kind == "mlp":
        return {"x": np.random.default_rng(3).random((n, 4, 8), dtype=np.float32)}
    return eval_feeds(kind, n)


def ort_run(path: Path, feeds) -> list[np.ndarray]:
    """The model's exact Q/DQ semantics (onnxruntime's integer kernels round on their own)."""
    return run_canonical(path, feeds)


def tflite_tensors(path: Path) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it.get_tensor_details()


# ---------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "digits", "zoo", "zoo2", "fixed"])
def test_every_canonical_scale_is_in_the_flatbuffer(kind, canonicals, lowered):
    """Independent of the backend's own name mapping: every canonical per-channel weight scale
    vector is some int8 tensor's scales, every activation Q scale is some int8 tensor's scale."""
    artifact, _ = lowered[kind]
    g = QdqGraph(canonicals[kind].model)
    tensors = [t for t in tflite_tensors(artifact.path) if t["dtype"] == np.int8]
    per_tensor = {np.float32(t["quantization_parameters"]["scales"][0]) for t in tensors
                  if len(t["quantization_parameters"]["scales"]) == 1}
    per_channel = [np.asarray(t["quantization_parameters"]["scales"], np.float32) for t in tensors
                   if len(t["quantization_parameters"]["scales"]) > 1]
    weights = activations = 0
    for node in canonicals[kind].model.graph.node:
        if node.op_type == "DequantizeLinear" and g.is_weight_dq(node):
            want = g.params(node).scale.reshape(-1)
            # a grouped conv is one CONV_2D per group: its scales are split into equal parts
            stored = any(all(any(np.array_equal(s, part) for s in per_channel) for part in np.split(want, groups))
                         for groups in (1, 2, 4, 8) if want.size % groups == 0)
            assert stored, f"{kind}: weight scales of {node.name} are not in the .tflite"
            weights += 1
        elif node.op_type == "QuantizeLinear":
            assert np.float32(g.params(node).scale.reshape(-1)[0]) in per_tensor, \
                f"{kind}: activation scale of {node.name} is not in the .tflite"
            activations += 1
    assert weights >= 3 and activations >= 3
    assert all(t["quantization_parameters"]["zero_points"].tolist() == [0] * len(t["quantization_parameters"]["zero_points"])
               for t in tensors if len(t["quantization_parameters"]["scales"]) > 1), "weights are symmetric"


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "digits", "zoo", "zoo2", "mlp", "fixed"])
def test_verification_passes_and_is_full_integer(kind, lowered):
    artifact, _ = lowered[kind]
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    assert checks["scales_match"].details["weights"] >= 2
    assert checks["full_integer"].status == "pass", checks["full_integer"].message
    assert checks["int8_fraction"].value == 1.0
    assert "QUANTIZE" not in artifact.metadata["ops"][:1] and artifact.metadata["float_ops"] == []


def test_op_coverage_in_the_flatbuffer(lowered):
    ops = set()
    for kind in ("mobilenet", "zoo", "zoo2"):
        ops |= set(lowered[kind][0].metadata["ops"])
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "ADD", "MAX_POOL_2D", "CONCATENATION", "MEAN",
               "LOGISTIC", "MUL", "TANH", "SOFTMAX", "AVERAGE_POOL_2D", "RESIZE_NEAREST_NEIGHBOR",
               "RESIZE_BILINEAR", "PAD", "SPLIT", "RESHAPE", "LEAKY_RELU", "PADV2", "SUB", "REDUCE_MAX",
               "MINIMUM", "MAXIMUM"):
        assert op in ops, f"{op} missing from {sorted(ops)}"


def test_matmul_with_constant_weight_is_a_conv_with_its_bias(canonicals, lowered):
    """nn.Linear on 3-D input exports MatMul + Add: one CONV_2D with bias, no int8 ADD between."""
    artifact, target = lowered["mlp"]
    assert artifact.metadata["ops"].count("CONV_2D") == 2 and "ADD" not in artifact.metadata["ops"]
    feeds = feeds_for("mlp", 64)
    got = TFLiteBackend().load(artifact, target).run(feeds)
    off = steps_off("mlp", canonicals["mlp"], got, ort_run(canonicals["mlp"].path, feeds))
    assert (off <= 1.001).mean() >= 0.98, f"only {(off <= 1.001).mean():.3f} within one step"


def test_fixed_outputs_are_listed_apart_from_mismatches(lowered):
    check = {c.name: c for c in lowered["zoo"][0].checks}["scales_match"]
    fixed = " ".join(check.details["fixed_by_tflite_spec"])
    assert "sigmoid" in fixed and "softmax" in fixed and "tanh" in fixed
    assert "0.00390625, zero point -128" in fixed
    assert check.details["mismatches"] == []


def test_a_wrong_scale_fails_the_check(canonicals):
    """Verification compares against what the canonical model says: a flatbuffer built from a
    different scale is a failed check with the tensor named, never silent."""
    c = canonicals["resnet"]
    shapes = fixed_input_shapes(c.model, {}, "tflite")
    result = lower_graph(c, shapes, False, "tflite")
    flatbuffer = convert(result)
    name, spec = next((k, v) for k, v in result.activations.items() if v.tensor == "relu_2")
    result.activations[name] = dataclasses.replace(spec, scale=spec.scale * 1.01)
    for k, v in list(result.activations.items()):
        if v is spec:
            result.activations[k] = result.activations[name]
    checks, _ = verify(flatbuffer, result, False)
    scales = checks[0]
    assert scales.name == "scales_match" and scales.status == "fail"
    assert any("relu_2" in m for m in scales.details["mismatches"])


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def steps_off(kind: str, canonical: CanonicalModel, got: list[np.ndarray], want: list[np.ndarray]) -> np.ndarray:
    """|TFLite - onnxruntime| in units of the output's int8 step (the last Q/DQ scale: the table's)."""
    out = canonical.model.graph.output[0].name
    if out == "softmax":
        scale = 1 / 256  # fixed by the TFLite spec
    else:
        scale = canonical.calibration.scale(out)
    return np.abs(got[0] - want[0]) / scale


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "zoo", "zoo2"])
def test_outputs_within_one_int8_step_of_onnxruntime(kind, canonicals, lowered):
    artifact, target = lowered[kind]
    runner = TFLiteBackend().load(artifact, target)
    feeds = feeds_for(kind, 64)
    got = runner.run(feeds)
    want = ort_run(canonicals[kind].path, feeds)
    assert got[0].shape == want[0].shape
    off = steps_off(kind, canonicals[kind], got, want)
    assert (off <= 1.0 + 1e-3).mean() >= 0.99, f"{kind}: only {(off <= 1.001).mean():.3f} within one step (max {off.max():.2f})"


def test_fixed_outputs_read_through_a_canonical_q(canonicals, lowered):
    """Tanh/Sigmoid -> Q -> Conv: TFLite quantizes at its fixed scale, then requantizes to the
    canonical one (two roundings where onnxruntime has one), so a little more than one step."""
    artifact, target = lowered["fixed"]
    assert artifact.metadata["ops"].count("QUANTIZE") + artifact.metadata["ops"].count("RELU") >= 2
    feeds = feeds_for("fixed", 64)
    got = TFLiteBackend().load(artifact, target).run(feeds)
    off = steps_off("fixed", canonicals["fixed"], got, ort_run(canonicals["fixed"].path, feeds))
    assert (off <= 1.001).mean() >= 0.9 and off.max() <= 3.0, f"{(off <= 1.001).mean():.3f} within one step, max {off.max():.2f}"


def test_float_io_and_batch_sizes(canonicals, workdir):
    c = canonicals["mobilenet"]
    backend = TFLiteBackend()
    target = make_target(TFLiteBackend, input_type="float32", output_type="float32")
    artifact = backend.lower(c, target, workdir / "float_io" / "mobilenet.tflite")
    assert {ch.name: ch.status for ch in artifact.checks}["scales_match"] == "pass"
    runner = backend.load(artifact, target)
    feeds = eval_feeds("mobilenet", 5)
    batched = runner.run(feeds)[0]
    one_by_one = np.concatenate([runner.run({"x": feeds["x"][i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    looping = backend.load(artifact, target)
    looping._cannot_resize = True  # what happens for a model whose Reshape bakes in the batch
    np.testing.assert_allclose(looping.run(feeds)[0], batched, atol=1e-6)
    assert list(looping._interpreters) == [1]
    off = steps_off("mobilenet", c, [batched], ort_run(c.path, feeds))
    assert (off <= 1.001).mean() >= 0.99


@pytest.mark.slow
def test_digits_accuracy_within_one_point_of_fp32(canonicals, lowered):
    from deploykit.testing import models

    d = models.digits()
    c = canonicals["digits"]
    fp32 = ort_run(c.fp32_path, {"x": d.x_test})[0]
    artifact, target = lowered["digits"]
    got = TFLiteBackend().load(artifact, target).run({"x": d.x_test})[0]
    acc_fp32 = float((fp32.argmax(1) == d.y_test).mean())
    acc_int8 = float((got.argmax(1) == d.y_test).mean())
    assert acc_fp32 > 0.8, f"the digits CNN did not train ({acc_fp32:.3f})"
    assert acc_fp32 - acc_int8 <= 0.01, f"INT8 TFLite {acc_int8:.4f} vs FP32 {acc_fp32:.4f}"


def test_conformance_suite(canonicals, workdir):
    report = run_conformance(TFLiteBackend, workdir / "conformance", canonical=canonicals["resnet"])
    assert report.lowered and report.ran
    assert "conformance_unsupported" in report.unsupported_error


# ---------------------------------------------------------------------------------------
# unsupported ops and float fallback
# ---------------------------------------------------------------------------------------
def with_model(c: CanonicalModel, model: onnx.ModelProto, path: Path) -> CanonicalModel:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return CanonicalModel(path, model, c.calibration, c.fp32_path)


def test_unsupported_op_names_node_and_op(canonicals, workdir):
    c = canonicals["resnet"]
    bad = with_model(c, unsupported_model(c), workdir / "bad" / "bad.qdq.onnx")
    with pytest.raises(LoweringError) as err:
        TFLiteBackend().lower(bad, make_target(TFLiteBackend), workdir / "bad" / "bad.tflite")
    msg = str(err.value)
    assert "conformance_unsupported" in msg and "DeploykitConformanceUnsupportedOp" in msg and "\n" not in msg
    assert not (workdir / "bad" / "bad.tflite").exists()


def sqrt_model(c: CanonicalModel) -> onnx.ModelProto:
    """The resnet canonical model with Sqrt between the last ReLU and the global mean."""
    m = onnx.ModelProto()
    m.CopyFrom(c.model)
    nodes = list(m.graph.node)
    mean = next(n for n in nodes if n.op_type == "ReduceMean")
    src = mean.input[0]
    mean.input[0] = "relu_sqrt"
    nodes.insert(nodes.index(mean), helper.make_node("Sqrt", [src], ["relu_sqrt"], name="inserted_sqrt"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_preflight_lists_unsupported_and_float_only_nodes(canonicals, workdir):
    c = canonicals["resnet"]
    backend, target = TFLiteBackend(), make_target(TFLiteBackend)
    checks, meta = backend.preflight(c, target)
    assert checks == [] and meta["input_shapes"] == {"x": [1, 1, 8, 8]}
    bad = with_model(c, unsupported_model(c), workdir / "bad" / "pre.qdq.onnx")
    checks, _ = backend.preflight(bad, target)
    assert checks[0].status == "fail" and "conformance_unsupported" in checks[0].message
    _, meta = backend.preflight(with_model(c, sqrt_model(c), workdir / "sqrt" / "pre.qdq.onnx"), target)
    assert meta["float_only_ops"] == ["inserted_sqrt (Sqrt)"]


def test_float_only_op_needs_the_fallback_option(canonicals, workdir):
    c = canonicals["resnet"]
    model = with_model(c, sqrt_model(c), workdir / "sqrt" / "sqrt.qdq.onnx")
    with pytest.raises(LoweringError) as err:
        TFLiteBackend().lower(model, make_target(TFLiteBackend), workdir / "sqrt" / "strict.tflite")
    msg = str(err.value)
    assert "inserted_sqrt" in msg and "Sqrt" in msg and "allow_float_fallback" in msg


def test_float_fallback_lists_float_ops(canonicals, workdir):
    c = canonicals["resnet"]
    model = with_model(c, sqrt_model(c), workdir / "sqrt" / "sqrt.qdq.onnx")
    target = make_target(TFLiteBackend, allow_float_fallback=True)
    artifact = TFLiteBackend().lower(model, target, workdir / "sqrt" / "fallback.tflite")
    assert artifact.metadata["lowered_float_ops"] == [{"node": "inserted_sqrt", "op_type": "Sqrt"}]
    checks = {ch.name: ch for ch in artifact.checks}
    assert checks["full_integer"].status == "info"
    assert "SQRT" in [o["op"] for o in artifact.metadata["float_ops"]]
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    feeds = eval_feeds("resnet", 8)
    got = TFLiteBackend().load(artifact, target).run(feeds)[0]
    want = ort_run(model.path, feeds)[0]
    assert np.corrcoef(got.reshape(-1), want.reshape(-1))[0, 1] > 0.99


# ---------------------------------------------------------------------------------------
# shapes, probe, import
# ---------------------------------------------------------------------------------------
def test_dynamic_spatial_dim_asks_for_a_fixed_shape(canonicals):
    m = onnx.ModelProto()
    m.CopyFrom(canonicals["mobilenet"].model)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(LoweringError) as err:
        fixed_input_shapes(m, {}, "phone")
    msg = str(err.value)
    assert "input 'x'" in msg and "[targets.phone.options]" in msg and "input_shapes = { x = [1, 3, ?, 32] }" in msg
    assert fixed_input_shapes(m, {"x": [2, 3, 32, 32]}, "phone") == {"x": [2, 3, 32, 32]}
    assert fixed_input_shapes(canonicals["mobilenet"].model, {}, "phone") == {"x": [1, 3, 32, 32]}


def test_probe_says_what_is_missing(monkeypatch):
    backend, target = TFLiteBackend(), make_target(TFLiteBackend)
    assert backend.probe(target).can_lower and backend.probe(target).can_run
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what Python does for a missing package
    av = backend.probe(target)
    assert not av.can_lower and av.can_run
    assert "tensorflow" in av.reason and av.install_hint == "pip install 'deploykit[tflite]'"
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    av = backend.probe(target)
    assert not av.can_lower and not av.can_run and "ai_edge_litert" in av.reason


def test_lower_without_tensorflow_raises_unavailable(monkeypatch, canonicals, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(BackendUnavailable, match="tensorflow"):
        TFLiteBackend().lower(canonicals["resnet"], make_target(TFLiteBackend), tmp_path / "x.tflite")


def test_importing_the_plugin_does_not_import_tensorflow():
    imported = imported_by_plugins()["deploykit_tflite"]
    assert "tensorflow" not in imported and "ai_edge_litert" not in imported
