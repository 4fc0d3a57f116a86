"""Core ML lowering of transformer encoders as torch exports them (issue 13): transformers' own
BertModel, small, exported by the dynamo and by the legacy exporter with a dynamic batch and
sequence, int64 inputs and a padding mask built with Range / Expand / GatherND / Where.

No Core ML runtime here: stored weights and scales are read back from the package, and what the
program computes is evaluated by the test MIL interpreter (mil_reference.py), layer by layer,
against onnxruntime running the canonical model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("coremltools", reason="the Core ML backend needs it (pip install 'deploykit[coreml]')")
skip_unless_installed("torch", reason="the test models need torch (pip install torch==2.13.0)")
skip_unless_installed("transformers", reason="the test encoder is transformers' BertModel (pip install transformers)")

from deploykit.errors import ConfigError  # noqa: E402
from deploykit.ortsession import exposing  # noqa: E402
from deploykit.testing import canonical_from_onnx, exported_onnx, make_canonical, make_target  # noqa: E402
from deploykit.testing.models import bert_inputs  # noqa: E402
from deploykit_coreml import CoreMLBackend, lowering, verify  # noqa: E402

FP32 = {"minimum_deployment_target": "iOS17", "compute_precision": "fp32", "compute_units": "ALL",
        "batch": "range", "batch_size": 1, "shapes": "range", "max_dim": 64, "dim_sizes": []}


def _mil_reference():
    spec = importlib.util.spec_from_file_location("coreml_mil_reference", Path(__file__).with_name("mil_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def canonicals(tmp_path_factory):
    """The test encoder through both exporters (same weights), calibrated on padded batches."""
    work = tmp_path_factory.mktemp("coreml-encoders")
    dynamo = make_canonical("bert", work / "dynamo")
    legacy_onnx = exported_onnx("bert", work / "legacy" / "bert.onnx", exporter="legacy")
    legacy = canonical_from_onnx(legacy_onnx, bert_inputs(64, seed=0), work / "legacy", "bert")
    return {"dynamo": dynamo, "legacy": legacy}


@pytest.fixture(scope="module")
def packages(canonicals, tmp_path_factory):
    """Each export lowered with the default options (iOS17, fp16, batch and sequence ranges)."""
    work = tmp_path_factory.mktemp("coreml-encoder-packages")
    target = make_target(CoreMLBackend, batch_sizes=(1, 4), max_dim=64)
    return {k: CoreMLBackend().lower(c, target, work / f"{k}.mlpackage") for k, c in canonicals.items()}


@pytest.fixture(scope="module")
def fp32_programs(canonicals):
    """Each export as a Core ML program at fp32 (batch up to 8), converted once for the
    layer-by-layer runs: (lowered program, MLModel)."""
    out = {}
    for export, canonical in canonicals.items():
        lowered = lowering.build_program(canonical.model, "iOS17")
        out[export] = (lowered, lowering.convert(lowered, FP32, max_batch=8))
    return out


def _check(artifact, name):
    return next(c for c in artifact.checks if c.name == name)


@pytest.mark.slow
@pytest.mark.parametrize("export", ["dynamo", "legacy"])
def test_export_has_the_ops_of_a_real_encoder(export, canonicals):
    ops = {n.op_type for n in canonicals[export].model.graph.node}
    assert {"MatMul", "Erf", "LayerNormalization", "Softmax", "Where", "Gather", "Shape"} <= ops
    if export == "dynamo":
        assert {"Range", "GatherND", "Expand", "And", "IsNaN"} <= ops
    inputs = {i.name: i.type.tensor_type for i in canonicals[export].model.graph.input}
    assert all(t.elem_type == onnx.TensorProto.INT64 for t in inputs.values())
    assert all(not t.shape.dim[1].HasField("dim_value") for t in inputs.values())  # dynamic sequence


@pytest.mark.slow
@pytest.mark.parametrize("export", ["dynamo", "legacy"])
def test_every_matmul_weight_and_scale_is_stored_as_in_the_canonical_model(export, packages, canonicals):
    artifact, model = packages[export], canonicals[export].model
    inits = {i.name for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(set(n.input) <= dq_outputs for n in matmuls)  # weights and attention: all int8 in the canonical model
    assert {n.output[0] for n in weight_dq} <= {n.input[1] for n in matmuls}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    check = _check(artifact, "scales_match")
    assert check.status == "pass", check.message
    assert check.details["weights_compared"] == len(weight_dq) and check.details["scales_compared"] == len(qdq)
    assert check.details["mismatch_count"] == 0

    # read back independently of the check: int8 data, per-channel scales, zero points
    import json

    mil = json.loads(verify.package_metadata(artifact.path)[verify.META_QDQ_OPS])
    stored = verify.read_package(artifact.path)
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in weight_dq:
        op = stored[mil[node.name]]
        np.testing.assert_array_equal(op.params["quantized_data"], arrays[node.input[0]])
        np.testing.assert_array_equal(op.params["scale"].reshape(-1),
                                      arrays[node.input[1]].astype(np.float16).reshape(-1))  # fp16 compute
        np.testing.assert_array_equal(op.params["zero_point"].reshape(-1), arrays[node.input[2]].reshape(-1))
    # every matmul (weights and attention) takes int8-dequantized inputs
    assert _check(artifact, "int8_fraction").value == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("export", ["dynamo", "legacy"])
def test_dynamic_batch_and_sequence_are_ranges(export, packages):
    import coremltools as ct

    spec = ct.models.MLModel(str(packages[export].path), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in spec.description.input:
        assert i.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
        ranges = i.type.multiArrayType.shapeRange.sizeRanges
        assert [(r.lowerBound, r.upperBound) for r in ranges] == [(1, 4), (1, 64)]
    assert list(packages[export].metadata["dynamic_dims"].values()) == [{"range": [1, 64]}]


@pytest.mark.slow
@pytest.mark.parametrize("export", ["dynamo", "legacy"])
@pytest.mark.parametrize("seq", [7, 16, 40])
def test_layer_by_layer_in_the_mil_interpreter(export, seq, canonicals, fp32_programs):
    """Every int8 tensor within one step of onnxruntime's (float-simulated QDQ, no optimisations),
    every integer and boolean tensor (positions, the attention mask) exactly equal, and the
    pooled embedding with cosine > 0.9999, at sequence lengths other than the calibration's."""
    canonical = canonicals[export]
    lowered, mlmodel = fp32_programs[export]
    feeds = bert_inputs(4, seq=seq, seed=5)
    mil_feeds = {i.coreml_name: feeds[i.onnx_name].astype(np.int32) for i in lowered.inputs}
    run_program = _mil_reference().run_program
    probe: dict = {}
    got = run_program(mlmodel._mil_program, mil_feeds, probe)[0]  # end to end, every op's output kept

    model = onnx.shape_inference.infer_shapes(canonical.model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    quantized = {q.onnx_node: q.mil_op for q in lowered.qdq_names if not q.weight}
    nodes = {n.name: n for n in model.graph.node}
    q_outputs = {nodes[n].output[0]: mil for n, mil in quantized.items() if nodes[n].op_type == "QuantizeLinear"}
    exact_types = (onnx.TensorProto.BOOL, onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    exact = {t: lowering.mil_identifier(t) for t, kind in types.items() if kind in exact_types}
    exact = {t: m for t, m in exact.items() if m in probe and np.ndim(probe[m]) > 0 and np.size(probe[m]) > 1}
    session = exposing(model, [*q_outputs, *exact])  # no optimisations: Q/DQ simulated in float
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, feeds)))

    # layer by layer: every quantize op computed from the canonical model's own inputs
    trace: dict = {}
    run_program(mlmodel._mil_program, mil_feeds, trace, substitute={mil: want[t] for t, mil in q_outputs.items()})
    assert len(q_outputs) >= 8
    for tensor, mil in q_outputs.items():
        a, b = trace[mil].astype(np.int32), want[tensor].astype(np.int32)
        assert a.shape == b.shape, tensor
        steps = np.abs(a - b)
        assert steps.max() <= 1 and np.mean(steps == 0) >= 0.999, (tensor, steps.max(), np.mean(steps == 0))
    assert len(exact) >= 3  # positions, the boolean mask, its gathered rows
    for tensor, mil in exact.items():
        np.testing.assert_array_equal(trace[mil].astype(np.int64), want[tensor].astype(np.int64), err_msg=tensor)

    reference = want[canonical.model.graph.output[0].name]
    cosine = (got * reference).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() > 0.9999


