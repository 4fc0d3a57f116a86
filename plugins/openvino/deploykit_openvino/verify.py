"""Verification of a lowered OpenVINO model against the canonical QDQ model.

- ``verify_scales``: the saved IR keeps every canonical scale and zero point. OpenVINO's ONNX
  front end turns QuantizeLinear(s, zp) into FakeQuantize(x, (-128-zp)*s, (127-zp)*s, -128, 127) + Convert(i8) and
  DequantizeLinear into Convert/Subtract/Multiply; weights stay int8 constants followed by the
  same dequantize chain. We compare the FakeQuantize input range with the canonical Q scale, the
  dequantized output range with the canonical DQ scale, and the int8 weight values and their
  dequantized values with the canonical ones.
- ``runtime_layers``: which precision each canonical compute node really runs in after
  compilation, read from the runtime model's rt_info (``layerType``, ``runtimePrecision``,
  ``originalLayersNames``).

Only duck-typed OpenVINO objects are used here, so importing this module never imports openvino.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx

from deploykit.backend import CheckResult
from deploykit.canonical import COMPUTE_OPS, QdqGraph

RTOL = 1e-6  # scales are float32: OpenVINO computes (-128 - zp) * s in float32 as well
#: Runtime layer types that are compute layers even when no canonical node maps to them.
COMPUTE_LAYER_TYPES = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"})


class _NotEvaluable(Exception):
    pass


def _evaluate(output: Any, substitute: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    """Evaluate a constant (or substituted) subgraph of an OpenVINO model in numpy.

    Covers what the ONNX front end emits for a dequantize chain: Constant, Convert, Subtract,
    Multiply, Add, Reshape, Unsqueeze, Squeeze, Transpose.
    """
    node = output.get_node()
    key = (node.get_friendly_name(), output.get_index())
    if key in substitute:
        return substitute[key]
    kind = node.get_type_name()
    if kind == "Constant":
        return np.array(node.get_data())
    args = [_evaluate(node.input_value(i), substitute) for i in range(node.get_input_size())]
    if kind == "Convert":
        return args[0].astype(output.get_element_type().to_dtype())
    if kind in ("Subtract", "Multiply", "Add"):
        return {"Subtract": np.subtract, "Multiply": np.multiply, "Add": np.add}[kind](args[0], args[1])
    if kind == "Reshape":
        shape = [int(d) for d in args[1].reshape(-1)]
        if node.get_attributes().get("special_zero", False):
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return args[0].reshape(shape)
    if kind == "Unsqueeze":
        return np.expand_dims(args[0], tuple(int(a) for a in args[1].reshape(-1)))
    if kind == "Squeeze":
        return np.squeeze(args[0], tuple(int(a) for a in args[1].reshape(-1))) if len(args) > 1 else np.squeeze(args[0])
    if kind == "Transpose":
        return np.transpose(args[0], [int(a) for a in args[1].reshape(-1)])
    raise _NotEvaluable(f"{kind} '{node.get_friendly_name()}'")


def _close(actual: np.ndarray, expected: np.ndarray | np.floating[Any]) -> bool:
    try:
        a, e = np.broadcast_arrays(np.asarray(actual, np.float64), np.asarray(expected, np.float64))
    except ValueError:
        return False
    return bool(np.allclose(a, e, rtol=RTOL, atol=0))


def verify_scales(ir_model: Any, canonical: onnx.ModelProto) -> CheckResult:
    """Compare every quantization parameter the IR stores with the canonical model's.

    Returns the ``scales_match`` CheckResult: "pass" when every canonical Q/DQ and weight is
    found with its scale, "fail" listing each mismatch (or each one that could not be found).
    """
    g = QdqGraph(canonical)
    producer: dict[str, Any] = {}  # tensor name -> ov.Output
    fq_by_input: dict[str, list[Any]] = defaultdict(list)
    fake_quantizes = []
    for op in ir_model.get_ordered_ops():
        if op.get_type_name() == "Result":  # a Result repeats its input's tensor names
            continue
        for out in op.outputs():
            for name in out.get_names():
                producer[name] = out
        if op.get_type_name() == "FakeQuantize":
            fake_quantizes.append(op)
            for name in op.input_value(0).get_names():
                fq_by_input[name].append(op)

    mismatches: list[str] = []
    n_act = n_weight = 0
    matched_fq: set[str] = set()
    for node in canonical.graph.node:
        if node.op_type == "QuantizeLinear":
            n_act += 1
            scale = float(g.params(node).scale.reshape(-1)[0])
            zp = int(g.params(node).zero_point.reshape(-1)[0])
            fqs = fq_by_input.get(node.input[0], [])
            if not fqs:
                mismatches.append(f"QuantizeLinear '{node.name}': no FakeQuantize on '{node.input[0]}' in the IR")
                continue
            for fq in fqs:
                matched_fq.add(fq.get_friendly_name())
                mismatches += _check_fake_quantize(fq, node, scale, zp, g, producer)
        elif node.op_type == "DequantizeLinear" and g.is_weight_dq(node):
            n_weight += 1
            mismatches += _check_weight(node, g, producer)
    for fq in fake_quantizes:
        if fq.get_friendly_name() not in matched_fq:
            mismatches.append(f"FakeQuantize '{fq.get_friendly_name()}' has no QuantizeLinear in the canonical model")

    checked = f"{n_act} activation quantizers and {n_weight} weights"
    if mismatches:
        shown = "; ".join(mismatches[:5]) + (f"; ... {len(mismatches) - 5} more" if len(mismatches) > 5 else "")
        return CheckResult("scales_match", "fail", float(len(mismatches)),
                           message=f"{len(mismatches)} mismatches in {checked}: {shown}",
                           details={"mismatches": mismatches})
    return CheckResult("scales_match", "pass", 0.0,
                       message=f"IR keeps the canonical scales of {checked} ({len(fake_quantizes)} FakeQuantize)",
                       details={"activation_quantizers": n_act, "weights": n_weight,
                                "fake_quantize": len(fake_quantizes)})


def _check_fake_quantize(fq: Any, q: onnx.NodeProto, scale: float, zp: int, g: QdqGraph,
                         producer: dict[str, Any]) -> list[str]:
    name = f"FakeQuantize '{fq.get_friendly_name()}' (QuantizeLinear '{q.name}')"
    out = []
    try:
        in_low, in_high, out_low, out_high = (_evaluate(fq.input_value(i), {}) for i in range(1, 5))
    except _NotEvaluable as exc:
        return [f"{name}: range is not constant ({exc})"]
    if fq.get_attributes().get("levels") != 256:
        out.append(f"{name}: {fq.get_attributes().get('levels')} levels, expected 256")
    s = np.float32(scale)
    lo, hi = np.float32(-128 - zp), np.float32(127 - zp)
    if not (_close(in_low, lo * s) and _close(in_high, hi * s)):
        out.append(f"{name}: input range [{in_low.min():.6g}, {in_high.max():.6g}] != "
                   f"[(-128-zp)*s, (127-zp)*s] = [{lo * s:.6g}, {hi * s:.6g}] (zp={zp})")
    # The dequantized output range, through whatever Convert/Subtract/Multiply chain follows.
    for dq in g.consumers.get(q.output[0], []):
        if dq.op_type != "DequantizeLinear":
            continue
        dq_scale = np.float32(g.params(dq).scale.reshape(-1)[0])
        target = producer.get(dq.output[0])
        if target is None:
            out.append(f"{name}: DequantizeLinear '{dq.name}' output '{dq.output[0]}' is not in the IR")
            continue
        levels = np.array([np.min(out_low), np.max(out_high)], np.float32)
        try:
            deq = _evaluate(target, {(fq.get_friendly_name(), 0): levels})
        except _NotEvaluable as exc:
            out.append(f"{name}: cannot follow its dequantize chain ({exc})")
            continue
        dq_zp = int(g.params(dq).zero_point.reshape(-1)[0])
        if not _close(deq.reshape(-1), np.array([-128 - dq_zp, 127 - dq_zp], np.float32) * dq_scale):
            out.append(f"{name}: dequantized range {deq.reshape(-1).tolist()} != "
                       f"[(-128-zp)*s, (127-zp)*s] of DequantizeLinear '{dq.name}' (s={float(dq_scale):.6g}, zp={dq_zp})")
    return out


def _check_weight(dq: onnx.NodeProto, g: QdqGraph, producer: dict[str, Any]) -> list[str]:
    name = f"weight '{dq.input[0]}' (DequantizeLinear '{dq.name}')"
    w = g.constant(dq.input[0])
    p = g.params(dq)
    scale = p.scale
    if p.axis is not None:
        shape = [1] * w.ndim
        shape[p.axis] = -1
        scale = scale.reshape(shape)
    expected = (w.astype(np.float32) - p.zero_point.reshape(scale.shape).astype(np.float32)) * scale
    out = []
    stored = producer.get(dq.input[0])
    if stored is None or stored.get_node().get_type_name() != "Constant":
        out.append(f"{name}: int8 weight constant not found in the IR")
    elif stored.get_element_type().to_dtype() != np.int8:
        out.append(f"{name}: stored as {stored.get_element_type()}, not int8")
    elif not np.array_equal(np.array(stored.get_node().get_data()).reshape(w.shape), w):
        out.append(f"{name}: stored int8 values differ from the canonical ones")
    target = producer.get(dq.output[0])
    if target is None:
        return out + [f"{name}: dequantized weight '{dq.output[0]}' is not in the IR"]
    try:
        actual = _evaluate(target, {})
    except _NotEvaluable as exc:
        return out + [f"{name}: cannot evaluate its dequantize chain ({exc})"]
    if actual.shape != expected.shape or not _close(actual, expected):
        worst = float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape else float("nan")
        out.append(f"{name}: dequantized values differ (max abs diff {worst:.3g}, shape {actual.shape} vs {expected.shape})")
    return out


def runtime_layers(runtime_model: Any, canonical: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(name, layer type, runtime precision) for every compute layer of a compiled model.

    Each canonical Conv/ConvTranspose/Gemm/MatMul is located through the runtime layers'
    ``originalLayersNames`` (fused layers list the nodes they absorbed, sometimes with a
    ``/DequantizationMultiply``-style suffix). That list is not always complete: the CPU
    plugin's attention Subgraph omits the Q x K MatMul it starts with. A compute node no layer
    names is attributed to the compute or Subgraph layer that absorbed its nearest consumer
    (type marked "fused"); failing that it is reported as "not found", which counts as not
    int8. Runtime compute layers that name no canonical node are listed under their own name.
    """
    g = QdqGraph(canonical)
    compute = {n.name: n for n in canonical.graph.node if n.op_type in COMPUTE_OPS}
    # runtime layers are named after nodes, or after the tensor they output ("linear" for a Gemm)
    aliases = {out: n.name for n in canonical.graph.node for out in n.output}
    aliases.update({n.name: n.name for n in canonical.graph.node})
    claims: dict[str, tuple[str, str, str]] = {}  # canonical node name -> (layer type, precision, layer)
    compute_layers: dict[str, tuple[str, str]] = {}  # runtime compute layer -> (type, precision)
    for op in runtime_model.get_ordered_ops():
        rt = op.get_rt_info()
        layer_type, precision = _rt_str(rt, "layerType"), _rt_str(rt, "runtimePrecision")
        originals = _rt_str(rt, "originalLayersNames").split(",") + [op.get_friendly_name()]
        claimed = {c for c in (_canonical_name(o, aliases) for o in originals) if c is not None}
        for name in claimed:
            # a Reorder may also name the node; the layer that computes it wins
            if name not in claims or _computes(layer_type):
                claims[name] = (layer_type, precision, op.get_friendly_name())
        if layer_type in COMPUTE_LAYER_TYPES:
            compute_layers[op.get_friendly_name()] = (layer_type, precision)

    layers = []
    used: set[str] = set()
    for name, node in compute.items():
        fused = None if name in claims and _computes(claims[name][0]) else _absorbing_layer(node, g, claims)
        if fused:
            layer_type, precision, layer = fused
            used.add(layer)
            label = f"{layer_type}({node.op_type}, fused)"
        elif name in claims:  # named only by a non-compute layer (a weight Transpose): report what it says
            layer_type, precision, layer = claims[name]
            used.add(layer)
            label = layer_type if layer_type in COMPUTE_LAYER_TYPES else f"{layer_type}({node.op_type})"
        else:
            label, precision = node.op_type, "not found"
        layers.append((name, label, precision))
    return layers + [(n, t, p) for n, (t, p) in compute_layers.items() if n not in used]


