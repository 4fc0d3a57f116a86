"""A tiny ONNX classifier built with onnx.helper alone (no torch): for tests and benches of
the command line, where the model only has to be valid, fast and shaped like a CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_classifier(path: Path | str, size: int = 8, classes: int = 4, opset: int = 18, ir_version: int | None = None,
                    inits_as_inputs: bool = False, batch: int | str = "N") -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm on input ``x`` [batch, 3, size, size].

    ``inits_as_inputs``: list every weight as a graph input too (the IR-3 model-zoo layout)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B"),
             numpy_helper.from_array(rng.standard_normal((classes, 8)).astype(np.float32), "G"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "GB")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "GB"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])]
    if inits_as_inputs:
        inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, [output], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or (8 if opset >= 18 else 3)
    onnx.save(model, str(path))
    return Path(path)


def pair_saturating_net(channels: int = 8, size: int = 12) -> onnx.ModelProto:
    """``x`` [N, 4, size, size] -> Conv "hot" -> Relu -> Conv "cool" -> ``y``, shaped for the int16
    pair sums of u8 x s8 kernels without VNNI (deploykit/quantize/saturation.py): "hot" has
    positive weights on every input channel, so with inputs near the top of their range two
    adjacent channels' products add up past 32,767; "cool" alternates the sign of adjacent input
    channels' weights, so no pair of its products can."""
    rng = np.random.default_rng(0)
    hot = rng.uniform(0.5, 1.0, (channels, 4, 3, 3)).astype(np.float32)
    cool = rng.uniform(0.5, 1.0, (4, channels, 1, 1)).astype(np.float32) / channels
    cool[:, 1::2] *= -1
    nodes = [helper.make_node("Conv", ["x", "w_hot"], ["h"], name="hot", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w_cool"], ["y"], name="cool")]
    graph = helper.make_graph(nodes, "pair_saturating_net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, size, size])],
                              [numpy_helper.from_array(hot, "w_hot"), numpy_helper.from_array(cool, "w_cool")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def pair_saturating_mlp(features: int = 16, hidden: int = 8) -> onnx.ModelProto:
    """``x`` [N, features] -> MatMul "hot" -> Relu -> MatMul "cool" -> ``y``: the MatMul (fully
    connected) counterpart of :func:`pair_saturating_net`, pairs along K."""
    rng = np.random.default_rng(0)
    hot = rng.uniform(0.5, 1.0, (features, hidden)).astype(np.float32)
    cool = rng.uniform(0.5, 1.0, (hidden, 4)).astype(np.float32) / hidden
    cool[1::2] *= -1
    nodes = [helper.make_node("MatMul", ["x", "w_hot"], ["h"], name="hot"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w_cool"], ["y"], name="cool")]
    graph = helper.make_graph(nodes, "pair_saturating_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(hot, "w_hot"), numpy_helper.from_array(cool, "w_cool")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
