"""Issues 12 and 13 on TFLite: transformer encoders (int64 ids, bool masks, GELU, LayerNorm,
Softmax) lowered with the canonical MatMul scales, and canonical weights kept on per-channel
ranges the converter would widen (the flatbuffer patch), against the real converter and LiteRT."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.canonical import QdqGraph
from deploykit.errors import LoweringError
from deploykit.reference import run_canonical
from deploykit.testing import eval_feeds, make_canonical, make_target, skip_unless_installed
from deploykit_tflite import TFLiteBackend
from deploykit_tflite.float_ops import find_gelus
from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph
from deploykit_tflite.verify import open_interpreter, verify

skip_unless_installed("tensorflow")
skip_unless_installed("ai_edge_litert")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
from zoo import dead_channel_cnn, make_canonical_from  # noqa: E402


def canonical_outputs(canonical, feeds) -> list[np.ndarray]:
    """The canonical model's exact Q/DQ semantics (onnxruntime with graph optimizations off)."""
    return run_canonical(canonical.path, feeds)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    work = tmp_path_factory.mktemp("tflite_encoder")
    canonical = make_canonical("encoder", work)
    target = make_target(TFLiteBackend, threads=2)
    artifact = TFLiteBackend().lower(canonical, target, work / "encoder.tflite")
    return canonical, target, artifact


def test_encoder_keeps_every_matmul_scale_and_the_canonical_embeddings(encoder):
    canonical, target, artifact = encoder
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    assert checks["full_integer"].status == "info"  # LayerNorm, GELU, Softmax float by the contract
    # every canonical activation scale (all of them MatMul inputs here) is an int8 tensor's scale
    g = QdqGraph(canonical.model)
    it = open_interpreter(artifact.path.read_bytes())
    int8_scales = {np.float32(d["quantization_parameters"]["scales"][0]) for d in it.get_tensor_details()
                   if d["dtype"] == np.int8 and len(d["quantization_parameters"]["scales"]) == 1}
    qs = [n for n in canonical.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 16
    for q in qs:
        assert np.float32(g.params(q).scale.reshape(-1)[0]) in int8_scales, q.name
    feeds = eval_feeds("encoder", 16)
    ref = canonical_outputs(canonical, feeds)[0]
    out = TFLiteBackend().load(artifact, target).run(feeds)[0]  # batch 16 on a batch-1 model: must not mix samples
    assert cosines(ref, out).min() >= 0.999


def test_encoder_layer_by_layer(encoder):
    """The TFLite layer runner on an encoder (ONNX axis order, MatMuls as CONV_2D on reshaped
    [tokens, 1, 1, width] tensors, attention inputs read through DEQUANTIZE): every tensor the
    .tflite materialises is compared and is exact or one step off. V is not: the converter
    slices it straight out of the fused projection's output, no tensor of its own."""
    from deploykit import layers

    canonical, target, artifact = encoder
    cut = layers.find_cut(canonical.model)
    runner = TFLiteBackend().layer_runner(artifact, canonical, target, cut)
    try:
        report = layers.compare_layers("tflite", canonical.model, runner, [eval_feeds("encoder", 8, seed=1)], cut)
    finally:
        runner.close()
    assert len(report.layers) >= len(cut) - 2 and len(report.layers) + len(report.not_compared) == len(cut)
    assert all(r.verdict in ("exact", "rounding") and r.max_steps <= 1 for r in report.layers), layers.table(report)
    assert {r.layer for r in report.layers} >= {"node_softmax", "node_layer_norm", "node_gelu"}


def test_encoder_mask_and_ids_stay_exact(encoder):
    """int64 ids, the bool mask and the -3.4e38 additive mask never enter an int8 tensor; GELU
    is one op (TFLite has no ERF), LayerNorm and Softmax float."""
    _, _, artifact = encoder
    it = open_interpreter(artifact.path.read_bytes())
    details = {d["index"]: d for d in it.get_tensor_details()}
    assert [np.dtype(d["dtype"]).name for d in it.get_input_details()] == ["int64", "int64"]
    ops = it._get_ops_details()
    names = [op["op_name"] for op in ops]
    assert names.count("GELU") == 2 and "ERF" not in names
    for op in ops:
        outs = [details[i] for i in op["outputs"]]
        if op["op_name"] in ("SELECT_V2", "SOFTMAX", "GATHER", "RSQRT", "GREATER"):
            assert all(d["dtype"] != np.int8 for d in outs), op["op_name"]
        if op["op_name"] == "GREATER":
            assert details[op["inputs"][0]]["dtype"] == np.int64
    for d in details.values():
        if d["dtype"] == np.int8 and len(d["quantization_parameters"]["scales"]) == 1:
            assert d["quantization_parameters"]["scales"][0] < 1.0, f"{d['name']}: a mask-sized scale"


def test_encoder_preflight_names_every_unsupported_op(encoder):
    canonical, target, _ = encoder
    model = onnx.ModelProto()
    model.CopyFrom(canonical.model)
    renamed = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and renamed < 2:
            node.op_type, renamed = "GroupNormalization", renamed + 1
    broken = SimpleNamespace(model=model, calibration=canonical.calibration, path=canonical.path)
    checks, _ = TFLiteBackend().preflight(broken, target)
    support = next(c for c in checks if c.name == "tflite_op_support")
    assert support.status == "fail" and len(support.details["unsupported"]) == 2
    assert all("GroupNormalization" in u for u in support.details["unsupported"])


def _dynamic_seq_model() -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "sequence"])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [ids], [out]))


