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