@pytest.mark.slow
def test_no_integer_or_mask_tensor_is_quantized(canonicals):
    """Mask arithmetic stays exact: every quantize op reads a float tensor whose calibrated range is
    finite and small (the -3.4e38 additive mask never enters an int8 tensor)."""
    model = canonicals["dynamo"].model
    lowered = lowering.build_program(model, "iOS17")
    ops = list(lowered.program.functions["main"].operations)
    quantize = [op for op in ops if op.op_type == "quantize"]
    assert quantize
    for op in quantize:
        assert op.input.dtype.__name__ in ("fp32", "fp16"), op.name
        assert float(np.max(op.scale.val)) * 255 < 1e4, op.name


@pytest.mark.slow
def test_enumerated_sequence_shapes_need_ios18(canonicals, tmp_path):
    import coremltools as ct

    canonical = canonicals["dynamo"]
    old = make_target(CoreMLBackend, shapes="enumerated", dim_sizes=[8, 16])
    checks, _ = CoreMLBackend().preflight(canonical, old)
    options = next(c for c in checks if c.name == "coreml_options")
    assert options.status == "fail" and "iOS18" in options.message
    with pytest.raises(ConfigError, match="iOS18"):
        CoreMLBackend().lower(canonical, old, tmp_path / "old.mlpackage")
    assert not (tmp_path / "old.mlpackage").exists()
    with pytest.raises(ConfigError, match="dim_sizes"):
        CoreMLBackend().lower(canonical, make_target(CoreMLBackend, shapes="enumerated",
                                                     minimum_deployment_target="iOS18"), tmp_path / "none.mlpackage")

    artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, shapes="enumerated", dim_sizes=[16, 8],
                                                            minimum_deployment_target="iOS18", batch_sizes=(1, 2)),
                                     tmp_path / "enum.mlpackage")
    assert _check(artifact, "scales_match").status == "pass"
    spec = ct.models.MLModel(str(artifact.path), skip_model_load=True).get_spec()
    for i in spec.description.input:
        shapes = {tuple(s.shape) for s in i.type.multiArrayType.enumeratedShapes.shapes}
        assert shapes == {(1, 8), (1, 16), (2, 8), (2, 16)}
    assert list(artifact.metadata["dynamic_dims"].values()) == [{"enumerated": [8, 16]}]


