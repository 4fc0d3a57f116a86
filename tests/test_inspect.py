"""`deploykit inspect`: the domains the nodes use, inputs and outputs typed, metadata escaped."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploykit.cli import main
from deploykit.model import normalise, used_domains
from deploykit.tables import escape, render


def _model(output_typed: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = (helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]) if output_typed
         else helper.make_empty_tensor_value_info("y"))  # files often leave the output's type out
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid("ai.onnx.training", 1)])
    model.ir_version = 9
    model.metadata_props.add(key="author", value="evil\x1b]0;owned\x07 \x1b[2Jname\nnext")
    return model


def test_inspect_json_shows_used_domains_and_typed_outputs(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] == {"ai.onnx": 18}
    assert info["opset_declared_unused"] == ["ai.onnx.training", "com.microsoft"]
    assert info["ir_version"] == 9
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", "4"]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", "3"]}]  # from shape inference
    assert info["ops"] == {"MatMul": 1, "Relu": 1}


def test_inspect_text_escapes_control_characters(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_model(output_typed=True), str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "author: evil\\x1b]0;owned\\x07 \\x1b[2Jname\\nnext" in out
    assert "opset domains used: ai.onnx 18" in out
    assert "declared but unused: ai.onnx.training, com.microsoft" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["input", "x", "float32", "[batch,", "4]"] in rows
    assert ["output", "y", "float32", "[batch,", "3]"] in rows
    assert all(line == line.rstrip() for line in out.splitlines())  # piped: no padding at line ends


def test_used_domains_counts_custom_ops_and_subgraphs():
    model = _model()
    model.graph.node.append(helper.make_node("FusedGemm", ["y", "w"], ["z"], domain="com.microsoft"))
    assert used_domains(model) == {"ai.onnx", "com.microsoft"}
    body = helper.make_graph([helper.make_node("Custom", [], ["o"], domain="my.domain")], "b", [],
                             [helper.make_empty_tensor_value_info("o")])
    model.graph.node.append(helper.make_node("If", ["c"], ["r"], then_branch=body, else_branch=body))
    assert "my.domain" in used_domains(model)


def test_normalise_declares_only_used_domains():
    out = normalise(_model(output_typed=True), "m.onnx")
    declared = {o.domain or "ai.onnx" for o in out.opset_import}
    assert declared == {"ai.onnx"}


def test_tables_plain_when_piped_rich_on_a_terminal():
    plain = render(["name", "p50 ms"], [["onnxruntime", "0.123"], ["tflite", "[b]1.5"]], right=[1])
    assert plain.splitlines() == ["name         p50 ms", "onnxruntime   0.123", "tflite       [b]1.5"]
    tty = render(["name", "p50 ms"], [["onnxruntime", "0.123"]], tty=True)
    assert "\x1b[" in tty and "onnxruntime" in tty  # styled header on a terminal
    assert escape("a\tb\x1bc é") == "a\\tb\\x1bc é"
