"""Activation profiles (symmetric / asymmetric) and float islands in the canonical contract:
placement, table, lint, requantize, and the build's choice of profile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from deploykit import data, model as modelmod
from deploykit.canonical import (
    ASYMMETRIC,
    META_FLOAT_LAYERS,
    META_PROFILE,
    META_TABLE,
    SYMMETRIC,
    CalibrationTable,
    QdqGraph,
    TensorRange,
    asymmetric_params,
    lint,
    model_float_layers,
    model_profile,
    zero_centred,
)
from deploykit.errors import ConfigError
from deploykit.quantize import quantize, requantize
from deploykit.quantize.islands import layer_macs, mac_summary, resolve_keep_float
from deploykit.testing import skip_unless_installed

skip_unless_installed("torch", reason="the test models are exported from torch (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def fp32s(tmp_path_factory):
    """kind -> (normalised FP32 model, calibration DataSource)."""
    from deploykit.testing import eval_feeds, exported_onnx

    root = tmp_path_factory.mktemp("profiles")
    out = {}
    for kind in ("resnet", "mobilenet", "encoder"):
        src = exported_onnx(kind, root / f"{kind}.onnx")
        fp32 = modelmod.normalise(modelmod.load_onnx(src), str(src))
        calib = eval_feeds(kind, 48, seed=0)
        out[kind] = (fp32, data.open_source(lambda c=calib: [c], modelmod.input_specs(fp32)))
    return out


@pytest.fixture(scope="module")
def asym(fp32s):
    return {k: quantize(fp32, src, "minmax", activations=ASYMMETRIC) for k, (fp32, src) in fp32s.items()}


def _act_params(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    g = QdqGraph(model)
    return {n.input[0]: (float(g.params(n).scale), int(g.params(n).zero_point)) for n in model.graph.node
            if n.op_type == "QuantizeLinear"}


# ------------------------------------------------------------------------------ parameters, table
@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 3.0), (-2.5, 0.0), (-0.3, 0.3), (0.5, 2.0), (-7.0, -1.0)])
def test_asymmetric_params_cover_the_range_and_hold_zero_exactly(lo, hi):
    scale, zp = asymmetric_params(lo, hi)
    assert -128 <= zp <= 127
    r = TensorRange(max(abs(lo), abs(hi)), scale, lo, hi, zp)
    # rounding the zero point shifts the grid by at most half a step
    assert r.lo <= min(lo, 0.0) + 0.501 * scale and r.hi >= max(hi, 0.0) - 0.501 * scale
    assert np.round(0.0 / scale) + zp == zp  # 0.0 quantizes to the zero point: dequantizes to exactly 0
    assert asymmetric_params(0.0, 0.0) == (pytest.approx(1 / 127), 0)


def test_post_relu_range_uses_all_256_levels():
    scale, zp = asymmetric_params(0.0, 6.0)
    assert zp == -128 and scale == pytest.approx(6 / 255)


@pytest.mark.parametrize("profile,matmul_operand,observed_min,centred", [
    (SYMMETRIC, False, 0.0, True), (SYMMETRIC, True, 0.0, True),          # symmetric: always zero point 0
    (ASYMMETRIC, False, -1.0, False), (ASYMMETRIC, False, 0.0, False),    # an ordinary activation: its own
    (ASYMMETRIC, True, -0.01, True),                                      # attention's Q, K, V: zero point 0
    (ASYMMETRIC, True, 0.0, False),                                       # softmax probabilities: -128
    (ASYMMETRIC, True, float("nan"), True), (ASYMMETRIC, True, float("inf"), True),  # never observed
])
def test_zero_centred_is_the_one_rule_for_attention_operands(profile, matmul_operand, observed_min, centred):
    assert zero_centred(profile, matmul_operand, observed_min) is centred


def test_table_json_keeps_zero_points_and_reads_the_old_format():
    t = CalibrationTable({"a": TensorRange(6.0, 6 / 255, 0.0, 6.0, -128), "b": TensorRange(1.0, 1 / 127, -1.0, 1.0)})
    back = CalibrationTable.from_json(t.to_json())
    assert back == t and back.zero_point("a") == -128 and back.zero_point("b") == 0
    assert json.loads(t.to_json())["b"] == [1.0, 1 / 127, -1.0, 1.0]  # symmetric rows: the 4-field format
    assert CalibrationTable.from_json('{"x": [1, 0.5, -1, 1]}')["x"].zero_point == 0


# ------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_asymmetric_models_lint_clean_and_say_their_profile(asym, kind):
    m = asym[kind].model
    assert lint(m) == []
    assert model_profile(m) == ASYMMETRIC and model_float_layers(m) == []
    params = _act_params(m)
    assert any(zp != 0 for _, zp in params.values())
    table = asym[kind].table
    for tensor, (scale, zp) in params.items():
        assert (scale, zp) == (pytest.approx(table.scale(tensor), rel=1e-6), table.zero_point(tensor))


def test_post_relu_tensors_get_zero_point_minus_128(asym):
    m = asym["resnet"].model
    g = QdqGraph(m)
    relu_outs = [n.output[0] for n in m.graph.node if n.op_type == "Relu"]
    zps = {t: zp for t, (_, zp) in _act_params(m).items() if t in relu_outs}
    assert zps and set(zps.values()) == {-128}
    assert g  # graph indexed fine


def test_attention_matmul_inputs_are_symmetric_but_the_probabilities_use_the_full_grid(asym):
    m = asym["encoder"].model
    g = QdqGraph(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    act_x_act = [n for n in m.graph.node if n.op_type == "MatMul"
                 and all(g.activation_source(i) for i in n.input[:2])]
    assert len(act_x_act) == 4  # QK^T and PV in each of two layers
    probabilities = 0
    for n in act_x_act:
        for i in n.input[:2]:
            source, params = g.activation_source(i)
            if producer[source].op_type == "Softmax":  # never negative: [0, max] in 256 steps
                probabilities += 1
                assert int(params.zero_point) == -128
                assert np.isclose(float(params.scale), asym["encoder"].table[source].max / 255, rtol=1e-6)
            else:  # Q, K, V: signed, symmetric
                assert int(params.zero_point) == 0
    assert probabilities == 2


def test_concat_and_pooling_groups_share_scale_and_zero_point(asym):
    m = asym["mobilenet"].model
    table = asym["mobilenet"].table
    shared = [n for n in m.graph.node if n.op_type in ("Concat", "MaxPool") and n.output[0] in table]
    assert shared
    for n in shared:
        group = [t for t in list(n.input) + list(n.output) if t in table]
        assert len({(table.scale(t), table.zero_point(t)) for t in group}) == 1


# ------------------------------------------------------------------------------ requantize
def test_requantize_reuses_statistics_without_calibrating(fp32s, asym, monkeypatch):
    fp32, src = fp32s["resnet"]
    direct = quantize(fp32, src, "minmax", activations=SYMMETRIC)
    from deploykit.quantize import observe

    monkeypatch.setattr(observe.Observer, "observe_ranges", lambda *a, **k: pytest.fail("calibrated again"))
    again = requantize(asym["resnet"], fp32, activations=SYMMETRIC)
    # the int16 saturation record is measured on the calibrated profile's grid only
    from deploykit.quantize.saturation import META_SATURATION, recorded

    assert recorded(direct.model) is not None and recorded(again.model) is None
    kept = [p for p in direct.model.metadata_props if p.key != META_SATURATION]
    del direct.model.metadata_props[:]
    direct.model.metadata_props.extend(kept)
    assert again.model.SerializeToString() == direct.model.SerializeToString()
    assert again.stats is asym["resnet"].stats
    with pytest.raises(ConfigError, match="needs histograms"):
        requantize(asym["resnet"], fp32, method="entropy")
    with pytest.raises(ConfigError, match="not nodes"):
        requantize(asym["resnet"], fp32, float_layers=["no_such_node"])


# ------------------------------------------------------------------------------ float islands
def _compute(fp32: onnx.ModelProto, op: str) -> list[str]:
    return [n.name for n in fp32.graph.node if n.op_type == op]


def test_keep_float_by_name_op_type_and_glob(fp32s):
    fp32, _ = fp32s["resnet"]
    convs = _compute(fp32, "Conv")
    assert resolve_keep_float(fp32, [convs[1]]) == [convs[1]]
    assert resolve_keep_float(fp32, ["Gemm"]) == _compute(fp32, "Gemm")
    assert resolve_keep_float(fp32, [convs[0][:3] + "*"]) != []
    with pytest.raises(ConfigError, match="'nothing_like_this' matches no node"):
        resolve_keep_float(fp32, ["Gemm", "nothing_like_this"])
    relus = _compute(fp32, "Relu")
    assert resolve_keep_float(fp32, [relus[0]]) == []  # float anyway: allowed, changes nothing


def test_float_islands_stay_float_and_lint_accepts_only_those(fp32s):
    fp32, src = fp32s["resnet"]
    first_conv, gemm = _compute(fp32, "Conv")[0], _compute(fp32, "Gemm")[0]
    r = quantize(fp32, src, "minmax", activations=ASYMMETRIC, keep_float=[first_conv, "Gemm"])
    m = r.model
    assert r.float_layers == (first_conv, gemm) and model_float_layers(m) == [first_conv, gemm]
    assert lint(m) == []
    g = QdqGraph(m)
    for name in (first_conv, gemm):
        node = next(n for n in m.graph.node if n.name == name)
        assert not any(g.dq_feeding(i) for i in node.input if i)  # float input and float weight
        assert g.const(node.input[1]).dtype == np.float32
    # an accidental float layer (declaration removed) is rejected; so is a declared one that is int8
    undeclared = onnx.ModelProto()
    undeclared.CopyFrom(m)
    next(p for p in undeclared.metadata_props if p.key == META_FLOAT_LAYERS).value = json.dumps([gemm])
    assert ("compute-inputs-quantized", first_conv) in {(v.rule, v.node) for v in lint(undeclared)}
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    other_conv = _compute(fp32, "Conv")[1]
    next(p for p in wrong.metadata_props if p.key == META_FLOAT_LAYERS).value = json.dumps([first_conv, gemm, other_conv])
    assert ("float-layers", other_conv) in {(v.rule, v.node) for v in lint(wrong)}
    next(p for p in wrong.metadata_props if p.key == META_FLOAT_LAYERS).value = json.dumps([first_conv, gemm, "ghost"])
    assert ("float-layers", "ghost") in {(v.rule, v.node) for v in lint(wrong)}


def test_macs_and_int8_share():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    wg = numpy_helper.from_array(np.zeros((10, 256), np.float32), "wg")
    shape = numpy_helper.from_array(np.array([-1, 256], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="flat"),
             helper.make_node("Gemm", ["r", "wg"], ["y"], name="fc", transB=1)]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, wg, shape]),
                          opset_imports=[helper.make_opsetid("", 18)])
    macs = layer_macs(m)
    assert macs == {"conv": 4 * 8 * 8 * 27, "fc": 10 * 256}
    summary = mac_summary(macs, ["fc"])
    assert summary["float_macs"] == 2560 and summary["int8_mac_share"] == pytest.approx(6912 / (6912 + 2560))
    assert summary["float_layers"] == [{"name": "fc", "macs": 2560}]



def _attention_like(seq: str | int = "S") -> onnx.ModelProto:
    """x [N, S, 8] -> MatMul with a weight [8, 8] -> reshape to heads [N, S, 2, 4] -> transpose ->
    scores [N, 2, S, S] (activation x activation MatMul): a symbolic S hides every cost."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", seq, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    heads = numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "heads")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Reshape", ["h", "heads"], ["r"], name="split"),
             helper.make_node("Transpose", ["r"], ["q"], name="t", perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["r"], ["k"], name="tk", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["q", "k"], ["y"], name="scores")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, heads]),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_macs_of_a_sequence_model_use_the_evaluation_shapes():
    m = _attention_like()
    example = {"x": np.zeros((3, 10, 8), np.float32)}  # batch 3, sequence 10
    macs = layer_macs(m, example)
    assert macs == {"proj": 10 * 8 * 8, "scores": 2 * 10 * 10 * 4}  # per sample, at sequence 10
    blind = layer_macs(m)  # shape inference only: the sequence counts as 1, the scores are unknown
    assert blind["proj"] == 8 * 8 and blind["scores"] != macs["scores"]
    # a model that does not run on the example falls back to shape inference, never raises
    assert layer_macs(m, {"x": np.zeros((1, 10, 5), np.float32)}) == blind
    assert layer_macs(_attention_like(10)) == macs  # static shapes: inference alone is right

