"""The op table: ONNX op type -> emitter that adds the equivalent MIL ops.

Each emitter takes the lowering context and one ONNX node, reads its inputs with
``ctx.input(node, i)`` (a MIL Var, or a numpy array for constants) and binds its outputs with
``ctx.bind(node, value)``. Q/DQ nodes are lowered by the context itself (they carry the scales
that verification checks), so they are in the table too, pointing at the context's methods.

Only ``coremltools.converters.mil`` is imported, and only inside functions: importing this
module must not import the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from deploykit.canonical import attrs

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from deploykit_coreml.lowering import LoweringContext

Emitter = Callable[["LoweringContext", "onnx.NodeProto"], None]


def _mb():
    from coremltools.converters.mil import Builder as mb

    return mb


def _is_const(value) -> bool:
    return isinstance(value, np.ndarray)


def _is_bool(value) -> bool:
    if _is_const(value):
        return bool(np.asarray(value).dtype == bool)
    from coremltools.converters.mil.mil import types

    return bool(types.is_bool(value.dtype))


def _is_int32(value) -> bool:
    from coremltools.converters.mil.mil import types

    return bool(value.dtype == types.int32)


class PartialShape(np.ndarray):
    """The Shape of a tensor with a dynamic batch: known dims, and -1 (Reshape's "infer") for the
    batch. Enough for Resize sizes and Reshape targets; arithmetic on it is refused."""

    def __new__(cls, dims):
        return np.asarray([int(d) if _static(d) else -1 for d in dims], np.int32).view(cls)


def _partial(*values) -> bool:
    return any(isinstance(v, PartialShape) and np.any(np.asarray(v) < 0) for v in values)


def _shape(value) -> tuple:
    return tuple(value.shape)


def _rank(value) -> int:
    return len(value.shape)


def _static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def _axes(values, rank: int) -> list[int]:
    return [int(a) + rank if int(a) < 0 else int(a) for a in np.asarray(values).reshape(-1)]


# --------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------
_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sqrt": "sqrt",
          "Exp": "exp", "Log": "log", "Abs": "abs", "Floor": "floor", "Ceil": "ceil",
          "Reciprocal": "inverse", "Sin": "sin", "Cos": "cos"}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "real_div", "Pow": "pow",
           "Greater": "greater", "Less": "less", "Equal": "equal", "GreaterOrEqual": "greater_equal",
           "LessOrEqual": "less_equal", "Max": "maximum", "Min": "minimum", "And": "logical_and",
           "Or": "logical_or"}
_NUMPY_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power,
                 "Greater": np.greater, "Less": np.less, "Equal": np.equal, "GreaterOrEqual": np.greater_equal,
                 "LessOrEqual": np.less_equal, "Max": np.maximum, "Min": np.minimum,
                 "And": np.logical_and, "Or": np.logical_or}


def unary(ctx, node):
    x = ctx.input(node, 0)
    ctx.bind(node, getattr(_mb(), _UNARY[node.op_type])(x=x, name=ctx.name(node)))


def binary(ctx, node):
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    if _is_const(a) and _is_const(b) and node.op_type in _NUMPY_BINARY:  # shape arithmetic: fold
        if _partial(a, b):
            ctx.unsupported(node, "arithmetic on the dynamic batch size; use batch = \"fixed\"")
        ctx.bind(node, ctx.constant(_NUMPY_BINARY[node.op_type](np.asarray(a), np.asarray(b))))
        return
    op = _BINARY[node.op_type]
    if node.op_type == "Div" and ctx.is_integer(a) and ctx.is_integer(b):
        op = "floor_div"  # ONNX integer Div truncates; operands here are shapes/indices (>= 0)
    ctx.bind(node, getattr(_mb(), op)(x=a, y=b, name=ctx.name(node)))


def neg(ctx, node):
    x = ctx.input(node, 0)
    ctx.bind(node, _mb().mul(x=x, y=ctx.scalar_like(x, -1), name=ctx.name(node)))


def clip(ctx, node):
    mb = _mb()
    x = ctx.input(node, 0)
    a = attrs(node)
    lo = ctx.const(node, 1) if len(node.input) > 1 and node.input[1] else a.get("min")
    hi = ctx.const(node, 2) if len(node.input) > 2 and node.input[2] else a.get("max")
    lo = None if lo is None else float(np.asarray(lo))
    hi = None if hi is None else float(np.asarray(hi))
    name = ctx.name(node)
    if lo == 0.0 and hi == 6.0:
        ctx.bind(node, mb.relu6(x=x, name=name))
    elif lo is not None and hi is not None:
        ctx.bind(node, mb.clip(x=x, alpha=np.float32(lo), beta=np.float32(hi), name=name))
    elif lo is not None:
        ctx.bind(node, mb.maximum(x=x, y=np.float32(lo), name=name))
    elif hi is not None:
        ctx.bind(node, mb.minimum(x=x, y=np.float32(hi), name=name))
    else:
        ctx.bind(node, mb.identity(x=x, name=name))


def hard_sigmoid(ctx, node):
    a = attrs(node)
    ctx.bind(node, _mb().sigmoid_hard(x=ctx.input(node, 0), alpha=np.float32(a.get("alpha", 0.2)),
                                      beta=np.float32(a.get("beta", 0.5)), name=ctx.name(node)))


def hard_swish(ctx, node):
    mb = _mb()
    x = ctx.input(node, 0)
    name = ctx.name(node)
    gate = mb.sigmoid_hard(x=x, alpha=np.float32(1 / 6), beta=np.float32(0.5), name=ctx.fresh(name + "_gate"))
    ctx.bind(node, mb.mul(x=x, y=gate, name=name))


def leaky_relu(ctx, node):
    ctx.bind(node, _mb().leaky_relu(x=ctx.input(node, 0), alpha=np.float32(attrs(node).get("alpha", 0.01)),
                                    name=ctx.name(node)))


def where(ctx, node):
    mb = _mb()
    cond, a, b = (ctx.input(node, i) for i in range(3))
    name = ctx.name(node)
    if _is_const(cond):
        cond = ctx.constant(cond.astype(bool))
    elif len(_shape(cond)) > max(len(np.shape(a)), len(np.shape(b))) or _is_const(a) and _is_const(b):
        # MIL's select takes its output shape from a and b only: give one of them cond's shape
        if _is_const(a) and a.size == 1:
            a = mb.fill_like(ref_tensor=cond, value=a.reshape(()), name=ctx.fresh(name + "_a"))
        else:
            zero = mb.fill_like(ref_tensor=cond, value=ctx.scalar_like(a, 0), name=ctx.fresh(name + "_zero"))
            a = mb.add(x=a, y=zero, name=ctx.fresh(name + "_a"))
    ctx.bind(node, mb.select(cond=cond, a=a, b=b, name=name))


def cast(ctx, node):
    from onnx import TensorProto

    to = attrs(node)["to"]
    dtype = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.INT32: "int32",
             TensorProto.INT64: "int32", TensorProto.BOOL: "bool"}.get(to)
    if dtype is None:
        ctx.unsupported(node, f"Cast to {TensorProto.DataType.Name(to)} has no Core ML type")
        return  # unsupported() raises
    x = ctx.input(node, 0)
    if _is_const(x):
        ctx.bind(node, ctx.constant(x.astype({"fp32": np.float32, "fp16": np.float32, "int32": np.int32,
                                              "bool": bool}[dtype])))
        return
    ctx.bind(node, _mb().cast(x=x, dtype=dtype, name=ctx.name(node)))


def identity(ctx, node):
    ctx.bind(node, ctx.input(node, 0))


# --------------------------------------------------------------------------------------
# convolution, linear, matmul
# --------------------------------------------------------------------------------------
def _conv_padding(node, spatial: int) -> dict:
    a = attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return {"pad_type": "valid"}
    if auto_pad == "SAME_UPPER":
        return {"pad_type": "same"}
    if auto_pad == "SAME_LOWER":
        return {"pad_type": "same_lower"}
    pads = list(a.get("pads", [0] * (2 * spatial)))
    # ONNX: [x1_begin, x2_begin, ..., x1_end, x2_end]; MIL: [x1_begin, x1_end, x2_begin, x2_end]
    mil = [int(p) for pair in zip(pads[:spatial], pads[spatial:]) for p in pair]
    return {"pad_type": "custom", "pad": np.array(mil, np.int32)}


def _conv_kwargs(ctx, node) -> dict:
    """MIL arguments shared by conv and conv_transpose (ONNX attributes, weight, bias)."""
    a = attrs(node)
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    spatial = _rank(x) - 2
    kwargs = dict(x=x, weight=w, strides=np.array(a.get("strides", [1] * spatial), np.int32),
                  dilations=np.array(a.get("dilations", [1] * spatial), np.int32),
                  groups=np.int32(a.get("group", 1)), name=ctx.name(node), **_conv_padding(node, spatial))
    if len(node.input) > 2 and node.input[2]:
        kwargs["bias"] = ctx.const(node, 2)
    return kwargs


def conv(ctx, node):
    ctx.bind(node, _mb().conv(**_conv_kwargs(ctx, node)))


def conv_transpose(ctx, node):
    a = attrs(node)
    if any(a.get("output_padding", [])) or a.get("output_shape"):
        ctx.unsupported(node, "output_padding / output_shape are not lowered")
    ctx.bind(node, _mb().conv_transpose(**_conv_kwargs(ctx, node)))


def gemm(ctx, node):
    mb = _mb()
    a = attrs(node)
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    name = ctx.name(node)
    if a.get("transA", 0):
        x = mb.transpose(x=x, perm=np.array([1, 0], np.int32), name=ctx.fresh(name + "_transA"))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    bias = ctx.const(node, 2) if len(node.input) > 2 and node.input[2] else None
    if bias is not None and beta != 1.0:
        bias = (bias * beta).astype(np.float32)
    plain_bias = bias is not None and bias.ndim <= 1
    if a.get("transB", 0) and alpha == 1.0 and (bias is None or plain_bias):
        # Gemm(transB=1) is Core ML's linear: weight [N, K], stored exactly as in the canonical model
        kwargs = {"bias": np.broadcast_to(bias, (_shape(w)[0],)).astype(np.float32)} if bias is not None else {}
        ctx.bind(node, mb.linear(x=x, weight=w, name=name, **kwargs))
        return
    y = mb.matmul(x=x, y=w, transpose_y=bool(a.get("transB", 0)),
                  name=name if alpha == 1.0 and bias is None else ctx.fresh(name + "_matmul"))
    if alpha != 1.0:
        y = mb.mul(x=y, y=np.float32(alpha), name=name if bias is None else ctx.fresh(name + "_alpha"))
    if bias is not None:
        y = mb.add(x=y, y=bias, name=name)
    ctx.bind(node, y)


def matmul(ctx, node):
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    ctx.bind(node, _mb().matmul(x=a, y=b, name=ctx.name(node)))


# --------------------------------------------------------------------------------------
# pooling, reductions, normalisation
# --------------------------------------------------------------------------------------
def _pool(ctx, node, op: str):
    a = attrs(node)
    x = ctx.input(node, 0)
    spatial = _rank(x) - 2
    if len(node.output) > 1 and node.output[1]:
        ctx.unsupported(node, "MaxPool indices output is not lowered")
    kwargs = dict(x=x, kernel_sizes=np.array(a["kernel_shape"], np.int32),
                  strides=np.array(a.get("strides", [1] * spatial), np.int32),
                  ceil_mode=bool(a.get("ceil_mode", 0)), name=ctx.name(node), **_conv_padding(node, spatial))
    if any(d != 1 for d in a.get("dilations", [1] * spatial)):
        ctx.unsupported(node, "dilated pooling has no Core ML op")
    if op == "avg_pool":
        kwargs["exclude_padding_from_average"] = not bool(a.get("count_include_pad", 0))
    ctx.bind(node, getattr(_mb(), op)(**kwargs))


def max_pool(ctx, node):
    _pool(ctx, node, "max_pool")


def average_pool(ctx, node):
    _pool(ctx, node, "avg_pool")


def _global_pool(ctx, node, op: str):
    x = ctx.input(node, 0)
    axes = np.arange(2, _rank(x), dtype=np.int32)
    ctx.bind(node, getattr(_mb(), op)(x=x, axes=axes, keep_dims=True, name=ctx.name(node)))


def global_average_pool(ctx, node):
    _global_pool(ctx, node, "reduce_mean")


def global_max_pool(ctx, node):
    _global_pool(ctx, node, "reduce_max")


def _reduce(ctx, node, op: str):
    a = attrs(node)
    x = ctx.input(node, 0)
    if len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node, 1)
    else:
        axes = a.get("axes")
    if axes is None or np.asarray(axes).size == 0:
        if a.get("noop_with_empty_axes", 0):
            ctx.bind(node, x)
            return
        axes = range(_rank(x))
    ctx.bind(node, getattr(_mb(), op)(x=x, axes=np.array(_axes(axes, _rank(x)), np.int32),
                                      keep_dims=bool(a.get("keepdims", 1)), name=ctx.name(node)))


def reduce_mean(ctx, node):
    _reduce(ctx, node, "reduce_mean")


def reduce_max(ctx, node):
    _reduce(ctx, node, "reduce_max")


def reduce_sum(ctx, node):
    _reduce(ctx, node, "reduce_sum")


def softmax(ctx, node):
    ctx.bind(node, _mb().softmax(x=ctx.input(node, 0), axis=np.int32(attrs(node).get("axis", -1)),
                                 name=ctx.name(node)))


def layer_norm(ctx, node):
    a = attrs(node)
    x = ctx.input(node, 0)
    if any(o for o in node.output[1:]):
        ctx.unsupported(node, "LayerNormalization mean / inv_std_dev outputs are not lowered")
    rank = _rank(x)
    axis = int(a.get("axis", -1)) % rank
    kwargs = {"gamma": ctx.const(node, 1)}
    if len(node.input) > 2 and node.input[2]:
        kwargs["beta"] = ctx.const(node, 2)
    normalized = _shape(x)[axis:]
    for key in list(kwargs):  # Core ML wants gamma/beta of the normalised shape exactly
        kwargs[key] = np.broadcast_to(kwargs[key], normalized).astype(np.float32)
    ctx.bind(node, _mb().layer_norm(x=x, axes=np.arange(axis, rank, dtype=np.int32),
                                    epsilon=np.float32(a.get("epsilon", 1e-5)), name=ctx.name(node), **kwargs))


# --------------------------------------------------------------------------------------
# data movement
# --------------------------------------------------------------------------------------
def concat(ctx, node):
    values = [ctx.input(node, i) for i in range(len(node.input))]
    axis = int(attrs(node)["axis"])
    if all(_is_const(v) for v in values):
        joined = ctx.constant(np.concatenate([np.asarray(v) for v in values], axis=axis))
        ctx.bind(node, joined.view(PartialShape) if _partial(*values) else joined)
        return
    ctx.bind(node, _mb().concat(values=values, axis=np.int32(axis), name=ctx.name(node)))


def reshape(ctx, node):
    x = ctx.input(node, 0)
    target = ctx.input(node, 1)
    if not _is_const(target):
        # computed on the device (dynamic sequence) from real dims, so never 0: allowzero cannot matter
        ctx.bind(node, _mb().reshape(x=x, shape=_int32(ctx, target, node.name), name=ctx.name(node)))
        return
    shape = np.asarray(target).astype(np.int64).copy()
    if np.count_nonzero(shape == -1) > 1:
        ctx.unsupported(node, "more than one inferred (-1 or dynamic) dimension in the target shape")
    if not attrs(node).get("allowzero", 0):  # 0 copies the input dimension
        for i, d in enumerate(shape):
            if d == 0:
                dim = _shape(x)[i]
                if not _static(dim):
                    ctx.unsupported(node, "a 0 in the shape copies a dynamic dimension")
                shape[i] = dim
    if _is_const(x):
        ctx.bind(node, ctx.constant(x.reshape(shape)))
        return
    ctx.bind(node, _mb().reshape(x=x, shape=shape.astype(np.int32), name=ctx.name(node)))


def flatten(ctx, node):
    x = ctx.input(node, 0)
    shape = _shape(x)
    axis = int(attrs(node).get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis  # 0..rank: axis == rank gives [N, 1]
    inner, outer = shape[axis:], shape[:axis]
    mb = _mb()
    if all(_static(d) for d in inner):
        target = np.array([-1, int(np.prod(inner, dtype=np.int64))], np.int32) if axis > 0 else np.array([1, -1], np.int32)
    elif all(_static(d) for d in outer):
        target = np.array([int(np.prod(outer, dtype=np.int64)), -1], np.int32)
    else:  # dynamic on both sides (a sequence): the outer size is computed in the program
        name = ctx.name(node)
        dims = mb.shape(x=x, name=ctx.fresh(name + "_shape"))
        outer_size = mb.reduce_prod(x=_slice_1d(dims, 0, axis, ctx.fresh(name + "_outer")), axes=np.array([0], np.int32),
                                    keep_dims=True, name=ctx.fresh(name + "_size"))
        target = mb.concat(values=[outer_size, np.array([-1], np.int32)], axis=np.int32(0), name=ctx.fresh(name + "_to"))
        ctx.bind(node, mb.reshape(x=x, shape=target, name=name))
        return
    ctx.bind(node, mb.reshape(x=x, shape=target, name=ctx.name(node)))


def transpose(ctx, node):
    x = ctx.input(node, 0)
    perm = attrs(node).get("perm", list(range(_rank(x)))[::-1])
    if _is_const(x):
        ctx.bind(node, ctx.constant(np.transpose(x, perm)))
        return
    ctx.bind(node, _mb().transpose(x=x, perm=np.array(perm, np.int32), name=ctx.name(node)))


def _axes_input(ctx, node):
    if len(node.input) > 1 and node.input[1]:
        return ctx.const(node, 1)
    return attrs(node).get("axes")


def squeeze(ctx, node):
    x = ctx.input(node, 0)
    axes = _axes_input(ctx, node)
    if _is_const(x):
        ctx.bind(node, ctx.constant(np.squeeze(x, axis=None if axes is None else tuple(_axes(axes, x.ndim)))))
        return
    kwargs = {} if axes is None else {"axes": np.array(_axes(axes, _rank(x)), np.int32)}
    ctx.bind(node, _mb().squeeze(x=x, name=ctx.name(node), **kwargs))


def unsqueeze(ctx, node):
    x = ctx.input(node, 0)
    axes = _axes(_axes_input(ctx, node), _rank(x) + np.asarray(_axes_input(ctx, node)).size)
    if _is_const(x):
        ctx.bind(node, ctx.constant(np.expand_dims(x, tuple(axes))))
        return
    ctx.bind(node, _mb().expand_dims(x=x, axes=np.array(axes, np.int32), name=ctx.name(node)))


def gather(ctx, node):
    x, indices = ctx.input(node, 0), ctx.input(node, 1)
    axis = int(attrs(node).get("axis", 0))
    if _is_const(indices):
        indices = indices.astype(np.int32)
    if _is_const(x) and _is_const(indices):
        taken = ctx.constant(np.take(np.asarray(x), indices, axis=axis))
        ctx.bind(node, taken.view(PartialShape) if _partial(x) and np.any(taken < 0) else taken)
        return
    mb = _mb()
    name = ctx.name(node)
    if _is_bool(x):  # MIL gathers no booleans: through int32 and back, exactly (the legacy export's mask)
        x = ctx.constant(np.asarray(x).astype(np.int32)) if _is_const(x) else \
            mb.cast(x=x, dtype="int32", name=ctx.fresh(name + "_int"))
        y = mb.gather(x=x, indices=_int32(ctx, indices, name), axis=np.int32(axis), name=ctx.fresh(name + "_gather"))
        ctx.bind(node, mb.cast(x=y, dtype="bool", name=name))
        return
    ctx.bind(node, mb.gather(x=x, indices=indices, axis=np.int32(axis), name=name))


def _dynamic_slice(ctx, node, x):
    """Slice whose starts or ends are computed on the device (a dynamic sequence length)."""
    mb = _mb()
    rank = _rank(x) if not _is_const(x) else np.ndim(x)
    starts, ends = ctx.input(node, 1), ctx.input(node, 2)
    axes = _axes(ctx.const(node, 3), rank) if len(node.input) > 3 and node.input[3] else list(range(rank))
    steps = ctx.const(node, 4).astype(np.int64) if len(node.input) > 4 and node.input[4] else np.ones(len(axes))
    if np.any(steps != 1):
        ctx.unsupported(node, "Slice with computed bounds and steps other than 1")
    name = ctx.name(node)

    def full(bounds, default: int):
        parts = []
        for ax in range(rank):
            if ax not in axes:
                parts.append(np.array([default], np.int32))
            elif _is_const(bounds):
                v = int(np.clip(np.asarray(bounds).reshape(-1)[axes.index(ax)], np.iinfo(np.int32).min,
                                np.iinfo(np.int32).max))
                parts.append(np.array([v], np.int32))
            else:
                i = axes.index(ax)
                piece = _int32(ctx, bounds, name)
                if len(axes) > 1:
                    piece = _slice_1d(piece, i, i + 1, ctx.fresh(name + "_b"))
                elif _rank(piece) == 0:
                    piece = mb.expand_dims(x=piece, axes=np.array([0], np.int32), name=ctx.fresh(name + "_b"))
                parts.append(piece)
        if all(_is_const(p) for p in parts):
            return np.concatenate(parts)
        return mb.concat(values=parts, axis=np.int32(0), name=ctx.fresh(name + "_bounds"))

    masks = np.array([ax not in axes for ax in range(rank)])
    ctx.bind(node, mb.slice_by_index(x=x, begin=full(starts, 0), end=full(ends, 0), begin_mask=masks,
                                     end_mask=masks, name=name))


def slice_(ctx, node):
    x = ctx.input(node, 0)
    if any(not _is_const(ctx.input(node, i)) for i in (1, 2)):
        _dynamic_slice(ctx, node, x)
        return
    shape = _shape(x) if not _is_const(x) else np.shape(x)
    rank = len(shape)
    starts, ends = ctx.const(node, 1).astype(np.int64), ctx.const(node, 2).astype(np.int64)
    axes = _axes(ctx.const(node, 3), rank) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = ctx.const(node, 4).astype(np.int64) if len(node.input) > 4 and node.input[4] else np.ones(len(starts), np.int64)
    begin, end = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
    stride = np.ones(rank, np.int64)
    begin_mask, end_mask = [True] * rank, [True] * rank
    for s, e, ax, st in zip(starts, ends, axes, steps):
        dim = shape[ax]
        if st < 0:
            ctx.unsupported(node, "negative Slice steps are not lowered")
        begin[ax], stride[ax] = s, st
        begin_mask[ax] = False
        if _static(dim):
            begin[ax] = min(max(s + dim if s < 0 else s, 0), dim)
        if e >= (dim if _static(dim) else np.iinfo(np.int32).max):  # "to the end" (INT64_MAX in exports)
            end_mask[ax] = True
        else:
            end[ax], end_mask[ax] = e, False
    if _is_const(x):
        index = tuple(slice(None if begin_mask[i] else int(begin[i]), None if end_mask[i] else int(end[i]),
                            int(stride[i])) for i in range(rank))
        ctx.bind(node, ctx.constant(x[index]))
        return
    ctx.bind(node, _mb().slice_by_index(x=x, begin=begin.astype(np.int32), end=end.astype(np.int32),
                                        stride=stride.astype(np.int32), begin_mask=np.array(begin_mask),
                                        end_mask=np.array(end_mask), name=ctx.name(node)))


def _broadcast_to(ctx, node, x, target):
    """ONNX Expand (bidirectional broadcast) to a shape computed on the device: x + zeros(shape).
    Booleans go through int32 (MIL has no boolean add), so masks stay exact."""
    mb = _mb()
    name = ctx.name(node)
    is_bool = _is_bool(x)
    if _is_const(x):
        x = ctx.constant(np.asarray(x).astype(np.int32) if is_bool else x)
    elif is_bool:
        x = mb.cast(x=x, dtype="int32", name=ctx.fresh(name + "_int"))
    zero = np.float32(0) if not ctx.is_integer(x) else np.int32(0)
    zeros = mb.fill(shape=_int32(ctx, target, name), value=zero, name=ctx.fresh(name + "_zeros"))
    y = mb.add(x=x, y=zeros, name=ctx.fresh(name + "_add") if is_bool else name)
    ctx.bind(node, mb.cast(x=y, dtype="bool", name=name) if is_bool else y)


def _int32(ctx, value, name: str):
    """A shape/index operand as int32 (Core ML has no int64 tensors)."""
    if _is_const(value):
        return np.asarray(value).astype(np.int32)
    if _is_int32(value):
        return value
    return _mb().cast(x=value, dtype="int32", name=ctx.fresh(name + "_i32"))


def expand(ctx, node):
    x = ctx.input(node, 0)
    target_value = ctx.input(node, 1)
    if not _is_const(target_value):
        _broadcast_to(ctx, node, x, target_value)
        return
    target = [int(d) for d in target_value]
    shape = list(_shape(x))
    rank = max(len(shape), len(target))
    shape = [1] * (rank - len(shape)) + shape
    target = [1] * (rank - len(target)) + target
    if _is_const(x):
        ctx.bind(node, ctx.constant(x * np.ones(target, x.dtype)))
        return
    name = ctx.name(node)
    if len(_shape(x)) < rank:
        x = _mb().expand_dims(x=x, axes=np.arange(rank - len(_shape(x)), dtype=np.int32),
                              name=ctx.fresh(name + "_rank"))
    reps = []
    for have, want in zip(shape, target):
        if want < 0 and _static(have):
            ctx.unsupported(node, "expanding to the dynamic batch size; use batch = \"fixed\"")
        if want == 1 or (not _static(have)) or have == want:
            reps.append(1)
        elif have == 1:
            reps.append(want)
        else:
            ctx.unsupported(node, f"cannot expand dimension {have} to {want}")
    ctx.bind(node, _mb().tile(x=x, reps=np.array(reps, np.int32), name=name))


def shape(ctx, node):
    x = ctx.input(node, 0)
    dims = _shape(x)
    a = attrs(node)
    start, end = a.get("start", 0), a.get("end", len(dims))
    if _is_const(x) or all(_static(d) for d in dims[start:end]):
        ctx.bind(node, ctx.constant(np.array(dims[start:end] if not _is_const(x) else np.shape(x)[start:end],
                                             np.int32)))
    elif all(_static(d) for d in dims[1:]):
        # only the batch is dynamic: a constant with -1 for it, enough for Reshape / Resize targets
        ctx.bind(node, PartialShape(dims[start:end]))
    else:  # a dynamic sequence: the shape is computed on the device (MIL shape op, int32)
        mb = _mb()
        name = ctx.name(node)
        value = mb.shape(x=x, name=name if (start, end) == (0, len(dims)) else ctx.fresh(name + "_all"))
        if (start, end) != (0, len(dims)):
            value = _slice_1d(value, start, end, name)
        ctx.bind(node, value)


def _slice_1d(value, start: int, end: int, name: str):
    return _mb().slice_by_index(x=value, begin=np.array([start], np.int32), end=np.array([end], np.int32),
                                name=name)


def pad(ctx, node):
    a = attrs(node)
    x = ctx.input(node, 0)
    rank = _rank(x)
    pads = ctx.const(node, 1).astype(np.int64) if len(node.input) > 1 else np.array(a["pads"], np.int64)
    axes = _axes(ctx.const(node, 3), rank) if len(node.input) > 3 and node.input[3] else list(range(rank))
    begins, ends = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
    begins[axes], ends[axes] = pads[:len(axes)], pads[len(axes):]
    if np.any(begins < 0) or np.any(ends < 0):
        ctx.unsupported(node, "negative pads (cropping) are not lowered")
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    mil_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if mil_mode is None:
        ctx.unsupported(node, f"pad mode '{mode}' has no Core ML equivalent")
    value = ctx.const(node, 2) if len(node.input) > 2 and node.input[2] else np.float32(0)
    first = next((i for i in range(rank) if begins[i] or ends[i]), rank)
    if first == rank:  # nothing to pad
        ctx.bind(node, x)
        return
    if mil_mode != "constant":
        first = min(first, rank - 2)  # reflect / replicate pad only the last two dims
        if np.any(begins[:first]) or np.any(ends[:first]):
            ctx.unsupported(node, f"{mode} padding outside the last two dimensions")
    flat = np.stack([begins[first:], ends[first:]], axis=1).reshape(-1).astype(np.int32)
    ctx.bind(node, _mb().pad(x=x, pad=flat, mode=mil_mode, constant_val=np.float32(np.asarray(value).reshape(-1)[0]),
                             name=ctx.name(node)))


def resize(ctx, node):
    a = attrs(node)
    x = ctx.input(node, 0)
    shape = _shape(x)
    if len(shape) != 4:
        ctx.unsupported(node, "only 4-D (NCHW) Resize is lowered")
    scales = ctx.const(node, 2) if len(node.input) > 2 and node.input[2] else None
    sizes = ctx.const(node, 3) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size:
        sh, sw = float(scales[-2]), float(scales[-1])
    elif sizes is not None and all(_static(d) for d in shape[2:]) and np.all(np.asarray(sizes)[-2:] > 0):
        sh, sw = float(sizes[-2]) / shape[2], float(sizes[-1]) / shape[3]
    else:
        ctx.unsupported(node, "Resize needs constant scales, or sizes with static spatial dims")
    if scales is not None and scales.size and np.any(scales[:2] != 1):
        ctx.unsupported(node, "Resize of the batch or channel dimension")

    def text(key, default):
        v = a.get(key, default)
        return v.decode() if isinstance(v, bytes) else v
    mode, coord = text("mode", "nearest"), text("coordinate_transformation_mode", "half_pixel")
    mb = _mb()
    name = ctx.name(node)
    if mode == "nearest":
        if coord not in ("asymmetric", "half_pixel", "pytorch_half_pixel") or not (sh.is_integer() and sw.is_integer()):
            ctx.unsupported(node, f"nearest Resize with coordinate mode '{coord}' and scales {sh}, {sw}: "
                                  "only integer upsampling is lowered")
        ctx.bind(node, mb.upsample_nearest_neighbor(x=x, scale_factor_height=np.float32(sh),
                                                    scale_factor_width=np.float32(sw), name=name))
    elif mode == "linear":
        if coord not in ("align_corners", "half_pixel", "pytorch_half_pixel", "asymmetric"):
            ctx.unsupported(node, f"linear Resize with coordinate mode '{coord}'")
        ctx.bind(node, mb.upsample_bilinear(x=x, scale_factor_height=np.float32(sh), scale_factor_width=np.float32(sw),
                                            align_corners=coord == "align_corners",
                                            half_pixel_centers=coord in ("half_pixel", "pytorch_half_pixel"),
                                            name=name))
    else:
        ctx.unsupported(node, f"Resize mode '{mode}'")


def constant(ctx, node):
    from onnx import numpy_helper

    a = {x.name: x for x in node.attribute}
    if "value" not in a:
        ctx.unsupported(node, "only Constant with a 'value' tensor is lowered")
    ctx.bind(node, ctx.constant(numpy_helper.to_array(a["value"].t)))


def range_(ctx, node):
    """ONNX Range (positions, the attention mask's indices): range_1d on scalars."""
    start, limit, delta = (ctx.input(node, i) for i in range(3))
    if all(_is_const(v) for v in (start, limit, delta)):
        if _partial(start, limit, delta):
            ctx.unsupported(node, "Range over the dynamic batch size; use batch = \"fixed\"")
        ctx.bind(node, ctx.constant(np.arange(np.asarray(start).item(), np.asarray(limit).item(),
                                              np.asarray(delta).item())))
        return
    mb = _mb()
    name = ctx.name(node)
    integer = any(ctx.is_integer(v) for v in (start, limit, delta))

    def scalar(value, i):
        if _is_const(value):
            return np.asarray(value).reshape(()).astype(np.int32 if integer else np.float32)
        if _rank(value) > 0:
            value = mb.squeeze(x=value, name=ctx.fresh(f"{name}_s{i}"))
        return _int32(ctx, value, name) if integer else value

    ctx.bind(node, mb.range_1d(start=scalar(start, 0), end=scalar(limit, 1), step=scalar(delta, 2), name=name))


def gather_nd(ctx, node):
    """ONNX GatherND; boolean data (the attention mask) goes through int32 and back, exactly."""
    mb = _mb()
    x, indices = ctx.input(node, 0), ctx.input(node, 1)
    batch_dims = int(attrs(node).get("batch_dims", 0))
    name = ctx.name(node)
    if _is_const(x) and _is_const(indices):
        ctx.unsupported(node, "GatherND of constants (fold it before quantizing)")
    is_bool = _is_bool(x)
    if is_bool:
        x = ctx.constant(np.asarray(x).astype(np.int32)) if _is_const(x) else \
            mb.cast(x=x, dtype="int32", name=ctx.fresh(name + "_int"))
    kwargs = {"batch_dims": np.int32(batch_dims)} if batch_dims else {}
    y = mb.gather_nd(x=x, indices=_int32(ctx, indices, name), name=ctx.fresh(name + "_int") if is_bool else name,
                     **kwargs)
    ctx.bind(node, mb.cast(x=y, dtype="bool", name=name) if is_bool else y)


def is_nan(ctx, node):
    x = ctx.input(node, 0)
    if _is_const(x):
        ctx.bind(node, np.isnan(np.asarray(x)))
        return
    ctx.bind(node, _mb().not_equal(x=x, y=x, name=ctx.name(node)))  # NaN is the only value unequal to itself


def constant_of_shape(ctx, node):
    from onnx import numpy_helper

    a = {x.name: x for x in node.attribute}
    value = numpy_helper.to_array(a["value"].t).reshape(-1)[0] if "value" in a else np.float32(0)
    target = ctx.input(node, 0)
    if _is_const(target):
        if _partial(target):
            ctx.unsupported(node, "ConstantOfShape of the dynamic batch size; use batch = \"fixed\"")
        ctx.bind(node, ctx.constant(np.full([int(d) for d in np.asarray(target)], value)))
        return
    mb = _mb()
    name = ctx.name(node)
    fill = ctx.constant(np.asarray(value).astype(np.int32) if np.asarray(value).dtype == bool else np.asarray(value))
    y = mb.fill(shape=_int32(ctx, target, name), value=fill.reshape(()),
                name=ctx.fresh(name + "_int") if np.asarray(value).dtype == bool else name)
    ctx.bind(node, mb.cast(x=y, dtype="bool", name=name) if np.asarray(value).dtype == bool else y)


def _quantize(ctx, node):
    ctx.quantize(node)


def _dequantize(ctx, node):
    ctx.dequantize(node)


OP_TABLE: dict[str, Emitter] = {
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
    "Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": matmul,
    **{op: unary for op in _UNARY}, **{op: binary for op in _BINARY},
    "Neg": neg, "Clip": clip, "HardSigmoid": hard_sigmoid, "HardSwish": hard_swish, "LeakyRelu": leaky_relu,
    "Where": where, "Cast": cast, "Identity": identity, "Dropout": identity,
    "MaxPool": max_pool, "AveragePool": average_pool, "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool, "ReduceMean": reduce_mean, "ReduceMax": reduce_max,
    "ReduceSum": reduce_sum, "Softmax": softmax, "LayerNormalization": layer_norm,
    "Concat": concat, "Reshape": reshape, "Flatten": flatten, "Transpose": transpose,
    "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Gather": gather, "Slice": slice_, "Expand": expand,
    "Shape": shape, "Pad": pad, "Resize": resize, "Constant": constant,
    "Range": range_, "GatherND": gather_nd, "IsNaN": is_nan, "ConstantOfShape": constant_of_shape,
}
