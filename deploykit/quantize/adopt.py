"""Already-quantized QDQ models: lowered as given when canonical, made canonical when that is
exact, refused otherwise (naming the first node that breaks the contract, and why).

A model made by another quantizer (onnxruntime.quantization, NNCF, ModelOpt, deploykit's own
QAT export through torch) carries its own scales. Changing any of them would make the
artifacts disagree with what the user validated, so adoption rewrites only what changes no
output value:

- an int32 bias DequantizeLinear becomes the float bias it computes (float32(q - z) * s);
- uint8 activations with zero point z become int8 with zero point z - 128 (same grid);
- uint8 weights with zero point 128 become int8 with zero point 0 (when no value is 0);
- a per-tensor weight scale becomes the same scale repeated per output channel;
- duplicate Q/DQ pairs on one tensor with equal parameters become one pair;
- a compute node with float inputs and float weights becomes a declared float layer;
- missing node names are filled in, the opset is converted to 18, and the metadata (method,
  hashes, activation profile, calibration table) is written.

Everything else is refused: weights using -128 (the contract is narrow range), asymmetric
weights, per-channel activations, a Q/DQ pair where the canonical model keeps a tensor float
(onnxruntime's default puts them on every op's output), a compute or residual input left
float, ops that share a scale in the contract (Concat, pooling) quantized with different
scales. ``deploykit build --requantize`` calibrates such a model again instead.

The calibration table needs the range of every float tensor, also those the model leaves
unquantized (TFLite quantizes more of them): those come from calibration data run through
the model's float reference (its weights dequantized, its activation Q/DQ removed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit import canonical as rules
from deploykit._version import __version__
from deploykit.canonical import COMPUTE_OPS, CalibrationTable, QdqGraph, TensorRange
from deploykit.errors import ModelError
from deploykit.model import unique_node_names

Q, DQ = "QuantizeLinear", "DequantizeLinear"
#: metadata value of deploykit.calibration_method for a model deploykit did not calibrate
ADOPTED_METHOD = "adopted"
#: metadata key: which adoption rewrites were applied (JSON list), empty for a model taken as given
META_ADOPTED = "deploykit.adopted"


class NotCanonical(ModelError):
    """The quantized model cannot be made canonical without changing its numerics."""


@dataclass(frozen=True)
class Adopted:
    """A quantized model brought into the contract.

    model: the canonical model (passes the lint). fp32: its float reference (weights
    dequantized, activation Q/DQ removed): the graph the canonical placement is read from.
    status: ``canonical`` (a deploykit canonical model, taken byte for byte as given) or
    ``adopted`` (rewritten by the exact rules in the module docstring). changes: one line per
    kind of rewrite. producer: the tool that wrote the model (its producer_name).
    """

    model: onnx.ModelProto
    table: CalibrationTable
    fp32: onnx.ModelProto
    status: str
    profile: str
    float_layers: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    producer: str = ""
    samples: int = 0
    data_hash: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model already holds QuantizeLinear/DequantizeLinear nodes (default domain)."""
    return any(n.op_type in (Q, DQ) and n.domain in ("", "ai.onnx") for n in model.graph.node)


