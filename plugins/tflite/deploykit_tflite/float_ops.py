"""Float-islands lowering for transformer encoders.

An encoder's canonical model quantizes only the inputs of its MatMuls; LayerNorm, GELU, Softmax,
the residual adds and the attention-mask arithmetic stay float, and ids and masks stay int64
or bool. The TFLite model does the same: in islands mode only a canonical QuantizeLinear puts a
fake-quant in the TF graph, so the converter quantizes exactly those tensors (and, through
reshapes and transposes, the MatMul that produces one: an int8 kernel whose single output
rounding is the canonical Q's), and everything else is converted as float or integer ops.

- int64 / bool tensors keep their type (TFLite has int64 GATHER, comparisons, SELECT_V2), so
  the -3.4e38 of an additive mask only ever meets float tensors;
- GELU exported as ``x * 0.5 * (1 + erf(x / sqrt 2))`` or in its tanh form is recognised
  (structure, then checked numerically on a range of inputs) and lowered as one GELU op:
  TFLite has no ERF;
- ``FLOAT_GRAPH_OPS`` is the op table of this mode (ONNX op type -> TF lowering).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from deploykit.canonical import attrs

if TYPE_CHECKING:
    from deploykit_tflite.lowering import Lowering

#: Ops that only an encoder-like graph has: their presence (or a non-float input) selects islands mode.
ISLAND_TRIGGERS = frozenset({"LayerNormalization", "Erf", "Gelu", "Gather", "GatherND", "Where", "Expand", "Range",
                             "Cast", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not",
                             "ConstantOfShape", "IsNaN"})

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float32", onnx.TensorProto.FLOAT16: "float32",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
           onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


def needs_islands(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    if any(vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT for vi in model.graph.input if vi.name not in inits):
        return True
    return any(n.op_type in ISLAND_TRIGGERS for n in model.graph.node)


# --------------------------------------------------------------------------------------
# GELU recognition
# --------------------------------------------------------------------------------------
def _gelu(x: np.ndarray, tanh: bool) -> np.ndarray:
    from math import erf, pi, sqrt

    if tanh:
        return 0.5 * x * (1 + np.tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))
    return np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in x.astype(np.float64)])


def find_gelus(lw: Lowering) -> tuple[dict[str, tuple[str, bool]], set[str]]:
    """Exported GELUs: {last node name: (input tensor, tanh form)}, and the other nodes they absorb.

    Structure first (an Erf/Tanh whose output, through at most four single-consumer Add/Mul
    nodes, is multiplied by its own input x or by x * c), then the region between x and that
    last Mul is evaluated on x in [-6, 6] and must equal GELU within 5e-5."""
    g = lw.g
    graph_outputs = {o.name for o in lw.model.graph.output}
    order = {n.name: i for i, n in enumerate(lw.model.graph.node)}
    found: dict[str, tuple[str, bool]] = {}
    absorbed: set[str] = set()

    def is_const(name: str) -> bool:
        return not name or lw.const(name) is not None

    for node in lw.model.graph.node:
        if node.op_type not in ("Erf", "Tanh"):
            continue
        ancestors: set[str] = set()
        frontier = [node.input[0]]
        for _ in range(6):
            nxt = []
            for t in frontier:
                if t in ancestors or is_const(t):
                    continue
                ancestors.add(t)
                p = g.producer.get(t)
                if p is not None:
                    nxt += [i for i in p.input if i]
            frontier = nxt
        cur, x, end = node, None, None
        for _ in range(4):
            consumers = g.consumers.get(cur.output[0], [])
            if len(consumers) != 1 or cur.output[0] in graph_outputs or consumers[0].op_type not in ("Add", "Mul"):
                break
            c = consumers[0]
            if c.op_type == "Mul":
                other = c.input[1] if c.input[0] == cur.output[0] else c.input[0]
                if other in ancestors:
                    x, end = other, c
                    break
                p = g.producer.get(other)
                if p is not None and p.op_type == "Mul" and any(i in ancestors for i in p.input) \
                        and any(is_const(i) for i in p.input):
                    x, end = next(i for i in p.input if i in ancestors), c
                    break
            cur = c
        if end is None or x is None:
            continue
        # the legacy exporter scales by 0.5 after the product: x * (1 + erf(x / sqrt 2)) * 0.5
        ends = [end]
        for _ in range(2):
            nxt = g.consumers.get(ends[-1].output[0], [])
            if len(nxt) != 1 or ends[-1].output[0] in graph_outputs or nxt[0].op_type not in ("Mul", "Div") \
                    or not any(i != ends[-1].output[0] and is_const(i) for i in nxt[0].input):
                break
            ends.append(nxt[0])
        for end in ends:
            match = _match(lw, g, x, end, is_const, graph_outputs, order)
            if match is not None:
                found[end.name] = (x, match[0])
                absorbed |= match[1]
                break
    return found, absorbed


def _match(lw: Lowering, g: Any, x: str, end: onnx.NodeProto, is_const: Callable[[str], bool],
           graph_outputs: set[str], order: dict[str, int]) -> tuple[bool, set[str]] | None:
    """(tanh form, absorbed node names) if the nodes from x to ``end`` compute GELU of x."""
    region = _region(g, x, end, is_const)
    if region is None:
        return None
    inner = {n.name for n in region if n is not end}
    if any(c.name not in inner and c is not end for n in region if n is not end
           for c in g.consumers.get(n.output[0], [])) or any(n.output[0] in graph_outputs for n in region
                                                              if n is not end):
        return None
    form = _evaluate_region(lw, sorted(region, key=lambda n: order[n.name]), x, end)
    return None if form is None else (form, inner)


def _region(g: Any, x: str, end: onnx.NodeProto, is_const: Callable[[str], bool]) -> list[onnx.NodeProto] | None:
    """Nodes on the paths from tensor x to node ``end`` (at most 12)."""
    seen: dict[str, onnx.NodeProto] = {}
    stack = [end]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen[n.name] = n
        if len(seen) > 12:
            return None
        for i in n.input:
            if not i or i == x or is_const(i):
                continue
            p = g.producer.get(i)
            if p is None:
                return None  # reaches a graph input other than x
            stack.append(p)
    return list(seen.values())


def _evaluate_region(lw: Lowering, nodes: list[onnx.NodeProto], x: str, end: onnx.NodeProto) -> bool | None:
    from onnx.reference import ReferenceEvaluator

    xs = np.linspace(-6, 6, 241, dtype=np.float32)
    values: dict[str, np.ndarray] = {x: xs}
    try:
        for n in nodes:
            feeds: dict[str, Any] = {}
            for i in n.input:
                if i:
                    v = values.get(i)
                    feeds[i] = v if v is not None else lw.const(i)
            outs: Any = ReferenceEvaluator(n).run(None, feeds)
            values[n.output[0]] = np.asarray(outs[0])
    except Exception:  # noqa: BLE001  (the evaluator failing on any node means: not this pattern)
        return None
    y = values[end.output[0]].reshape(-1)
    if y.shape != xs.shape:
        return None
    for tanh in (False, True):
        if np.allclose(y, _gelu(xs, tanh), atol=5e-5, rtol=0):
            return tanh
    return None


# --------------------------------------------------------------------------------------
# the op table of islands mode
# --------------------------------------------------------------------------------------
def lower(lw: Lowering, node: onnx.NodeProto) -> None:
    if node.name in lw.gelus:
        x, tanh = lw.gelus[node.name]
        lw.emit(node, lw.tf.nn.gelu(lw.values[x], approximate=tanh))
        return
    FLOAT_GRAPH_OPS[node.op_type](lw, node)


def _operands(lw: Lowering, node: onnx.NodeProto, dtype: Any = None) -> list[Any]:
    """Inputs as TF tensors; constants take the dtype of the first tensor input (or ``dtype``)."""
    tf = lw.tf
    tensors = [lw.values[n] for n in node.input if n in lw.values]
    want = dtype or (tensors[0].dtype if tensors else None)
    out = []
    for n in node.input:
        if not n:
            continue
        if n in lw.values:
            out.append(lw.values[n])
            continue
        c = lw.const(n)
        if c is None:
            raise KeyError(n)
        if want is None:
            want = tf.float32 if c.dtype.kind == "f" else tf.as_dtype(c.dtype)
        out.append(tf.constant(c.astype(want.as_numpy_dtype)))
    return out


def _elementwise(fn: Callable[..., Any], dtype: str | None = None) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        args = _operands(lw, node, getattr(lw.tf, dtype) if dtype else None)
        lw.emit(node, fn(lw.tf, *args))

    return lower


def _where(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    cond = lw.values[node.input[0]] if node.input[0] in lw.values else \
        tf.constant(lw.require_const(node, 0).astype(bool))
    branch = next((lw.values[n] for n in node.input[1:] if n in lw.values), None)
    dtype = branch.dtype if branch is not None else tf.float32
    a, b = (lw.values[n] if n in lw.values else tf.constant(lw.require_const(node, i).astype(dtype.as_numpy_dtype))
            for i, n in enumerate(node.input) if i > 0)
    lw.emit(node, tf.where(cond, a, b))


def _cast(lw: Lowering, node: onnx.NodeProto) -> None:
    to = _DTYPES.get(attrs(node)["to"])
    if to is None:
        raise lw.error(node, f"cast to {onnx.TensorProto.DataType.Name(attrs(node)['to'])} is not supported")
    lw.emit(node, lw.tf.cast(lw.values[node.input[0]], getattr(lw.tf, to)))


def _tensor_or_const(lw: Lowering, name: str) -> Any:
    if name in lw.values:
        return lw.values[name]
    c = lw.const(name)
    if c is None:
        raise KeyError(name)
    return lw.tf.constant(c.astype(np.float32) if c.dtype.kind == "f" else c)


def _gather(lw: Lowering, node: onnx.NodeProto) -> None:
    data = _tensor_or_const(lw, node.input[0])
    indices = _tensor_or_const(lw, node.input[1])
    lw.emit(node, lw.tf.gather(data, indices, axis=attrs(node).get("axis", 0)))


def _gather_nd(lw: Lowering, node: onnx.NodeProto) -> None:
    data = _tensor_or_const(lw, node.input[0])
    indices = _tensor_or_const(lw, node.input[1])
    lw.emit(node, lw.tf.gather_nd(data, indices, batch_dims=attrs(node).get("batch_dims", 0)))


def _slice(lw: Lowering, node: onnx.NodeProto) -> None:
    x = lw.values[node.input[0]]
    shape = [int(d) for d in x.shape]
    starts = lw.require_const(node, 1).reshape(-1).tolist()
    ends = lw.require_const(node, 2).reshape(-1).tolist()
    axes = lw.require_const(node, 3).reshape(-1).tolist() if len(node.input) > 3 and node.input[3] else \
        list(range(len(starts)))
    steps = lw.require_const(node, 4).reshape(-1).tolist() if len(node.input) > 4 and node.input[4] else \
        [1] * len(starts)
    begin, end, stride = [0] * len(shape), list(shape), [1] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + len(shape) if a < 0 else a
        s = max(min(int(s), 2 ** 62), -(2 ** 62))
        e = max(min(int(e), 2 ** 62), -(2 ** 62))
        b, e2, st2 = slice(s, e, int(st)).indices(shape[a])
        begin[a], end[a], stride[a] = b, e2, st2
        if st2 < 0 and e2 < 0:  # slice.indices gives -1 for "through index 0"
            end[a] = -shape[a] - 1
    lw.emit(node, lw.tf.strided_slice(x, begin, end, stride))


def _expand(lw: Lowering, node: onnx.NodeProto) -> None:
    x = _tensor_or_const(lw, node.input[0])
    shape = [int(d) for d in lw.require_const(node, 1).reshape(-1)]
    out = list(np.broadcast_shapes(tuple(int(d) for d in x.shape), tuple(shape)))
    lw.emit(node, lw.tf.broadcast_to(x, out))


def _layer_norm(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    x = lw.values[node.input[0]]
    a = attrs(node)
    r = len(x.shape)
    axis = a.get("axis", -1)
    axes = list(range(axis + r if axis < 0 else axis, r))
    mean = tf.math.reduce_mean(x, axis=axes, keepdims=True)
    d = x - mean
    y = d * tf.math.rsqrt(tf.math.reduce_mean(d * d, axis=axes, keepdims=True) + float(a.get("epsilon", 1e-5)))
    if len(node.input) > 1 and node.input[1]:
        y = y * lw.require_const(node, 1).astype(np.float32)
    if len(node.input) > 2 and node.input[2]:
        y = y + lw.require_const(node, 2).astype(np.float32)
    lw.emit(node, y)


def _softmax(lw: Lowering, node: onnx.NodeProto) -> None:
    x = lw.values[node.input[0]]
    lw.emit(node, lw.tf.nn.softmax(x, axis=attrs(node).get("axis", -1)))


def _reduce(fn_name: str) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        x = lw.values[node.input[0]]
        a = attrs(node)
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = lw.require_const(node, 1).reshape(-1).tolist()
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                lw.values[node.output[0]] = x
                return
            axes = list(range(len(x.shape)))
        lw.emit(node, getattr(lw.tf.math, fn_name)(x, axis=[int(v) for v in axes], keepdims=bool(a.get("keepdims", 1))))

    return lower


def _concat(lw: Lowering, node: onnx.NodeProto) -> None:
    lw.emit(node, lw.tf.concat(_operands(lw, node), axis=attrs(node).get("axis", 0)))


def _gelu_op(lw: Lowering, node: onnx.NodeProto) -> None:
    approx = attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    lw.emit(node, lw.tf.nn.gelu(lw.values[node.input[0]], approximate=approx == "tanh"))


def _erf(lw: Lowering, node: onnx.NodeProto) -> None:
    raise lw.error(node, "TFLite has no ERF op; an Erf is lowered only as part of an exported GELU "
                         "(x * 0.5 * (1 + erf(x / sqrt(2)))), and this one is not")


def _range(lw: Lowering, node: onnx.NodeProto) -> None:
    raise lw.error(node, "Range with inputs that are not constant at the fixed input shapes is not supported")


#: ONNX op type -> lowering, in islands mode (encoders). MatMul, Reshape, Transpose, Squeeze,
#: Unsqueeze, Flatten, Identity come from the int8 op table, whose emit() keeps them float here.
FLOAT_GRAPH_OPS: dict[str, Callable[[Lowering, onnx.NodeProto], None]] = {
    "Add": _elementwise(lambda tf, a, b: tf.math.add(a, b)),
    "Sub": _elementwise(lambda tf, a, b: tf.math.subtract(a, b)),
    "Mul": _elementwise(lambda tf, a, b: tf.math.multiply(a, b)),
    "Div": _elementwise(lambda tf, a, b: tf.math.divide(a, b) if a.dtype.is_floating else tf.math.floordiv(a, b)),
    "Pow": _elementwise(lambda tf, a, b: tf.math.square(a) if _is_two(tf, b) else tf.math.pow(a, b)),
    "Sqrt": _elementwise(lambda tf, x: tf.math.sqrt(x)),
    "Reciprocal": _elementwise(lambda tf, x: tf.math.reciprocal(x)),
    "Exp": _elementwise(lambda tf, x: tf.math.exp(x)),
    "Log": _elementwise(lambda tf, x: tf.math.log(x)),
    "Neg": _elementwise(lambda tf, x: tf.math.negative(x)),
    "Tanh": _elementwise(lambda tf, x: tf.math.tanh(x)),
    "Sigmoid": _elementwise(lambda tf, x: tf.math.sigmoid(x)),
    "Relu": _elementwise(lambda tf, x: tf.nn.relu(x)),
    "Min": _elementwise(lambda tf, a, b: tf.math.minimum(a, b)),
    "Max": _elementwise(lambda tf, a, b: tf.math.maximum(a, b)),
    "Equal": _elementwise(lambda tf, a, b: tf.math.equal(a, b)),
    "Greater": _elementwise(lambda tf, a, b: tf.math.greater(a, b)),
    "Less": _elementwise(lambda tf, a, b: tf.math.less(a, b)),
    "GreaterOrEqual": _elementwise(lambda tf, a, b: tf.math.greater_equal(a, b)),
    "LessOrEqual": _elementwise(lambda tf, a, b: tf.math.less_equal(a, b)),
    "And": _elementwise(lambda tf, a, b: tf.math.logical_and(a, b), "bool"),
    "Or": _elementwise(lambda tf, a, b: tf.math.logical_or(a, b), "bool"),
    "Not": _elementwise(lambda tf, x: tf.math.logical_not(x), "bool"),
    "IsNaN": _elementwise(lambda tf, x: tf.math.not_equal(x, x)),  # TFLite has no IS_NAN; NaN != NaN
    "Abs": _elementwise(lambda tf, x: tf.math.abs(x)),
    "Where": _where,
    "Cast": _cast,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Slice": _slice,
    "Expand": _expand,
    "LayerNormalization": _layer_norm,
    "Softmax": _softmax,
    "ReduceMean": _reduce("reduce_mean"),
    "ReduceSum": _reduce("reduce_sum"),
    "ReduceMax": _reduce("reduce_max"),
    "Concat": _concat,
    "Gelu": _gelu_op,
    "Erf": _erf,
    "Range": _range,
}


def _is_two(tf: Any, b: Any) -> bool:
    """x ** 2 (LayerNorm's decomposition) as one SQUARE: exact, and no float POW kernel."""
    v = tf.get_static_value(b)
    return v is not None and np.size(v) == 1 and float(np.reshape(v, -1)[0]) == 2.0