@pytest.mark.slow
def test_preflight_and_lowering_name_every_unsupported_op(canonicals, tmp_path):
    from deploykit.backend import CanonicalModel
    from deploykit.errors import LoweringError

    canonical = canonicals["dynamo"]
    model = onnx.ModelProto()
    model.CopyFrom(canonical.model)
    renamed = {}
    for node in model.graph.node:  # pretend two op types and one custom-domain op are unknown
        if node.op_type in ("Range", "Erf"):
            node.op_type = {"Range": "RangeV2", "Erf": "ErfV2"}[node.op_type]
            renamed.setdefault(node.op_type, node.name)
    bad = CanonicalModel(canonical.path, model, canonical.calibration, canonical.fp32_path)
    checks, _ = CoreMLBackend().preflight(bad, make_target(CoreMLBackend))
    coverage = next(c for c in checks if c.name == "coreml_op_coverage")
    assert coverage.status == "fail"
    assert set(coverage.details["unsupported"]) == {"RangeV2", "ErfV2"}
    assert all(name in coverage.message for name in renamed.values())
    with pytest.raises(LoweringError) as err:  # before any MIL op is built
        lowering.build_program(model, "iOS17")
    assert "RangeV2" in str(err.value) and "ErfV2" in str(err.value) and "\n" not in str(err.value)
