"""Place Q/DQ by the canonical rules (deploykit/canonical.py) and build the table."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import AbstractSet, Any, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.canonical import (
    ASYMMETRIC,
    COMPUTE_OPS,
    CONCAT,
    INT8_MAX,
    POOLING_OPS,
    SYMMETRIC,
    CalibrationTable,
    QdqGraph,
    TensorRange,
    activation_scale,
    asymmetric_params,
    attrs,
    preserves_scale,
    weight_axis,
    zero_centred,
)
from deploykit.quantize.observe import TensorStats

#: Element-wise activations a Conv's output may pass through before a residual Add.
_CONV_EPILOGUE = frozenset({"Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid", "Mul", "BatchNormalization"})


def shared_scale_groups(model: onnx.ModelProto, tensors: set[str]) -> list[set[str]]:
    """Tensors that must share one scale: through scale-preserving ops and Concat."""
    parent = {t: t for t in tensors}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        if a in parent and b in parent:
            parent[find(a)] = find(b)

    for node in model.graph.node:
        if preserves_scale(node) and node.input and node.output:
            union(node.input[0], node.output[0])
        elif node.op_type == CONCAT:
            for inp in node.input:
                union(inp, node.output[0])
    groups: dict[str, set[str]] = defaultdict(set)
    for t in tensors:
        groups[find(t)].add(t)
    return list(groups.values())


def build_table(model: onnx.ModelProto, stats: Mapping[str, TensorStats], amax: Mapping[str, float],
                profile: str = SYMMETRIC) -> CalibrationTable:
    """Per-tensor thresholds -> table; each shared-scale group shares one scale and zero point.

    Symmetric: the group's largest threshold. Asymmetric: the union of the members' observed
    ranges, each clipped to its threshold (so a histogram method still trims outliers), with
    the zero point of :func:`asymmetric_params`.
    """
    if profile not in (SYMMETRIC, ASYMMETRIC):
        raise ValueError(f"unknown activation profile {profile!r}")
    table = CalibrationTable()
    b_operands = matmul_b_operands(model)
    for group in shared_scale_groups(model, set(amax)):
        top = max(amax[t] for t in group)
        observed_min = min((float(stats[t].min) for t in group if t in stats), default=float("nan"))
        if zero_centred(profile, bool(group & b_operands), observed_min):
            scale, zp = activation_scale(top), 0
        else:
            lo = min(max(float(stats[t].min), -amax[t]) for t in group)
            hi = max(min(float(stats[t].max), amax[t]) for t in group)
            scale, zp = asymmetric_params(lo, hi)
            top = max(abs(min(lo, 0.0)), abs(max(hi, 0.0))) if np.isfinite(lo) and np.isfinite(hi) else 0.0
        for t in group:
            table[t] = TensorRange(top, scale, float(stats[t].min), float(stats[t].max), zp)
    return table


def matmul_b_operands(model: onnx.ModelProto) -> set[str]:
    """Both inputs of every activation x activation MatMul (attention's QK^T and PV).

    They keep zero point 0 in the asymmetric profile too, except an operand that is never
    negative (canonical.zero_centred). OpenVINO's CPU plugin runs an activation x activation
    MatMul in f32 when either operand has a zero point (measured: 8 of 12 int8 -> 12 of 12), so
    its lowering re-encodes a -128 operand as uint8 with zero point 0, the same grid
    (deploykit_openvino.backend).
    """
    inits = {i.name for i in model.graph.initializer}
    return {i for n in model.graph.node for i in n.input[:2]
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[0] not in inits and n.input[1] not in inits}


def placement(model: onnx.ModelProto, float_layers: AbstractSet[str] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Node name -> indices of its activation inputs that read through a Q/DQ pair.

    The canonical placement rules: activation inputs of Conv/ConvTranspose/Gemm/MatMul (both
    inputs of an activation x activation MatMul); the input of a pooling op (max, average,
    global, spatial ReduceMean) over a rank-4 activation; both inputs of a residual Add of two rank-4
    tensors where one comes from a Conv; every input of a Concat whose output is quantized.
    Anything else (LayerNorm, Softmax, the attention-mask Add) stays float, and so do the
    nodes in ``float_layers`` (declared float islands).
    """
    g = QdqGraph(model)
    ranks = _ranks(model)
    wrap: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        if node.name in float_layers:
            continue
        if node.op_type in COMPUTE_OPS:
            idx = tuple(i for i in (0, 1) if i < len(node.input) and node.input[i] and node.input[i] not in g.initializers)
            if idx:
                wrap[node.name] = idx
        elif node.op_type in POOLING_OPS and ranks.get(node.input[0]) == 4 and node.input[0] not in g.initializers:
            wrap[node.name] = (0,)
        elif node.op_type == "Add" and len(node.input) == 2 and not any(i in g.initializers for i in node.input):
            if all(ranks.get(i) == 4 for i in node.input) and any(_from_conv(g, i) for i in node.input):
                wrap[node.name] = (0, 1)  # residual Add: TensorRT fuses Conv+Add with both inputs int8
    changed = True
    while changed:  # a quantized Concat output quantizes its inputs too (one shared scale, int8 concat)
        changed = False
        quantized = _wrapped_tensors(model, wrap)
        for node in model.graph.node:
            if node.op_type == CONCAT and node.output[0] in quantized and node.name not in wrap \
                    and node.name not in float_layers:
                wrap[node.name] = tuple(i for i, t in enumerate(node.input) if t not in g.initializers)
                changed = True
    return wrap


def _wrapped_tensors(model: onnx.ModelProto, wrap: Mapping[str, tuple[int, ...]]) -> set[str]:
    return {n.input[i] for n in model.graph.node if n.name in wrap for i in wrap[n.name]}


def _from_conv(g: QdqGraph, tensor: str, depth: int = 2) -> bool:
    node = g.producer.get(tensor)
    while node is not None and depth >= 0:
        if node.op_type in ("Conv", "ConvTranspose"):
            return True
        if node.op_type not in _CONV_EPILOGUE:
            return False
        node = g.producer.get(node.input[0])
        depth -= 1
    return False


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            out[vi.name] = len(vi.type.tensor_type.shape.dim)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:/-]", "_", name)


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range int8 per-channel (or per-tensor) weights: (int8 values, scales)."""
    w = w.astype(np.float32)
    if axis is None:
        amax_all = float(np.abs(w).max(initial=0.0))
        scalar = np.float32(amax_all / INT8_MAX) if amax_all > 0 else np.float32(1.0)
        q = np.clip(np.round(w / scalar), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q, np.asarray(scalar, np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def insert_qdq(model: onnx.ModelProto, table: CalibrationTable,
               float_layers: AbstractSet[str] = frozenset()) -> onnx.ModelProto:
    """Return a copy of ``model`` with Q/DQ placed by the canonical rules (zero points from
    ``table``); the nodes in ``float_layers`` keep float inputs and float weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = QdqGraph(out)
    graph = out.graph
    wrap = placement(out, float_layers)
    activations = _wrapped_tensors(out, wrap)
    missing = [t for t in activations if t not in table]
    if missing:
        raise ValueError(f"no calibrated range for tensors {missing[:5]}")

    new_inits: list[onnx.TensorProto] = []
    head_nodes: list[onnx.NodeProto] = []  # weight DQs and Q/DQ of graph inputs
    after: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # producer node name -> Q/DQ after it
    dq_of: dict[str, str] = {}
    weight_dq: dict[tuple[str, int | None], str] = {}
    zp0 = "deploykit_zero_point_int8"
    new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp0))

    for t in sorted(activations):
        s = _safe(t)
        scale_name = f"{s}_scale"
        new_inits.append(numpy_helper.from_array(np.array(table.scale(t), np.float32), scale_name))
        zp = zp0
        if table.zero_point(t):
            zp = f"{s}_zero_point"
            new_inits.append(numpy_helper.from_array(np.array(table.zero_point(t), np.int8), zp))
        q = helper.make_node("QuantizeLinear", [t, scale_name, zp], [f"{s}_quantized"], name=f"{s}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{s}_quantized", scale_name, zp], [f"{s}_dequantized"],
                              name=f"{s}_DequantizeLinear")
        producer = g.producer.get(t)
        (after[producer.name] if producer is not None else head_nodes).extend([q, dq])
        dq_of[t] = dq.output[0]

    for node in graph.node:
        for idx in wrap.get(node.name, ()):
            node.input[idx] = dq_of[node.input[idx]]
        if node.op_type not in COMPUTE_OPS or node.name in float_layers:
            continue
        for idx in range(min(2, len(node.input))):
            name = node.input[idx]
            if name in g.initializers:
                w = g.const(name)
                if w is None or w.dtype != np.float32:
                    continue
                axis = weight_axis(node.op_type, attrs(node), w.ndim) if idx == 1 and w.ndim > 1 else None
                key = (name, axis)
                if key not in weight_dq:
                    s = _safe(name) + ("" if axis is None else f"_axis{axis}")
                    w_int8, w_scale = quantize_weight(w, axis)
                    new_inits += [numpy_helper.from_array(w_int8, f"{s}_quantized"),
                                  numpy_helper.from_array(w_scale, f"{s}_scale"),
                                  numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"{s}_zero_point")]
                    kwargs: dict[str, Any] = {} if axis is None else {"axis": axis}
                    head_nodes.append(helper.make_node(
                        "DequantizeLinear", [f"{s}_quantized", f"{s}_scale", f"{s}_zero_point"], [f"{s}_dequantized"],
                        name=f"{s}_DequantizeLinear", **kwargs))
                    weight_dq[key] = f"{s}_dequantized"
                node.input[idx] = weight_dq[key]

    nodes = list(head_nodes)
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(nodes)
    # weights now live as int8 copies; drop float originals nobody reads any more
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [i for i in new_inits if i.name in used])
    return out