# ------------------------------------------------------------------------------ lint rules
def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def _rules(m: onnx.ModelProto) -> set[str]:
    return {v.rule for v in lint(m)}


def test_lint_profile_rules(asym, fp32s):
    m = _copy(asym["resnet"].model)
    next(p for p in m.metadata_props if p.key == META_PROFILE).value = "wonky"
    assert "profile" in _rules(m)
    # zero points are not allowed once the model says it is symmetric; TensorRT would reject them
    next(p for p in m.metadata_props if p.key == META_PROFILE).value = SYMMETRIC
    trt = [v for v in lint(m, tensorrt_only=True) if v.rule == "zero-point"]
    assert trt and "symmetric" in trt[0].message
    # the table's zero point must be the Q's
    m = _copy(asym["resnet"].model)
    meta = next(p for p in m.metadata_props if p.key == META_TABLE)
    table = json.loads(meta.value)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    row = table[q.input[0]]
    table[q.input[0]] = row[:4] + [(row[4] if len(row) > 4 else 0) + 1]
    meta.value = json.dumps(table)
    assert ("table-scale", q.name) in {(v.rule, v.node) for v in lint(m)}


def test_lint_shared_zero_point(asym):
    m = _copy(asym["mobilenet"].model)
    pool = next(n for n in m.graph.node if n.op_type == "MaxPool")
    meta = next(p for p in m.metadata_props if p.key == META_TABLE)
    table = json.loads(meta.value)
    row = table[pool.output[0]]
    table[pool.output[0]] = row[:4] + [(row[4] if len(row) > 4 else 0) + 3]
    meta.value = json.dumps(table)
    assert ("shared-zero-point", pool.name) in {(v.rule, v.node) for v in lint(m)}


