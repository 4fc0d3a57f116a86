"""The overflow fix for CPUs without VNNI, done exactly: a layer's int8 weights split in two
halves that cannot saturate.

Without VNNI, OpenVINO's int8 convolutions and fully connected layers (MatMul / Gemm with a
weight) multiply u8 activations by s8 weights with
``vpmaddubsw``, which adds each pair of products into a saturating int16: 2 x 255 x 127 =
64,770 > 32,767 (deploykit/cpu.py). NNCF's answer (``OverflowFix.FIRST_LAYER``, its default) is
to quantize the first convolution's weights to 7 bits, which changes the model. Here the
canonical int8 weights ``q`` are split instead, per element, into ``a = q - floor(q / 2)`` and
``b = floor(q / 2)``: both within [-64, 64], so 2 x 255 x 64 = 32,640 fits an int16 and neither
half saturates, and ``a + b = q`` exactly. The layer becomes two int8 layers of its type on the
same quantized input with the canonical weight scales (the bias on the first), summed in float:
the canonical model's value, computed without saturation, at twice that layer's int8 compute.

Which layers to split (``overflow_fix``): ``saturating`` those whose int16 pair sums the
canonical model's calibration record says saturate (deploykit/quantize/saturation.py: relative
output error above ``overflow_threshold``), ``first_layer`` the convolutions reading the model
input (NNCF's choice, for a model without the record), ``all`` every dense convolution and
weighted MatMul / Gemm.

Measured on an AVX2 CPU without VNNI (docs/performance.md): on EfficientNet-Lite0 splitting only
the stem convolution took OpenVINO's top-1 agreement with FP32 from 69.7% to 81.6%, and splitting
the 16 of 33 dense convolutions whose recorded error is above 1% matches splitting all 33; on
all-MiniLM-L6-v2 splitting the weighted MatMuls took the embedding cosine from 0.9953 to the
canonical model's 0.9971.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.canonical import QdqGraph, attrs
from deploykit.quantize import saturation

#: ``overflow_fix`` values: which layers (dense convs, weighted MatMul / Gemm) are split
MODES = ("auto", "saturating", "first_layer", "all", "none")
#: default ``overflow_threshold``: a relative output error about an int8 layer's own rounding error
THRESHOLD = 0.01
#: suffix of the halves: ``node/split_a`` and ``node/split_b`` map back to ``node`` in the
#: precision audit (it strips "/..." suffixes); their float sum is named apart (SUM_PREFIX), so
#: the audit does not take that elementwise Add for the split layer
SUFFIX = "/split"
SUM_PREFIX = "deploykit_split_sum_"


def first_layer_convs(model: onnx.ModelProto) -> list[str]:
    """Quantized Convs whose activation input is a model input behind its Q/DQ (NNCF's "first
    layer": the input spans the whole int8 range, the worst case for saturation)."""
    g = QdqGraph(model)
    inputs = {i.name for i in model.graph.input}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or g.weight(node.input[1]) is None:
            continue
        dq = g.producer.get(node.input[0])
        q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inputs:
            out.append(node.name)
    return out


def paired_layers(model: onnx.ModelProto) -> list[str]:
    """Every layer whose int8 kernels add pairs of products: quantized Convs that are not
    depthwise (group 1) and MatMul / Gemm with an int8 weight (deploykit.quantize.saturation)."""
    return [node.name for node, _ in saturation.paired_layers(model)]


def saturating_layers(model: onnx.ModelProto, record: Mapping[str, float] | None,
                      threshold: float = THRESHOLD) -> list[str]:
    """Paired layers whose int16 pair-sum saturation in ``record`` (the model's
    :func:`deploykit.quantize.saturation.recorded`: relative error of their output on the
    calibration data) is above ``threshold``, in graph order."""
    errors = record or {}
    return [name for name in paired_layers(model) if errors.get(name, 0.0) > threshold]


def select(model: onnx.ModelProto, mode: str, record: Mapping[str, float] | None = None,
           threshold: float = THRESHOLD) -> list[str]:
    """The layers ``mode`` (``saturating``, ``first_layer``, ``all`` or ``none``) splits;
    ``saturating`` reads the model's saturation ``record``."""
    if mode == "saturating":
        return saturating_layers(model, record, threshold)
    if mode == "first_layer":
        return first_layer_convs(model)
    if mode == "all":
        return paired_layers(model)
    return []


def split_layers(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with each named layer (Conv, MatMul, Gemm) computed as two layers of
    its type on weight halves (same scales, zero point 0, same axis) whose sum is the canonical
    weight, the bias on the first; nothing else changes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not names:
        return out
    g = QdqGraph(out)
    wanted = set(names)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        dq = g.producer[node.input[1]]
        q = g.constant(dq.input[0]).astype(np.int16)
        halves = {"a": q - np.floor_divide(q, 2), "b": np.floor_divide(q, 2)}
        summed = []
        for tag, part in halves.items():
            weight = numpy_helper.from_array(part.astype(np.int8), f"{dq.input[0]}{SUFFIX}_{tag}")
            out.graph.initializer.append(weight)
            axis = {"axis": attrs(dq)["axis"]} if "axis" in attrs(dq) else {}
            half_dq = helper.make_node("DequantizeLinear", [weight.name, *dq.input[1:]],
                                       [f"{dq.output[0]}{SUFFIX}_{tag}"], name=f"{dq.name}{SUFFIX}_{tag}", **axis)
            half = helper.make_node(node.op_type, [node.input[0], half_dq.output[0], *(node.input[2:] if tag == "a" else [])],
                                    [f"{node.output[0]}{SUFFIX}_{tag}"], name=f"{node.name}{SUFFIX}_{tag}")
            half.attribute.extend(node.attribute)
            nodes += [half_dq, half]
            summed.append(half.output[0])
        nodes.append(helper.make_node("Add", summed, [node.output[0]], name=f"{SUM_PREFIX}{node.name}"))
    read = {i for n in nodes for i in n.input} | {o.name for o in out.graph.output}
    nodes = [n for n in nodes if any(o in read for o in n.output)]  # the whole weights' DQs nobody reads now
    read = {i for n in nodes for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in read]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def check_split(canonical: onnx.ModelProto, lowered: onnx.ModelProto, names: list[str]) -> list[str]:
    """Mismatches between each split layer's halves and its canonical weight (values, scales,
    zero points, axis): empty when every split computes the canonical layer."""
    gc, gl = QdqGraph(canonical), QdqGraph(lowered)
    nodes = {n.name: n for n in canonical.graph.node}
    problems = []
    for name in names:
        dq = gc.producer[nodes[name].input[1]]
        want, p = gc.constant(dq.input[0]).astype(np.int16), gc.params(dq)
        halves = []
        for tag in ("a", "b"):
            half_dq = next((n for n in lowered.graph.node if n.name == f"{dq.name}{SUFFIX}_{tag}"), None)
            if half_dq is None:
                problems.append(f"{name}: half '{tag}' missing")
                break
            hp = gl.params(half_dq)
            if not (np.array_equal(hp.scale, p.scale) and np.array_equal(hp.zero_point, p.zero_point)
                    and hp.axis == p.axis):
                problems.append(f"{name}: half '{tag}' has other quantization parameters than the canonical weight")
            halves.append(gl.constant(half_dq.input[0]).astype(np.int16))
        if len(halves) == 2:
            if not np.array_equal(halves[0] + halves[1], want):
                problems.append(f"{name}: the halves do not add up to the canonical int8 weight")
            if max(int(np.abs(h).max(initial=0)) for h in halves) > 64:
                problems.append(f"{name}: a half exceeds 64 in magnitude (it could saturate)")
    return problems


def merge_halves(layers: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Audit rows (name, type, precision) of a split model with each split convolution as one
    row under its canonical name: int8 when both halves run int8, else the first other precision."""
    INT8 = ("i8", "u8", "int8", "uint8")
    halves: dict[str, list[tuple[str, str]]] = {}
    out: list[tuple[str, str, str]] = []
    for name, kind, precision in layers:
        base, sep, tag = name.rpartition(SUFFIX + "_")
        if sep and tag in ("a", "b"):
            if base not in halves:
                halves[base] = []
                out.append((base, "", ""))  # placeholder, keeps graph order
            halves[base].append((kind, precision))
        else:
            out.append((name, kind, precision))
    merged = []
    for name, kind, precision in out:
        if name in halves and not kind:
            parts = halves[name]
            other = [p for _, p in parts if p.lower() not in INT8]
            precision = other[0] if other or len(parts) < 2 else parts[0][1]
            kind = f"{parts[0][0]}(split in {len(parts)})"
        merged.append((name, kind, precision))
    return merged
