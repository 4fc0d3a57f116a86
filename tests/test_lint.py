"""The canonical-model lint: real canonical models lint clean; a model broken in one way at a
time gives a Violation of exactly that rule naming the offending node; the TensorRT subset and
``deploykit inspect --lint`` report the same."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit import canonical
from deploykit.canonical import META_SOURCE_HASH, META_TABLE, RULES, lint
from deploykit.testing import skip_unless_installed

skip_unless_installed("torch", reason="the canonical test models are exported from torch (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def canonicals(tmp_path_factory):
    from deploykit.testing import make_canonical

    root = tmp_path_factory.mktemp("lint")
    return {kind: make_canonical(kind, root / kind) for kind in ("resnet", "mobilenet", "encoder")}


@pytest.fixture(scope="module")
def resnet(canonicals) -> onnx.ModelProto:
    return canonicals["resnet"].model


@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_canonical_models_lint_clean(canonicals, kind):
    c = canonicals[kind]
    assert lint(c.model) == []
    assert lint(onnx.load(str(c.path))) == []  # the file on disk too
    assert lint(c.model, tensorrt_only=True) == []


# ------------------------------------------------------------------------------ mutations
def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _replace_init(model: onnx.ModelProto, array: np.ndarray, name: str) -> None:
    init = _init(model, name)
    init.CopyFrom(numpy_helper.from_array(array, name))


def _first(model: onnx.ModelProto, op_type: str, pred: Callable[[onnx.NodeProto], bool] = lambda n: True) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type and pred(n))


def _weight_dq_of(model: onnx.ModelProto, consumer: onnx.NodeProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == consumer.input[1])


def _activation_qdq(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The first activation Q/DQ pair behind a Relu (resnet: the stem's output)."""
    relu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    q = _first(model, "QuantizeLinear", lambda n: n.input[0] in relu_outputs)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    return q, dq


def _square_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    """A Conv whose weight has as many input as output channels (16 -> 16)."""
    inits = {i.name for i in model.graph.initializer}

    def square(n):
        dq = _weight_dq_of(model, n)
        if dq.input[0] not in inits:
            return False
        dims = _init(model, dq.input[0]).dims
        return len(dims) == 4 and dims[0] == dims[1] > 1

    return _first(model, "Conv", square)


def m_opset11(m):
    m.opset_import[0].version = 11
    return m.graph.name


def m_opset17(m):
    m.opset_import[0].version = 17
    return m.graph.name


def m_unnamed(m):
    conv = _first(m, "Conv")
    index = list(m.graph.node).index(conv)
    conv.name = ""
    return f"#{index} (Conv)"


def m_duplicate(m):
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    convs[1].name = convs[0].name
    return convs[0].name


def m_metadata(m):
    keep = [p for p in m.metadata_props if p.key != META_SOURCE_HASH]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    return m.graph.name


def m_zero_point(m):
    q, dq = _activation_qdq(m)
    m.graph.initializer.append(numpy_helper.from_array(np.array(3, np.int8), "zp_three"))
    q.input[2] = dq.input[2] = "zp_three"
    return q.name


def m_uint8_zero_point(m):
    q, dq = _activation_qdq(m)
    m.graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), "zp_uint8"))
    q.input[2] = dq.input[2] = "zp_uint8"
    return q.name


def m_int32_bias(m):
    conv = _first(m, "Conv", lambda n: len(n.input) > 2 and bool(n.input[2]))
    bias = numpy_helper.to_array(_init(m, conv.input[2]))
    m.graph.initializer.extend([
        numpy_helper.from_array(np.round(bias / 1e-4).astype(np.int32), "bias_int32"),
        numpy_helper.from_array(np.array(1e-4, np.float32), "bias_int32_scale"),
        numpy_helper.from_array(np.array(0, np.int32), "bias_int32_zero_point"),
    ])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["bias_int32", "bias_int32_scale", "bias_int32_zero_point"],
                                            ["bias_dequantized"], name="bias_DequantizeLinear"))
    conv.input[2] = "bias_dequantized"
    return conv.name