def test_lint_attention_zero_point(asym):
    m = _copy(asym["encoder"].model)
    g = QdqGraph(m)
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and all(g.activation_source(i) for i in n.input[:2]))
    dq = g.dq_feeding(mm.input[1])
    zp_name = f"{dq.name}_test_zp"
    m.graph.initializer.append(numpy_helper.from_array(np.array(5, np.int8), zp_name))
    q = g.producer[dq.input[0]]
    for node in (q, dq):
        node.input[2] = zp_name
    assert ("zero-point", mm.name) in {(v.rule, v.node) for v in lint(m)}
    # -128 (a never-negative operand on its full grid) is the one other zero point, in the asymmetric profile only
    m.graph.initializer.append(numpy_helper.from_array(np.array(-128, np.int8), f"{zp_name}_full"))
    for node in (q, dq):
        node.input[2] = f"{zp_name}_full"
    assert ("zero-point", mm.name) not in {(v.rule, v.node) for v in lint(m)}
    next(p for p in m.metadata_props if p.key == META_PROFILE).value = SYMMETRIC
    assert ("zero-point", mm.name) in {(v.rule, v.node) for v in lint(m)}


# ------------------------------------------------------------------------------ the build's choice
def _registry():
    from deploykit.plugins import load_registry

    return load_registry()