def test_dynamic_sequence_shape_from_targets_toml_else_evaluation_data_else_error():
    model = _dynamic_seq_model()
    assert fixed_input_shapes(model, {"input_ids": [1, 24]}, "phone") == {"input_ids": [1, 24]}
    assert fixed_input_shapes(model, {}, "phone", {"input_ids": [8, 64]}) == {"input_ids": [1, 64]}
    with pytest.raises(LoweringError, match=r"input_shapes = \{ input_ids = \[1, \?\] \}"):
        fixed_input_shapes(model, {}, "phone")


def _gelu_graph(form: str, c: float = 0.044715) -> onnx.ModelProto:
    """GELU as the exporters write it: legacy erf (x * 0.5 first) or the tanh approximation."""
    consts = {"half": 0.5, "one": 1.0, "sqrt2": float(np.sqrt(2.0)), "k": float(np.sqrt(2 / np.pi)), "c": c}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    if form == "erf_half_last":  # the legacy exporter: x * (1 + erf(x / sqrt 2)) * 0.5
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"], name="d0"),
                 helper.make_node("Erf", ["d"], ["e"], name="e0"),
                 helper.make_node("Add", ["e", "one"], ["a"], name="a0"),
                 helper.make_node("Mul", ["x", "a"], ["xa"], name="m0"),
                 helper.make_node("Mul", ["xa", "half"], ["y"], name="end")]
    elif form == "erf":
        nodes = [helper.make_node("Mul", ["x", "half"], ["xh"], name="m0"),
                 helper.make_node("Div", ["x", "sqrt2"], ["d"], name="d0"),
                 helper.make_node("Erf", ["d"], ["e"], name="e0"),
                 helper.make_node("Add", ["e", "one"], ["a"], name="a0"),
                 helper.make_node("Mul", ["xh", "a"], ["y"], name="end")]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"], name="p0"),
                 helper.make_node("Mul", ["x2", "x"], ["x3"], name="p1"),
                 helper.make_node("Mul", ["x3", "c"], ["cx3"], name="p2"),
                 helper.make_node("Add", ["x", "cx3"], ["inner"], name="p3"),
                 helper.make_node("Mul", ["inner", "k"], ["arg"], name="p4"),
                 helper.make_node("Tanh", ["arg"], ["t"], name="t0"),
                 helper.make_node("Add", ["t", "one"], ["a"], name="a0"),
                 helper.make_node("Mul", ["x", "half"], ["xh"], name="m0"),
                 helper.make_node("Mul", ["xh", "a"], ["y"], name="end")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    return helper.make_model(helper.make_graph(nodes, "gelu", [x], [y], inits))


@pytest.mark.parametrize("form,tanh", [("erf", False), ("erf_half_last", False), ("tanh", True)])
def test_exported_gelu_forms_are_recognised_and_checked_numerically(form, tanh):
    def walk(model):
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return SimpleNamespace(g=QdqGraph(model), model=model, const=lambda n: inits.get(n))

    found, absorbed = find_gelus(walk(_gelu_graph(form)))
    assert found == {"end": ("x", tanh)}
    assert "end" not in absorbed and len(absorbed) == (8 if form == "tanh" else 4)
    # the same structure with another constant is not GELU: left alone (and Erf then errors by name)
    assert find_gelus(walk(_gelu_graph(form, c=0.1) if form == "tanh" else _bad_erf(form)))[0] == {}


def _bad_erf(form: str) -> onnx.ModelProto:
    model = _gelu_graph(form)
    for init in model.graph.initializer:
        if init.name == "sqrt2":
            init.CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32), "sqrt2"))
    return model


def test_canonical_weights_kept_where_the_converter_widens_them(tmp_path):
    """Channels with ~1e-7 weights: the converter widens their scales and re-derives their int8
    values; the patch writes the canonical ones back. A dead channel (~1e-12 weights, bias 0.5)
    cannot have its bias as an int32 at the canonical scale: named in not_kept, nothing else; nor
    can a dead channel whose bias sits near the int32 limit once its products are added."""
    canonical = make_canonical_from(dead_channel_cnn(), tmp_path, "dead", shape=(3, 8, 8))
    target = make_target(TFLiteBackend)
    raw_graph = lower_graph(canonical, {"x": [1, 3, 8, 8]}, False, target.name)
    raw_checks, _ = verify(convert(raw_graph), raw_graph, False)
    assert raw_checks[0].status == "fail" and "per-channel scales differ" in raw_checks[0].message

    artifact = TFLiteBackend().lower(canonical, target, tmp_path / "dead.tflite")
    scales = next(c for c in artifact.checks if c.name == "scales_match")
    assert scales.status == "pass", scales.message
    patched = artifact.metadata["patched"]
    assert len(patched["not_kept"]) == 2 and "channel 5" in patched["not_kept"][0]
    assert "channel 6" in patched["not_kept"][1]
    assert patched["not_kept"] == scales.details["not_kept"]
    assert set(patched["weights_rewritten"]) == {"stem.weight_axis0_quantized", "dw.weight_axis0_quantized"}
    assert patched["unchanged_checked"] > 0
    x = np.random.default_rng(3).random((8, 3, 8, 8), dtype=np.float32)
    ref = canonical_outputs(canonical, {"x": x})[0]
    out = TFLiteBackend().load(artifact, target).run({"x": x})[0]
    step = next(np.float32(d["quantization_parameters"]["scales"][0])
                for d in open_interpreter(artifact.path.read_bytes()).get_output_details())
    assert np.abs(out - ref).max() <= 1.01 * step  # within one int8 step of the canonical model