def m_per_channel_activation(m):
    q, dq = _activation_qdq(m)
    s = float(numpy_helper.to_array(_init(m, q.input[1])))
    m.graph.initializer.extend([numpy_helper.from_array(np.full(16, s, np.float32), "pc_scale"),
                                numpy_helper.from_array(np.zeros(16, np.int8), "pc_zero_point")])
    for node in (q, dq):
        node.input[1], node.input[2] = "pc_scale", "pc_zero_point"
        node.attribute.append(helper.make_attribute("axis", 1))
    return dq.name


def m_dq_not_from_q(m):
    q, dq = _activation_qdq(m)
    cast = helper.make_node("Cast", [q.input[0]], ["relu_as_int8"], name="cast_to_int8", to=TensorProto.INT8)
    m.graph.node.insert(list(m.graph.node).index(dq), cast)
    dq.input[0] = "relu_as_int8"
    return dq.name


def m_qdq_scale_mismatch(m):
    q, dq = _activation_qdq(m)
    s = float(numpy_helper.to_array(_init(m, q.input[1])))
    m.graph.initializer.append(numpy_helper.from_array(np.array(2 * s, np.float32), "other_scale"))
    dq.input[1] = "other_scale"
    return dq.name


def m_weight_minus_128(m):
    dq = _weight_dq_of(m, _first(m, "Conv"))
    w = numpy_helper.to_array(_init(m, dq.input[0])).copy()
    w.flat[0] = -128
    _replace_init(m, w, dq.input[0])
    return dq.name


def m_weight_axis1(m):
    dq = _weight_dq_of(m, _square_conv(m))
    next(a for a in dq.attribute if a.name == "axis").i = 1
    return dq.name


def m_weight_per_tensor(m):
    dq = _weight_dq_of(m, _square_conv(m))
    scale = numpy_helper.to_array(_init(m, dq.input[1]))
    _replace_init(m, np.array(scale.max(), np.float32), dq.input[1])
    _replace_init(m, np.array(0, np.int8), dq.input[2])
    keep = [a for a in dq.attribute if a.name != "axis"]
    del dq.attribute[:]
    dq.attribute.extend(keep)
    return dq.name


def m_conv_input_float(m):
    q, dq = _activation_qdq(m)
    conv = _first(m, "Conv", lambda n: n.input[0] == dq.output[0])
    conv.input[0] = q.input[0]
    return conv.name


def m_residual_one_side(m):
    dq_outputs = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    add = _first(m, "Add", lambda n: all(i in dq_outputs for i in n.input))
    dq = next(n for n in m.graph.node if n.output[0] == add.input[1])
    q = next(n for n in m.graph.node if n.output[0] == dq.input[0])
    add.input[1] = q.input[0]
    return add.name


def m_table_scale(m):
    q, _ = _activation_qdq(m)
    meta = next(p for p in m.metadata_props if p.key == META_TABLE)
    table = json.loads(meta.value)
    table[q.input[0]][1] *= 2.0  # [amax, scale, min, max]
    meta.value = json.dumps(table)
    return q.name