def _targets(names):
    from deploykit.targets import load_targets

    registry = _registry()
    return registry.resolve(load_targets(None), names), registry


def test_profile_from_targets_and_overrides():
    from deploykit.pipeline import choose_profile

    targets, registry = _targets(["onnxruntime", "openvino"])
    assert choose_profile(targets, registry, None, None, "t")[0] == ASYMMETRIC
    targets, registry = _targets(["onnxruntime", "tensorrt"])
    profile, why = choose_profile(targets, registry, None, None, "t")
    assert profile == SYMMETRIC and "tensorrt" in why
    assert choose_profile(targets, registry, None, SYMMETRIC, "t")[0] == SYMMETRIC
    with pytest.raises(ConfigError, match="target 'tensorrt'.*--activations symmetric"):
        choose_profile(targets, registry, ASYMMETRIC, None, "t")
    targets, registry = _targets(["onnxruntime"])
    assert choose_profile(targets, registry, SYMMETRIC, ASYMMETRIC, "t") == (SYMMETRIC, "chosen by --activations")


@pytest.mark.parametrize("toml,needle", [
    ('[quantization]\nactivations = "unsigned"\n', "key 'activations': 'unsigned' is not one of"),
    ('[quantization]\nkeep_float = "Gemm"\n', "key 'keep_float': expected list"),
    ('[quantization]\nkeep_float = [""]\n', "key 'keep_float' must be a list"),
    ('[quantization]\nfloat = []\n', "unknown key 'float'"),
])
def test_bad_quantization_table(tmp_path, toml, needle):
    from deploykit.targets import load_targets

    path = tmp_path / "targets.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=needle) as exc:
        load_targets(path)
    assert str(path) in str(exc.value) and "[quantization]" in str(exc.value)