def adopt(model: onnx.ModelProto, *, source_hash: str = "", calib: Any = None, batch_size: int = 8,
          method: str | None = None, data_hash: str | None = None, where: str = "model") -> Adopted:
    """Bring ``model`` (already quantized) into the canonical form, or raise :class:`NotCanonical`.

    A model that passes the lint is taken as it is. ``calib`` (a :class:`deploykit.data.DataSource`
    or None) gives the ranges of the float tensors the model leaves unquantized; without it the
    table holds only the tensors whose scale the model fixes (and their shared-scale groups).
    ``method`` is recorded as the calibration method when the model does not name one (default
    ``adopted``); ``where`` names the model in messages.
    """
    if not is_quantized(model):
        raise NotCanonical(f"{where}: not a quantized model (no QuantizeLinear/DequantizeLinear nodes)")
    producer = f"{model.producer_name} {model.producer_version}".strip()
    if not rules.lint(model):
        table = CalibrationTable.from_model(model)
        meta = {p.key: p.value for p in model.metadata_props}
        return Adopted(model, table, dequantize(model, where), "canonical", rules.model_profile(model),
                       tuple(rules.model_float_layers(model)), (), producer, 0, meta.get(rules.META_DATA_HASH, ""))
    m = _to_opset(model, where)
    changes: list[str] = []
    if any(not n.name for n in m.graph.node) or len({n.name for n in m.graph.node}) < len(m.graph.node):
        unique_node_names(m)
        changes.append("node names made unique")
    _fold_bias(m, where, changes)
    _fold_weight_transposes(m, where, changes)
    _weights(m, where, changes)
    profile = _activations(m, where, changes)
    _dedupe(m, where, changes)
    fp32 = dequantize(m, where)
    floats = _check_placement(m, fp32, where)
    if floats:
        changes.append(f"{len(floats)} compute node(s) with float inputs and weights declared float layers")
    stats, samples, observed_hash = _observe(fp32, calib, batch_size)
    table = _table(m, fp32, stats, profile, where)
    meta = {p.key: p.value for p in m.metadata_props}
    values = {
        rules.META_VERSION: meta.get(rules.META_VERSION, __version__),
        rules.META_METHOD: meta.get(rules.META_METHOD, method or ADOPTED_METHOD),
        rules.META_DATA_HASH: data_hash or meta.get(rules.META_DATA_HASH) or observed_hash or "unknown",
        rules.META_SOURCE_HASH: source_hash or meta.get(rules.META_SOURCE_HASH, ""),
        rules.META_TABLE: table.to_json(),
        rules.META_PROFILE: profile,
        rules.META_FLOAT_LAYERS: json.dumps(list(floats)),
        META_ADOPTED: json.dumps(changes),
    }
    kept = [p for p in m.metadata_props if p.key not in values]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    for key, value in values.items():
        m.metadata_props.add(key=key, value=value)
    violations = rules.lint(m)
    if violations:
        v = violations[0]
        raise NotCanonical(f"{where}: node '{v.node}' breaks the canonical contract ({v.rule}: {v.message}); "
                           f"rebuild with --requantize to calibrate it again")
    return Adopted(m, table, fp32, "adopted", profile, tuple(floats), tuple(changes), producer, samples,
                   values[rules.META_DATA_HASH])


# --------------------------------------------------------------------------------------
# the exact rewrites
# --------------------------------------------------------------------------------------
def _refuse(where: str, node: onnx.NodeProto | str, why: str) -> NotCanonical:
    name = node if isinstance(node, str) else f"{node.op_type} '{node.name}'"
    return NotCanonical(f"{where}: {name}: {why}; rebuild with --requantize to calibrate it again")


def _to_opset(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), rules.OPSET)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if current == rules.OPSET:
        return out
    if current < 13:
        raise NotCanonical(f"{where}: opset {current} has no per-channel QDQ (needs 13); re-export at opset 18")
    try:
        converted = onnx.version_converter.convert_version(out, rules.OPSET)
    except Exception as exc:
        raise NotCanonical(f"{where}: cannot convert opset {current} to {rules.OPSET}: {exc}") from None
    converted.ir_version = max(converted.ir_version, 8)
    return converted


def _set_init(graph: onnx.GraphProto, array: np.ndarray, name: str) -> None:
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    graph.initializer.append(numpy_helper.from_array(array, name))


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _params(g: QdqGraph, node: onnx.NodeProto, where: str) -> rules.QuantParams:
    try:
        return g.params(node)
    except ValueError:
        raise _refuse(where, node, f"its scale '{node.input[1]}' is computed, not a constant initializer") from None


