"""Attention's never-negative operands as uint8, so OpenVINO keeps their MatMuls int8.

In the asymmetric profile the canonical model puts a never-negative operand of an activation x
activation MatMul (attention's softmax probabilities) on int8 with zero point -128: [0, max] in
256 steps (deploykit.quantize.place.matmul_b_operands). OpenVINO's CPU plugin runs an activation x
activation MatMul in f32 when either operand's quantization has a zero point; uint8 with zero
point 0 and the same scale is the same grid (``q_u8 = q_i8 + 128``, the same real values), and
with it the MatMul runs int8. So the lowering re-encodes those Q/DQ pairs, nothing else.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.canonical import INT8_MIN, QdqGraph


def uint8_operands(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose int8 zero-point -128 operands of activation x activation
    MatMuls are uint8 with zero point 0 (their QuantizeLinear and every DequantizeLinear of it),
    and the tensors re-encoded; ``model`` itself when there are none."""
    g = QdqGraph(model)
    quantizers: dict[str, onnx.NodeProto] = {}  # Q output -> Q
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        dqs = [g.dq_feeding(t) for t in node.input[:2]]
        if not all(dq is not None and not g.is_weight_dq(dq) for dq in dqs):
            continue  # a weight MatMul, or an operand not read through Q/DQ
        for dq in dqs:
            assert dq is not None
            p = g.params(dq)
            q = g.producer.get(dq.input[0])
            if (q is not None and q.op_type == "QuantizeLinear" and p.zero_point.dtype == np.int8
                    and int(p.zero_point.reshape(-1)[0]) == INT8_MIN):
                quantizers[q.output[0]] = q
    if not quantizers:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {n.name: n for n in out.graph.node}
    zero = "deploykit_uint8_zero_point"
    out.graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zero))
    recoded = []
    for q_out, q in quantizers.items():
        copy = by_name[q.name]
        copy.input[2] = zero
        for reader in g.consumers.get(q_out, []):
            if reader.op_type == "DequantizeLinear":
                by_name[reader.name].input[2] = zero
        recoded.append(q.input[0])
    return out, recoded