def _computes(layer_type: str) -> bool:
    return layer_type in COMPUTE_LAYER_TYPES or layer_type == "Subgraph"


def _absorbing_layer(node: onnx.NodeProto, g: QdqGraph, claims: dict[str, tuple[str, str, str]],
                     depth: int = 3) -> tuple[str, str, str] | None:
    """The compute/Subgraph layer that claims one of ``node``'s nearest consumers."""
    frontier = [node]
    for _ in range(depth):
        frontier = [c for n in frontier for out in n.output for c in g.consumers.get(out, [])]
        for consumer in frontier:
            hit = claims.get(consumer.name)
            if hit and _computes(hit[0]):
                return hit
    return None


def _rt_str(rt: Any, key: str) -> str:
    if key not in rt:
        return ""
    value = rt[key]
    return value.astype(str) if hasattr(value, "astype") else str(value)


def _canonical_name(original: str, aliases: dict[str, str]) -> str | None:
    """Match ``node_Conv_3`` or ``node_Conv_3/DequantizationMultiply`` to a canonical node name.

    Exporters put "/" in node names (``/stem/Conv``), so strip suffixes one at a time."""
    name = original.strip()
    while name:
        if name in aliases:
            return aliases[name]
        if "/" not in name:
            return None
        name = name.rsplit("/", 1)[0]
    return None