def _dequantized(values: np.ndarray, p: rules.QuantParams) -> np.ndarray:
    """DequantizeLinear's float32 result, as onnxruntime computes it: float32(q - z) * s."""
    scale, zp = p.scale, p.zero_point.astype(np.int64)
    if p.axis is not None:
        axis = p.axis if p.axis >= 0 else p.axis + values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((values.astype(np.int64) - zp).astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def _fold_bias(m: onnx.ModelProto, where: str, changes: list[str]) -> None:
    g = QdqGraph(m)
    folded = []
    for node in list(m.graph.node):
        if node.op_type != DQ or not g.is_weight_dq(node):
            continue
        if g.initializers[node.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        values = g.constant(node.input[0])
        _set_init(m.graph, _dequantized(values, _params(g, node, where)), node.output[0])
        folded.append(node)
    for node in folded:
        m.graph.node.remove(node)
    if folded:
        changes.append(f"{len(folded)} int32 bias DequantizeLinear folded into float biases (the values they compute)")


def _fold_weight_transposes(m: onnx.ModelProto, where: str, changes: list[str]) -> None:
    """DequantizeLinear(int8 W) -> Transpose -> compute node (torch's exporter writes a 3-D
    ``linear`` that way) becomes DequantizeLinear(int8 W transposed), its per-channel axis
    carried through the permutation: the same values in the same places."""
    g = QdqGraph(m)
    folded = []
    for node in m.graph.node:
        if node.op_type != "Transpose" or not node.input:
            continue
        dq = g.dq_feeding(node.input[0])
        if dq is None or not g.is_weight_dq(dq):
            continue
        values, p = g.constant(dq.input[0]), _params(g, dq, where)
        perm = list(rules.attrs(node).get("perm", list(range(values.ndim))[::-1]))
        name = _unique(m.graph, f"{dq.input[0]}_transposed")
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values.transpose(perm)), name))
        inputs = [name, *dq.input[1:]]
        kwargs: dict[str, Any] = {}
        if p.axis is not None:
            axis = p.axis if p.axis >= 0 else p.axis + values.ndim
            kwargs["axis"] = perm.index(axis)
        replacement = onnx.helper.make_node(DQ, inputs, [node.output[0]], name=f"{node.name}_weight", **kwargs)
        folded.append((node, replacement))
    for transpose, replacement in folded:
        index = list(m.graph.node).index(transpose)
        m.graph.node.remove(transpose)
        m.graph.node.insert(index, replacement)
    if folded:
        used = {i for n in m.graph.node for i in n.input}
        for node in [n for n in m.graph.node if n.op_type == DQ and n.output[0] not in used]:
            m.graph.node.remove(node)
        _drop_unused_initializers(m)
        changes.append(f"{len(folded)} transposed weight(s) stored transposed (Transpose after their "
                       f"DequantizeLinear folded)")


def _weights(m: onnx.ModelProto, where: str, changes: list[str]) -> None:
    g = QdqGraph(m)
    uint8 = per_tensor = 0
    for node in m.graph.node:
        if node.op_type != DQ or not g.is_weight_dq(node):
            continue
        init = g.initializers[node.input[0]]
        p = _params(g, node, where)
        values = g.constant(node.input[0])
        if init.data_type == onnx.TensorProto.UINT8:
            if np.any(p.zero_point.astype(np.int64) != 128):
                raise _refuse(where, node, "uint8 weights with a zero point other than 128 are asymmetric "
                                           "(the contract's weights are symmetric int8)")
            if values.size and int(values.min()) == 0:
                raise _refuse(where, node, "uint8 weights use 0 (int8 -128): the contract's narrow range "
                                           "[-127, 127] cannot hold it")
            values = (values.astype(np.int16) - 128).astype(np.int8)
            uint8 += 1
        elif init.data_type != onnx.TensorProto.INT8:
            raise _refuse(where, node, f"weights are {onnx.TensorProto.DataType.Name(init.data_type)}, not int8")
        elif np.any(p.zero_point != 0):
            raise _refuse(where, node, "weights have a non-zero zero point (the contract's weights are symmetric)")
        if values.size and int(values.min()) < -rules.INT8_MAX:
            raise _refuse(where, node, f"weight '{node.input[0]}' uses -128: the contract's narrow range "
                                       f"[-127, 127] cannot hold it without changing a weight")
        axes = set()
        for consumer in g.consumers.get(node.output[0], []):
            if consumer.op_type in COMPUTE_OPS and list(consumer.input).index(node.output[0]) == 1:
                axes.add(rules.weight_axis(consumer.op_type, rules.attrs(consumer), values.ndim))
        scale = p.scale
        axis = p.axis if p.axis is None or p.axis >= 0 else p.axis + values.ndim
        if len(axes) > 1:
            raise _refuse(where, node, "one weight feeds compute nodes wanting different per-channel axes")
        if axes and axis is None and values.ndim > 1:
            axis = axes.pop()
            scale = np.full(values.shape[axis], float(p.scale.reshape(-1)[0]), np.float32)
            per_tensor += 1
        base = node.input[0]
        _set_init(m.graph, values.astype(np.int8), base)
        scale_name = _unique(m.graph, f"{base}_scale_adopted")
        zp_name = _unique(m.graph, f"{base}_zero_point_adopted")
        m.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), scale_name),
                                    numpy_helper.from_array(np.zeros(np.shape(scale), np.int8), zp_name)])
        del node.input[1:]
        node.input.extend([scale_name, zp_name])
        del node.attribute[:]
        if axis is not None and np.size(scale) > 1:
            node.attribute.append(onnx.helper.make_attribute("axis", int(axis)))
    _drop_unused_initializers(m)
    if uint8:
        changes.append(f"{uint8} uint8 weight(s) with zero point 128 stored as int8 with zero point 0")
    if per_tensor:
        changes.append(f"{per_tensor} per-tensor weight scale(s) repeated per output channel")


