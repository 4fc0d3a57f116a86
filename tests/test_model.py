"""Loading and normalising the FP32 model: refused inputs name the file (and tensor), and
normalise() folds BatchNorm, converts the opset and makes node names unique without changing
what the model computes (checked in onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.canonical import OPSET
from deploykit.errors import ModelError
from deploykit.model import input_specs, load_onnx, normalise, unique_node_names
from deploykit.ortsession import session


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model, exact=True).run(None, feeds)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _matmul_model(opset: int = OPSET, weight: np.ndarray | None = None) -> onnx.ModelProto:
    w = weight if weight is not None else np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ load_onnx
def test_missing_model_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelError) as exc:
        load_onnx(path)
    msg = _one_line(exc)
    assert str(path) in msg and "not found" in msg


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ModelError, match="not a file"):
        load_onnx(tmp_path)


def test_corrupt_file_random_bytes(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError) as exc:
        load_onnx(path)
    assert str(path) in _one_line(exc)


def test_empty_graph(tmp_path):
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    path = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    with pytest.raises(ModelError) as exc:
        load_onnx(path)
    msg = _one_line(exc)
    assert str(path) in msg and "no nodes" in msg


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def test_external_data_inside_folder_loads(tmp_path):
    w = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    path = tmp_path / "ext.onnx"
    _save_external(_matmul_model(weight=w), path, "weights.bin")
    assert (tmp_path / "weights.bin").is_file()
    model = load_onnx(path)
    loaded = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(loaded, w)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], x @ w, rtol=1e-6)


@pytest.mark.parametrize("escape", ["../x.bin", "ABSOLUTE"])
def test_external_data_outside_folder_is_refused(tmp_path, escape):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = model_dir / "ext.onnx"
    _save_external(_matmul_model(), path, "w.bin")
    # the escaping file really exists: only the location may be the reason for refusal
    outside = tmp_path / "x.bin"
    outside.write_bytes((model_dir / "w.bin").read_bytes())
    location = str(outside) if escape == "ABSOLUTE" else escape
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(path))
    with pytest.raises(ModelError) as exc:
        load_onnx(path)
    msg = _one_line(exc)
    assert str(path) in msg
    assert "'w'" in msg  # the tensor
    assert location in msg and "outside" in msg


def test_external_data_file_missing(tmp_path):
    path = tmp_path / "ext.onnx"
    _save_external(_matmul_model(), path, "w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError) as exc:
        load_onnx(path)
    msg = _one_line(exc)
    assert str(path) in msg and "'w'" in msg and "missing" in msg


def test_input_specs_skip_initializers_and_keep_symbolic_dims():
    model = _matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))
    specs = input_specs(model)
    assert list(specs) == ["x"]
    assert specs["x"][0] == ["N", 4]
    assert specs["x"][1] == np.float32


# ------------------------------------------------------------------------------ normalise
def _conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    c_in, c_out = 3, 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c_out).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c_out).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
    ]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_normalise_folds_batchnorm_into_conv():
    rng = np.random.default_rng(0)
    model = _conv_bn_model(rng)
    onnx.checker.check_model(model)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = _run(model, {"x": x})[0]
    norm = normalise(model, "convbn.onnx")
    ops = [n.op_type for n in norm.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 1
    np.testing.assert_allclose(_run(norm, {"x": x})[0], expected, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_when_optimiser_leaves_it():
    """The hand-written fold (for a BN the optimiser kept) gives the same numbers too."""
    from deploykit.model import _fold_batchnorm

    rng = np.random.default_rng(3)
    model = _conv_bn_model(rng)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = _run(model, {"x": x})[0]
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    _fold_batchnorm(folded)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    np.testing.assert_allclose(_run(folded, {"x": x})[0], expected, atol=1e-5, rtol=1e-5)


def test_normalise_converts_opset_13_to_18():
    # ReduceMean's axes moved from an attribute to an input at opset 18: a real conversion
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["y"], name="mean", axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    expected = _run(model, {"x": x})[0]
    norm = normalise(model)
    assert _opset(norm) == OPSET
    onnx.checker.check_model(norm)
    np.testing.assert_allclose(_run(norm, {"x": x})[0], expected, rtol=1e-6)


def test_normalise_makes_node_names_unique_and_non_empty():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="dup"),
             helper.make_node("Neg", ["a"], ["b"], name="dup"),
             helper.make_node("Abs", ["b"], ["c"], name=""),
             helper.make_node("Sigmoid", ["c"], ["y"], name="")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    norm = normalise(model)
    names = [n.name for n in norm.graph.node]
    assert all(names), names
    assert len(set(names)) == len(names), names
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    expected = 1 / (1 + np.exp(-np.abs(-np.maximum(x, 0))))  # onnxruntime itself refuses the original
    np.testing.assert_allclose(_run(norm, {"x": x})[0], expected, rtol=1e-6)


def test_unique_node_names_in_place():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Relu", ["a"], ["b"], name="n"),
             helper.make_node("Relu", ["b"], ["c"], name="n"), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    unique_node_names(model)
    names = [n.name for n in model.graph.node]
    assert names[0] == "n" and len(set(names)) == 4 and all(names)


def test_fold_batchnorm_convs_sharing_a_weight():
    """Two Convs sharing one weight, each with its own BN: two distinct folded weights."""
    from deploykit.model import _fold_batchnorm

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = []
    for k in (1, 2):
        inits += [numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"g{k}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"b{k}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"m{k}"),
                  numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"v{k}")]
        nodes += [helper.make_node("Conv", ["x", "w"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"], [f"y{k}"],
                                   name=f"bn{k}")]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = _run(model, {"x": x})[0]
    for folded in (normalise(model), _fold_batchnorm(onnx.load_from_string(model.SerializeToString()))):
        assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
        names = [i.name for i in folded.graph.initializer]
        assert len(names) == len(set(names)), names
        onnx.checker.check_model(folded, full_check=True)
        np.testing.assert_allclose(_run(folded, {"x": x})[0], expected, atol=1e-5, rtol=1e-5)