def test_build_records_profile_float_layers_and_the_other_profile(digits_files, ort_registry, tmp_path):
    from deploykit.pipeline import BuildOptions, build

    toml = tmp_path / "targets.toml"
    toml.write_text('[quantization]\nkeep_float = ["Gemm"]\n')
    opts = BuildOptions(targets=["onnxruntime"], out_dir=tmp_path / "out", targets_file=toml,
                        calib=str(digits_files.calib), eval=str(digits_files.eval), baseline=False)
    result = build(digits_files.model, opts, ort_registry)
    (target,) = result.targets
    assert target.status == "ok", target.reason
    q = result.manifest["quantization"]
    assert q["activations"] == ASYMMETRIC and "every target" in q["activations_reason"]
    assert [f["name"] for f in q["float_layers"]] == model_float_layers(result.canonical.model) != []
    assert 0.5 < q["int8_mac_share"] < 1.0 and q["float_macs"] == sum(f["macs"] for f in q["float_layers"]) > 0
    cmp = q["profile_comparison"]
    assert cmp["status"] == "measured" and cmp["other"] == SYMMETRIC
    assert cmp["difference"] == pytest.approx(cmp["chosen_metrics"][cmp["metric"]] - cmp["other_metrics"][cmp["metric"]])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "activations: asymmetric" in report and "float layers (1)" in report and cmp["message"] in report
    audit = next(c for c in target.checks if c.name == "float_layers")
    assert q["float_layers"][0]["name"] in audit.message
    # the command-line pattern wins over targets.toml, and a typo is an error before calibrating
    from deploykit.cli import main

    code = main(["build", str(digits_files.model), "--target", "onnxruntime", "--keep-float", "Gemmm",
                 "--calib", str(digits_files.calib), "--out", str(tmp_path / "out2")])
    assert code == 2
    assert not (tmp_path / "out2").exists()