def _activations(m: onnx.ModelProto, where: str, changes: list[str]) -> str:
    """Activation Q/DQ to int8: uint8 zero point z becomes int8 z - 128. Returns the profile."""
    g = QdqGraph(m)
    converted = 0
    nonzero = False
    for node in m.graph.node:
        if node.op_type not in (Q, DQ) or (node.op_type == DQ and g.is_weight_dq(node)):
            continue
        if node.op_type == DQ:
            q = g.producer.get(node.input[0])
            if q is None or q.op_type != Q:
                raise _refuse(where, node, "activation DequantizeLinear is not fed by a QuantizeLinear "
                                           "(int8 model inputs are not part of the contract)")
            if node.output[0] in {o.name for o in m.graph.output}:
                raise _refuse(where, node, f"model output '{node.output[0]}' is read through Q/DQ (the contract's "
                                           f"outputs are float)")
        else:
            readers = g.consumers.get(node.output[0], [])
            if any(r.op_type != DQ for r in readers) or node.output[0] in {o.name for o in m.graph.output}:
                raise _refuse(where, node, "its int8 output is read by something other than a DequantizeLinear")
        p = _params(g, node, where)
        if p.axis is not None:
            raise _refuse(where, node, "activation quantization is per-channel (the contract's is per-tensor)")
        zp = p.zero_point.astype(np.int64)
        if p.dtype == onnx.TensorProto.UINT8 or p.zero_point.dtype == np.uint8:
            zp = zp - 128
            converted += node.op_type == DQ
        elif p.zero_point.dtype != np.int8:
            raise _refuse(where, node, f"activation zero point is {p.zero_point.dtype}, not int8 or uint8")
        nonzero = nonzero or bool(np.any(zp != 0))
        scale_name = _unique(m.graph, f"{node.name}_scale_adopted")
        zp_name = _unique(m.graph, f"{node.name}_zero_point_adopted")
        m.graph.initializer.extend([numpy_helper.from_array(np.asarray(p.scale.reshape(()), np.float32), scale_name),
                                    numpy_helper.from_array(np.asarray(zp.reshape(()), np.int8), zp_name)])
        del node.input[1:]
        node.input.extend([scale_name, zp_name])
        del node.attribute[:]
    _drop_unused_initializers(m)
    int8 = {o for n in m.graph.node if n.op_type == Q for o in n.output}  # their declared types were uint8
    kept = [vi for vi in m.graph.value_info if vi.name not in int8]
    del m.graph.value_info[:]
    m.graph.value_info.extend(kept)
    if converted:
        changes.append(f"{converted} uint8 activation Q/DQ pair(s) stored as int8 with zero point - 128 "
                       f"(the same grid)")
    return rules.ASYMMETRIC if nonzero else rules.SYMMETRIC