MUTATIONS = {
    # rule, mutation, TensorRT would reject it
    "opset 11": ("opset", m_opset11, True),
    "opset 17": ("opset", m_opset17, False),
    "unnamed node": ("node-names", m_unnamed, False),
    "duplicate name": ("node-names", m_duplicate, False),
    "missing metadata": ("metadata", m_metadata, False),
    "non-zero zero point": ("zero-point", m_zero_point, True),
    "uint8 zero point": ("dq-input-type", m_uint8_zero_point, True),
    "int32 bias DQ": ("float-bias", m_int32_bias, True),
    "per-channel activation": ("activation-per-tensor", m_per_channel_activation, False),
    "DQ not fed by Q": ("qdq-pair", m_dq_not_from_q, False),
    "Q/DQ scale mismatch": ("qdq-pair", m_qdq_scale_mismatch, False),
    "weight -128": ("weight-range", m_weight_minus_128, False),
    "weight axis 1": ("weight-axis", m_weight_axis1, True),
    "per-tensor weight": ("weight-axis", m_weight_per_tensor, False),
    "conv input float": ("compute-inputs-quantized", m_conv_input_float, False),
    "residual add one side": ("residual-add", m_residual_one_side, False),
    "table scale": ("table-scale", m_table_scale, False),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_mutation_breaks_its_rule(resnet, case):
    rule, mutate, tensorrt = MUTATIONS[case]
    assert rule in RULES
    m = onnx.ModelProto()
    m.CopyFrom(resnet)
    node = mutate(m)
    violations = lint(m)
    hits = [v for v in violations if v.rule == rule and v.node == node]
    assert hits, f"no '{rule}' violation on '{node}'; got: {[str(v) for v in violations]}"
    assert node in str(hits[0]) and rule in str(hits[0])
    trt = lint(m, tensorrt_only=True)
    assert all(v.tensorrt for v in trt)
    assert (rule, node) in {(v.rule, v.node) for v in trt} if tensorrt else (rule, node) not in {
        (v.rule, v.node) for v in trt if v.rule == rule}
    assert lint(resnet) == []  # the fixture stayed intact


def test_int32_bias_dq_is_also_a_non_int8_dq_input(resnet):
    m = onnx.ModelProto()
    m.CopyFrom(resnet)
    m_int32_bias(m)
    rules = {(v.rule, v.node) for v in lint(m, tensorrt_only=True)}
    assert ("dq-input-type", "bias_DequantizeLinear") in rules


# ------------------------------------------------------------------------------ hand-made graphs
def _qdq(tensor: str, scale: float, tag: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_scale"),
             numpy_helper.from_array(np.array(0, np.int8), f"{tag}_zp")]
    nodes = [helper.make_node("QuantizeLinear", [tensor, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"], name=f"{tag}_Q"),
             helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"], name=f"{tag}_DQ")]
    return nodes, inits, f"{tag}_dq"


def _model(nodes, inits, inputs, outputs, table: dict | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "handmade", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", canonical.OPSET)])
    meta = {k: "x" for k in canonical.REQUIRED_METADATA}
    meta[META_TABLE] = json.dumps({t: [s * 127, s, -s * 127, s * 127] for t, s in (table or {}).items()})
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_concat_inputs_with_different_scales():
    na, ia, a = _qdq("a", 0.1, "a")
    nb, ib, b = _qdq("b", 0.2, "b")
    cat = helper.make_node("Concat", [a, b], ["y"], name="the_concat", axis=1)
    m = _model(na + nb + [cat], ia + ib, [_vi("a", [1, 4]), _vi("b", [1, 4])], [_vi("y", [1, 8])])
    assert ("concat-scale", "the_concat") in {(v.rule, v.node) for v in lint(m)}
    # same scale on both inputs: clean
    nb, ib, b = _qdq("b", 0.1, "b")
    m = _model(na + nb + [helper.make_node("Concat", [a, b], ["y"], name="the_concat", axis=1)], ia + ib,
               [_vi("a", [1, 4]), _vi("b", [1, 4])], [_vi("y", [1, 8])])
    assert lint(m) == []


def test_concat_table_scales_differ():
    """Concat inputs left float but with different scales in the table break the rule too."""
    cat = helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)
    m = _model([cat], [], [_vi("a", [1, 4]), _vi("b", [1, 4])], [_vi("y", [1, 8])], {"a": 0.1, "b": 0.1, "y": 0.3})
    assert [(v.rule, v.node) for v in lint(m)] == [("concat-scale", "cat")]


def test_scale_preserving_op_with_different_table_scales():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="the_pool", kernel_shape=[2, 2], strides=[2, 2])]
    inputs, outputs = [_vi("x", [1, 1, 4, 4])], [_vi("y", [1, 1, 2, 2])]
    m = _model(nodes, [], inputs, outputs, {"x": 0.1, "r": 0.1, "y": 0.05})
    assert [(v.rule, v.node) for v in lint(m)] == [("scale-preserving", "the_pool")]
    assert lint(_model(nodes, [], inputs, outputs, {"x": 0.1, "r": 0.1, "y": 0.1})) == []


def test_mobilenet_concat_shares_scale_and_breaks_when_table_changed(canonicals):
    m = onnx.ModelProto()
    m.CopyFrom(canonicals["mobilenet"].model)
    cat = _first(m, "Concat")
    meta = next(p for p in m.metadata_props if p.key == META_TABLE)
    table = json.loads(meta.value)
    table[cat.output[0]][1] *= 1.5
    meta.value = json.dumps(table)
    assert ("concat-scale", cat.name) in {(v.rule, v.node) for v in lint(m)}


def test_every_rule_has_a_test():
    covered = {rule for rule, _, _ in MUTATIONS.values()} | {"concat-scale", "scale-preserving"}
    covered |= {"profile", "float-layers", "shared-zero-point"}  # tests/test_profiles.py
    assert covered == set(RULES)


# ------------------------------------------------------------------------------ CLI
def test_inspect_lint_cli_clean_and_broken(canonicals, tmp_path, capsys):
    from deploykit.cli import main

    clean = canonicals["resnet"].path
    assert main(["inspect", str(clean), "--lint"]) == 0
    out = capsys.readouterr().out
    assert "lint: clean" in out

    m = onnx.ModelProto()
    m.CopyFrom(canonicals["resnet"].model)
    node = m_residual_one_side(m)
    broken = tmp_path / "broken.qdq.onnx"
    onnx.save(m, str(broken))
    assert main(["inspect", str(broken), "--lint"]) == 1
    captured = capsys.readouterr()
    assert "residual-add" in captured.out and f"'{node}'" in captured.out
    assert "1 lint violation" in captured.err

    # --tensorrt: the residual Add rule is not one TensorRT's parser enforces
    assert main(["inspect", str(broken), "--lint", "--tensorrt"]) == 0
    capsys.readouterr()

    m = onnx.ModelProto()
    m.CopyFrom(canonicals["resnet"].model)
    node = m_weight_axis1(m)
    onnx.save(m, str(broken))
    assert main(["inspect", str(broken), "--lint", "--tensorrt", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert {"rule": "weight-axis", "node": node} in [{k: v[k] for k in ("rule", "node")} for v in info["lint"]]


def test_inspect_lint_subprocess_exit_code(canonicals, tmp_path):
    """The installed console script: exit 1 and the node named on a broken model."""
    import shutil
    import subprocess

    exe = shutil.which("deploykit")
    if exe is None:
        pytest.skip("the deploykit console script is not on PATH (pip install -e .)")
    m = onnx.ModelProto()
    m.CopyFrom(canonicals["resnet"].model)
    node = m_conv_input_float(m)
    broken = tmp_path / "broken.qdq.onnx"
    onnx.save(m, str(broken))
    proc = subprocess.run([exe, "inspect", str(broken), "--lint"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "compute-inputs-quantized" in proc.stdout and node in proc.stdout


def test_inspect_refuses_missing_and_corrupt_files(tmp_path, capsys):
    from deploykit.cli import main

    assert main(["inspect", str(tmp_path / "none.onnx"), "--lint"]) == 2
    assert "none.onnx: model file not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\xff" * 64)
    assert main(["inspect", str(corrupt), "--lint"]) == 2
    err = capsys.readouterr().err
    assert "corrupt.onnx: not a valid ONNX model" in err and err.count("\n") == 1