def _dedupe(m: onnx.ModelProto, where: str, changes: list[str]) -> None:
    """Several Q -> DQ pairs on one tensor with equal parameters become one."""
    g = QdqGraph(m)
    first: dict[str, tuple[onnx.NodeProto, str]] = {}
    rename: dict[str, str] = {}
    drop: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.op_type != Q:
            continue
        p = _params(g, node, where)
        for dq in g.consumers.get(node.output[0], []):
            key = node.input[0]
            if key in first:
                other_q, other_dq_out = first[key]
                op = _params(g, other_q, where)
                if np.array_equal(op.scale, p.scale) and np.array_equal(op.zero_point, p.zero_point):
                    rename[dq.output[0]] = other_dq_out
                    drop.append(dq)
            else:
                first[key] = (node, dq.output[0])
    if not drop:
        return
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in drop:
        m.graph.node.remove(node)
    used = {i for n in m.graph.node for i in n.input}
    for node in [n for n in m.graph.node if n.op_type == Q and n.output[0] not in used]:
        m.graph.node.remove(node)
    changes.append(f"{len(drop)} duplicate Q/DQ pair(s) on one tensor merged")


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    kept = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)


# --------------------------------------------------------------------------------------
# the float reference, the placement check, the table
# --------------------------------------------------------------------------------------
def dequantize(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """The float model a QDQ model quantizes: weights as the float values their DequantizeLinear
    computes, activation Q -> DQ pairs removed, node names kept. Also what ``--requantize``
    calibrates again."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = QdqGraph(m)
    source: dict[str, str] = {}  # DQ output -> the float tensor it stands for
    drop = []
    for node in m.graph.node:
        if node.op_type == DQ and g.is_weight_dq(node):
            _set_init(m.graph, _dequantized(g.constant(node.input[0]), _params(g, node, where)), node.output[0])
            drop.append(node)
        elif node.op_type == DQ:
            q = g.producer.get(node.input[0])
            if q is None or q.op_type != Q:
                raise _refuse(where, node, "activation DequantizeLinear is not fed by a QuantizeLinear")
            source[node.output[0]] = q.input[0]
            drop.append(node)
        elif node.op_type == Q:
            drop.append(node)
    outputs = {o.name for o in m.graph.output}
    for name in list(source):
        while source[name] in source:
            source[name] = source[source[name]]
    for node in drop:
        m.graph.node.remove(node)
    for name in sorted(outputs & set(source)):  # an output quantized by its producer: keep its name
        m.graph.node.append(onnx.helper.make_node("Identity", [source.pop(name)], [name], name=f"{name}_float"))
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
    _drop_unused_initializers(m)
    keep = {p.key for p in m.metadata_props if not p.key.startswith("deploykit.")}
    props = [p for p in m.metadata_props if p.key in keep]
    del m.metadata_props[:]
    m.metadata_props.extend(props)
    del m.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(m)
    except Exception as exc:  # noqa: BLE001 -- placement only needs ranks; say which model failed
        raise ModelError(f"{where}: shape inference of its float reference failed: {exc}") from None


def _check_placement(m: onnx.ModelProto, fp32: onnx.ModelProto, where: str) -> list[str]:
    """Compare where the model quantizes with where the canonical placement would; return the
    compute nodes kept float (float inputs and float weights: declared float layers)."""
    from deploykit.quantize.place import placement

    g = QdqGraph(m)
    actual: dict[str, tuple[int, ...]] = {}
    floats = []
    for node in m.graph.node:
        if node.op_type in (Q, DQ):
            continue
        act = tuple(i for i, t in enumerate(node.input) if t and (dq := g.dq_feeding(t)) is not None
                    and not g.is_weight_dq(dq))
        weights = [i for i, t in enumerate(node.input) if t and (dq := g.dq_feeding(t)) is not None and g.is_weight_dq(dq)]
        if node.op_type in COMPUTE_OPS and not act and not weights:
            floats.append(node.name)
        elif node.op_type in COMPUTE_OPS and weights and not act:
            raise _refuse(where, node, "its weights are int8 but its input is float (the contract quantizes both "
                                       "or neither)")
        if act:
            actual[node.name] = act
    expected = placement(fp32, frozenset(floats))
    ops = {n.name: n for n in m.graph.node}
    for node in m.graph.node:
        if node.op_type in (Q, DQ):
            continue
        have, want = set(actual.get(node.name, ())), set(expected.get(node.name, ()))
        extra, missing = sorted(have - want), sorted(want - have)
        if extra:
            why = ("the canonical model keeps it float: dropping that Q/DQ would change the outputs")
            raise _refuse(where, ops[node.name], f"input {extra[0]} ('{node.input[extra[0]]}') reads through Q/DQ where {why}")
        if missing:
            kind = "a residual Add quantizes both inputs" if node.op_type == "Add" else "the canonical model quantizes it"
            raise _refuse(where, ops[node.name], f"input {missing[0]} ('{node.input[missing[0]]}') is float where "
                                                 f"{kind}: adding a Q/DQ would change the outputs")
    return floats


def _observe(fp32: onnx.ModelProto, calib: Any, batch_size: int) -> tuple[dict[str, Any], int, str]:
    if calib is None:
        return {}, 0, ""
    from deploykit.model import fixed_batch, input_specs
    from deploykit.progress import bar
    from deploykit.quantize.observe import Observer

    observer = Observer(fp32)
    batch_size = fixed_batch(input_specs(fp32)) or batch_size
    with bar(calib.expected_samples(), "adopt: ranges of the float tensors", "sample") as b:
        observer.observe_ranges(calib.batches(batch_size), b.update)
    return dict(observer.stats), observer.samples, observer.data_hash()


def _table(m: onnx.ModelProto, fp32: onnx.ModelProto, stats: Mapping[str, Any], profile: str,
           where: str) -> CalibrationTable:
    """The model's own (scale, zero point) for every tensor it quantizes and everything sharing a
    scale with it; observed min/max (the minmax method) for the other float tensors."""
    from deploykit.quantize.observe import TensorStats, float_tensors
    from deploykit.quantize.place import matmul_b_operands, shared_scale_groups

    g = QdqGraph(m)
    fixed: dict[str, tuple[float, int, str]] = {}
    for node in m.graph.node:
        if node.op_type == Q:
            p = _params(g, node, where)
            fixed[node.input[0]] = (float(p.scale.reshape(-1)[0]), int(p.zero_point.reshape(-1)[0]), node.name)
    tensors = set(float_tensors(fp32)) | set(fixed)
    b_operands = matmul_b_operands(fp32)
    table = CalibrationTable()
    for group in shared_scale_groups(fp32, tensors):
        params = {(s, z): q for t, (s, z, q) in fixed.items() if t in group}
        if len(params) > 1:
            (s1, _), (s2, _) = list(params)[:2]
            raise _refuse(where, list(params.values())[1], f"quantizes a tensor with scale {s2:.6g} that must share "
                                                           f"one scale with another quantized at {s1:.6g} (Concat, "
                                                           f"pooling and reshape-like ops keep their input's scale)")
        seen = [stats[t] for t in group if t in stats]
        lo = min((float(s.min) for s in seen), default=np.inf)
        hi = max((float(s.max) for s in seen), default=-np.inf)
        if params:
            (scale, zp), = params
        elif not seen or not (np.isfinite(lo) and np.isfinite(hi)):
            continue  # a tensor no data reached (or no data given): nothing to record
        elif profile == rules.SYMMETRIC or group & b_operands:
            scale, zp = rules.activation_scale(max(abs(lo), abs(hi))), 0
        else:
            scale, zp = rules.asymmetric_params(lo, hi)
        rng = TensorRange(0.0, scale, 0.0, 0.0, zp)
        amax = max(abs(rng.lo), abs(rng.hi)) if zp else rules.INT8_MAX * float(np.float32(scale))
        for t in group:
            s = stats.get(t, TensorStats())
            tmin = float(s.min) if np.isfinite(s.min) else rng.lo
            tmax = float(s.max) if np.isfinite(s.max) else rng.hi
            table[t] = TensorRange(amax, scale, tmin, tmax, zp)
    return table


def describe(adopted: Adopted) -> dict[str, Any]:
    """For the manifest's ``quantization`` section: how the model was taken."""
    return {"source": adopted.status, "producer": adopted.producer, "activations": adopted.profile,
            "changes": list(adopted.changes), "float_layers": list(adopted.float_layers),
            "table_samples": adopted.samples}


def wrapped_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Activation and weight DequantizeLinear counts (for messages and tests)."""
    g = QdqGraph(model)
    out: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type == DQ:
            out["weights" if g.is_weight_dq(n) else "activations"] += 1
    return dict(out)
