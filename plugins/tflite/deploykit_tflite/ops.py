"""The op table: ONNX op type -> function that rebuilds the node in TensorFlow (NHWC) and
gives its output the canonical (or table, or TFLite-fixed) parameters through ``Lowering.emit``.

``OPS`` lower to int8 TFLite kernels; ``FLOAT_OPS`` have none and run in float, only with
``allow_float_fallback``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx

from deploykit.backend import output_names
from deploykit.canonical import attrs
from deploykit_tflite.lowering import NCHW_TO_NHWC, NHWC_TO_NCHW, Lowering, QuantSpec, same_params


def qdq(lw: Lowering, node: onnx.NodeProto) -> None:
    if lw.g.is_weight_dq(node):
        return  # consumers read weights through Lowering.weight_filter / const
    src = node.input[0]
    if node.op_type == "DequantizeLinear":
        lw.values[node.output[0]] = lw.values[src]
        if src in lw.quantized:
            lw.quantized[node.output[0]] = lw.quantized[src]
        return
    p = lw.g.params(node)
    spec = QuantSpec(float(p.scale.reshape(-1)[0]), int(p.zero_point.reshape(-1)[0]), "canonical", src)
    t = lw.values[src]
    before = lw.quantized.get(src)
    if before is None:  # after a float-fallback op: quantize here
        t = lw.fake_quant(t, spec, src)
    elif not same_params(before, spec):  # e.g. a TFLite-fixed output (Tanh) read through a canonical Q
        t = lw.requantize(t, before, spec)
    lw.values[node.output[0]] = t
    lw.quantized[node.output[0]] = spec


def fused_activation(lw: Lowering, node: onnx.NodeProto) -> str | None:
    """The TFLite fused activation an ONNX node is, if any (Relu, Relu6, ReluN1To1)."""
    if node.op_type == "Relu":
        return "relu"
    if node.op_type == "Clip":
        lo, hi = _clip_bounds(lw, node)
        if lo == 0 and hi == 6:
            return "relu6"
        if lo == 0 and hi == np.inf:
            return "relu"
        if lo == -1 and hi == 1:
            return "relu_n1_to_1"
    return None


def _clip_bounds(lw: Lowering, node: onnx.NodeProto) -> tuple[float, float]:
    a = attrs(node)
    lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        c = lw.const(node.input[1])
        lo = float(c) if c is not None else None
    if len(node.input) > 2 and node.input[2]:
        c = lw.const(node.input[2])
        hi = float(c) if c is not None else None
    return lo, hi


def _padding(in_hw: list[int], kernel: list[int], strides: list[int], dilations: list[int], pads: list[int],
             auto_pad: str) -> str | list[tuple[int, int]]:
    """"VALID", "SAME", or explicit [(top, bottom), (left, right)] for ONNX pads."""
    if auto_pad in ("SAME_UPPER",):
        return "SAME"
    if auto_pad == "VALID" or not any(pads):
        return "VALID"
    same = []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        eff = (k - 1) * d + 1
        out = -(-size // s)
        total = max((out - 1) * s + eff - size, 0)
        same.append((total // 2, total - total // 2))
    explicit = [(pads[0], pads[2]), (pads[1], pads[3])]
    return "SAME" if explicit == same else explicit


def _spatial(node: onnx.NodeProto, x) -> tuple[dict, list[int], list[int], list[int], list[int], str]:
    a = attrs(node)
    kernel = list(a.get("kernel_shape", []))
    n = len(kernel) or 2
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    pads = list(a.get("pads", [0] * 2 * n))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return a, kernel, strides, dilations, pads, auto_pad


def _explicit_pad(lw: Lowering, node: onnx.NodeProto, x, pad: list[tuple[int, int]], value: float = 0.0):
    """Zero padding (exact in int8: zero point 0) before a VALID conv or pool; same scale as x."""
    y = lw.tf.pad(x, [[0, 0], list(pad[0]), list(pad[1]), [0, 0]], constant_values=value)
    src = lw.quantized.get(node.input[0])
    if src is not None:
        y = lw.fake_quant(y, QuantSpec(src.scale, src.zero_point, "derived", f"padding of {node.name}"),
                          f"{node.name}_pad")
    return y


def group_kind(lw: Lowering, node: onnx.NodeProto) -> str:
    group = attrs(node).get("group", 1)
    if group == 1:
        return "regular"
    w = lw.g.weight(node.input[1])
    per_group_in = w[0].shape[1] if w is not None else None
    return "depthwise" if per_group_in == 1 else "grouped"


def _conv(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    x = lw.values[node.input[0]]
    if lw.rank(x) != 4:
        raise lw.error(node, f"only 2-D convolutions are supported (input rank {lw.rank(x)})")
    a, kernel, strides, dilations, pads, auto_pad = _spatial(node, x)
    group = a.get("group", 1)
    kind = group_kind(lw, node)
    kernel = kernel or list(lw.g.weight_of(node.input[1])[0].shape[2:])
    padding = _padding([int(x.shape[1]), int(x.shape[2])], kernel, strides, dilations, pads, auto_pad)
    if isinstance(padding, list):
        x = _explicit_pad(lw, node, x, padding)
        padding = "VALID"
    bias = lw.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if kind == "depthwise":
        channels = int(x.shape[3])
        # per-channel fake-quant over the output channels, then the depthwise [kH, kW, C, mult] shape
        f = lw.weight_filter(node, 1, lambda w: w.transpose(2, 3, 1, 0))  # [kH, kW, 1, C*mult]
        f = tf.reshape(f, [f.shape[0], f.shape[1], channels, -1])
        y = tf.nn.depthwise_conv2d(x, f, [1, *strides, 1], padding, dilations=dilations)
    elif kind == "regular":
        f = lw.weight_filter(node, 1, lambda w: w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        y = tf.nn.conv2d(x, f, [1, *strides, 1], padding, dilations=dilations)
    else:
        out_channels = lw.g.weight_of(node.input[1])[0].shape[0]
        per_group = out_channels // group
        # a per-channel fake-quant must not be split (the converter rejects it): one filter per group
        fs = [lw.weight_filter(node, 1, lambda w: w.transpose(2, 3, 1, 0), slice(i * per_group, (i + 1) * per_group))
              for i in range(group)]
        xs = tf.split(x, group, axis=3)
        spec = lw.spec_for(node.output[0], node)
        parts = []
        for i, (xi, fi) in enumerate(zip(xs, fs)):
            yi = tf.nn.conv2d(xi, fi, [1, *strides, 1], padding, dilations=dilations)
            if bias is not None:
                lw._last_weight = [n for n in lw.result.weights if lw.result.weights[n].node == node.name][i]
                lw.set_bias(bias, slice(i * per_group, (i + 1) * per_group))
                yi = tf.nn.bias_add(yi, bias[i * len(bias) // group:(i + 1) * len(bias) // group])
            parts.append(lw.fake_quant(yi, spec, f"{node.output[0]}_group{i}") if spec else yi)
        lw.emit(node, tf.concat(parts, axis=3), spec=spec)
        return
    lw.set_bias(bias)
    if bias is not None:
        y = tf.nn.bias_add(y, bias.astype(np.float32))
    lw.emit(node, y)


def _dense(lw: Lowering, node: onnx.NodeProto) -> None:
    """Gemm / MatMul with a constant weight, as a 1x1 CONV_2D: the converter rejects per-channel
    fake-quant on a MatMul weight ("mismatched quantized axes"), a 1x1 conv keeps it exact."""
    tf = lw.tf
    a = attrs(node)
    # a declared float island keeps its float constant weight (weight_filter makes it a float filter)
    float_island = node.name in lw.float_layers and node.input[1] in lw.g.initializers
    if lw.g.weight(node.input[1]) is None and not float_island:
        if node.op_type == "MatMul":
            return _matmul_activations(lw, node)
        raise lw.error(node, "the weight (input 1) must be a quantized constant")
    if node.op_type == "Gemm":
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise lw.error(node, "only Gemm with transA=0, alpha=1, beta=1 is supported")
    transposed = node.op_type == "Gemm" and bool(a.get("transB", 0))

    def to_kn(w: np.ndarray) -> np.ndarray:  # ONNX weight -> [K, N]
        return w.T if transposed else w

    weight = lw.require_const(node, 1) if float_island else lw.g.weight_of(node.input[1])[0]
    if weight.ndim != 2:
        raise lw.error(node, f"weight of rank {weight.ndim}: only 2-D weights are supported")
    x = lw.onnx_order(lw.values[node.input[0]])
    shape = lw.onnx_shape(lw.values[node.input[0]])
    k = shape[-1]
    f = lw.weight_filter(node, 1, lambda w: to_kn(w)[None, None])  # [1, 1, K, N]
    x4 = tf.reshape(x, [-1, 1, 1, k])
    y = tf.nn.conv2d(x4, f, [1, 1, 1, 1], "VALID")
    n = int(f.shape[-1])
    bias, out_node = None, node
    if len(node.input) > 2 and node.input[2]:
        bias = lw.require_const(node, 2).astype(np.float32).reshape(-1)
    elif node.op_type == "MatMul":
        bias, out_node = _bias_add_after(lw, node, n)
    lw.set_bias(bias)
    if bias is not None:
        y = tf.nn.bias_add(y, np.broadcast_to(bias, [n]).astype(np.float32))
    out_shape = [-1] + shape[1:-1] + [n] if len(shape) > 1 else [n]
    lw.emit(out_node, lw.stored(tf.reshape(y, out_shape)))


def _bias_add_after(lw: Lowering, node: onnx.NodeProto, n: int) -> tuple[np.ndarray | None, onnx.NodeProto]:
    """MatMul followed only by Add(constant bias of N values), as exported for nn.Linear on 3-D
    input: the Add becomes the conv's bias, as onnxruntime computes both in float."""
    consumers = lw.g.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add" or node.output[0] in output_names(lw.model):
        return None, node
    add = consumers[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = lw.const(other)
    if bias is None or bias.size not in (1, n) or any(d != 1 for d in bias.shape[:-1]):
        return None, node
    lw.absorbed.add(add.name)
    return bias.reshape(-1).astype(np.float32), add


def _matmul_activations(lw: Lowering, node: onnx.NodeProto) -> None:
    a = lw.onnx_order(lw.values[node.input[0]])
    b = lw.onnx_order(lw.values[node.input[1]])
    lw.emit(node, lw.stored(lw.tf.linalg.matmul(a, b)))


def _broadcast_operands(lw: Lowering, node: onnx.NodeProto, quantize_consts: bool):
    """Operands of an element-wise op, in the stored layout, broadcasting like ONNX."""
    tf = lw.tf
    ranks = [lw.rank(lw.values[n]) for n in node.input if n in lw.values]
    rank = max(ranks) if ranks else 0
    out = []
    for n in node.input:
        if n in lw.values:
            t = lw.values[n]
            if rank == 4 and lw.rank(t) < 4:
                shape = [1] * (4 - lw.rank(t)) + [int(d) for d in t.shape]
                t = tf.transpose(tf.reshape(t, shape), NCHW_TO_NHWC)
            out.append(t)
            continue
        c = lw.const(n)
        if c is None:
            raise KeyError(n)
        c = c.astype(np.float32)
        if rank == 4:
            c = c.reshape([1] * (4 - c.ndim) + list(c.shape)).transpose(NCHW_TO_NHWC)
        out.append(lw.constant_operand(node, c) if quantize_consts else tf.constant(c))
    return out


def _binary(fn_name: str) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        if node.op_type == "Mul" and _is_hard_swish_mul(lw, node):
            return _hard_swish(lw, node)
        a, b = _broadcast_operands(lw, node, quantize_consts=True)
        lw.emit(node, getattr(lw.tf.math, fn_name)(a, b))

    return lower


def _div(lw: Lowering, node: onnx.NodeProto) -> None:
    c = lw.const(node.input[1])
    if c is None:  # tensor / tensor has no int8 kernel
        if not lw.allow_float_fallback:
            raise lw.error(node, "division by a tensor has no int8 TFLite kernel; set allow_float_fallback = true "
                                 f"in [targets.{lw.target_name}.options] to run it in float")
        lw.result.float_ops.append({"node": node.name, "op_type": node.op_type})
        return _float_op(lambda tf, a, b: tf.math.divide(a, b))(lw, node)
    x = lw.values[node.input[0]]
    inv = 1.0 / c.astype(np.float32)
    if lw.rank(x) == 4:
        inv = inv.reshape([1] * (4 - inv.ndim) + list(inv.shape)).transpose(NCHW_TO_NHWC)
    lw.emit(node, lw.tf.math.multiply(x, lw.constant_operand(node, inv)))


def _relu(lw: Lowering, node: onnx.NodeProto) -> None:
    lw.emit(node, lw.tf.nn.relu(lw.values[node.input[0]]))


def _clip(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    x = lw.values[node.input[0]]
    lo, hi = _clip_bounds(lw, node)
    if lo is None or hi is None:
        raise lw.error(node, "Clip bounds must be constants")
    kind = fused_activation(lw, node)
    if kind == "relu6":
        y = tf.nn.relu6(x)
    elif kind == "relu":
        y = tf.nn.relu(x)
    else:
        y = tf.clip_by_value(x, lo, hi)
    lw.emit(node, y)


def _unary(fn: Callable[[Any, Any], Any]) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        lw.emit(node, fn(lw.tf, lw.values[node.input[0]]))

    return lower


def _is_hard_swish_mul(lw: Lowering, node: onnx.NodeProto) -> bool:
    """Mul(x, HardSigmoid(x)) with alpha 1/6, beta 0.5: the dynamo export of HardSwish."""
    for i in (0, 1):
        hs = lw.g.producer.get(node.input[i])
        if hs is not None and hs.op_type == "HardSigmoid" and hs.input[0] == node.input[1 - i]:
            a = attrs(hs)
            return np.isclose(a.get("alpha", 0.2), 1 / 6) and np.isclose(a.get("beta", 0.5), 0.5)
    return False


def _hard_sigmoid(lw: Lowering, node: onnx.NodeProto) -> None:
    consumers = lw.g.consumers.get(node.output[0], [])
    if len(consumers) == 1 and consumers[0].op_type == "Mul" and _is_hard_swish_mul(lw, consumers[0]) \
            and node.output[0] not in output_names(lw.model):
        return  # lowered with its Mul as one HARD_SWISH
    tf = lw.tf
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    x = lw.values[node.input[0]]
    amax = lw.amax_of(node.input[0])
    # relu6(6*alpha*x + 6*beta) / 6: MUL, ADD with fused RELU6, MUL, each with a derived scale
    t = lw.derived(tf.math.multiply(x, lw.constant_operand(node, np.float32(6 * alpha))), node, "scaled",
                   abs(6 * alpha) * amax)
    t = lw.derived(tf.nn.relu6(tf.math.add(t, lw.constant_operand(node, np.float32(6 * beta)))), node,
                   "relu6", 6.0)
    lw.emit(node, tf.math.multiply(t, lw.constant_operand(node, np.float32(1 / 6))))


def _hard_swish(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    if node.op_type == "HardSwish":
        x = lw.values[node.input[0]]
    else:
        hs_index = 0 if lw.g.producer.get(node.input[0]) is not None and \
            lw.g.producer[node.input[0]].op_type == "HardSigmoid" and \
            lw.g.producer[node.input[0]].input[0] == node.input[1] else 1
        x = lw.values[node.input[1 - hs_index]]
    # the converter matches x * relu6(x + 3) * (1/6) into one HARD_SWISH op
    lw.emit(node, x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0))


def _pool(kind: str) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        tf = lw.tf
        x = lw.values[node.input[0]]
        a, kernel, strides, dilations, pads, auto_pad = _spatial(node, x)
        if a.get("ceil_mode", 0):
            raise lw.error(node, "ceil_mode=1 is not supported")
        if any(d != 1 for d in dilations):
            raise lw.error(node, "dilated pooling is not supported")
        padding = _padding([int(x.shape[1]), int(x.shape[2])], kernel, strides, dilations, pads, auto_pad)
        if isinstance(padding, list):
            if kind == "avg" and not a.get("count_include_pad", 0):
                raise lw.error(node, f"asymmetric pads {pads} with count_include_pad=0 are not supported")
            # max pool: pad with the lowest representable value, which never wins the max
            spec = lw.quantized.get(node.input[0])
            low = (-128 - spec.zero_point) * spec.scale if (kind == "max" and spec) else (-3e38 if kind == "max" else 0.0)
            x = _explicit_pad(lw, node, x, padding, low)
            padding = "VALID"
        fn = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
        lw.emit_same_scale(node, fn(x, kernel, strides, padding))

    return lower


def _global_pool(kind: str) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        fn = lw.tf.math.reduce_mean if kind == "avg" else lw.tf.math.reduce_max
        lw.emit_same_scale(node, fn(lw.values[node.input[0]], axis=[1, 2], keepdims=True))

    return lower


def _reduce(kind: str) -> Callable[[Lowering, onnx.NodeProto], None]:
    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        tf = lw.tf
        x = lw.values[node.input[0]]
        a = attrs(node)
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = lw.require_const(node, 1).reshape(-1).tolist()
        keepdims = bool(a.get("keepdims", 1))
        r = lw.rank(x)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                lw.values[node.output[0]] = x
                return
            axes = list(range(r))
        axes = [ax + r if ax < 0 else ax for ax in axes]
        fn = tf.math.reduce_mean if kind == "mean" else tf.math.reduce_max
        channel_kept_with_space = r == 4 and 1 not in axes and not {2, 3} <= set(axes)
        if r == 4 and not keepdims and channel_kept_with_space:
            y = fn(lw.onnx_order(x), axis=axes, keepdims=False)  # result is not NHWC-shaped: ONNX order
        else:
            y = fn(x, axis=[lw.axis(x, ax) for ax in axes], keepdims=keepdims)
        lw.emit_same_scale(node, y) if kind == "max" else lw.emit(node, y)

    return lower


def _reshape_to(lw: Lowering, node: onnx.NodeProto, shape: list[int], batch_dynamic: bool) -> None:
    """Reshape in ONNX element order (4-D tensors go through NCHW unless H = W = 1)."""
    tf = lw.tf
    x = lw.values[node.input[0]]
    in_shape = lw.onnx_shape(x)
    if lw.is_nhwc(x) and in_shape[2] * in_shape[3] != 1:
        x = lw.onnx_order(x)
    elif lw.is_nhwc(x):
        x = tf.reshape(x, in_shape)  # H = W = 1: NHWC and NCHW hold the same element order
    target = list(shape)
    if batch_dynamic and target and target[0] == in_shape[0]:
        target[0] = -1
    y = tf.reshape(x, target)
    if len(shape) == 4 and lw.nhwc:
        if shape[2] * shape[3] == 1:
            y = tf.reshape(y, [target[0], 1, 1, shape[1]])
        else:
            y = tf.transpose(y, NCHW_TO_NHWC)
    lw.emit_same_scale(node, y)


def _reshape(lw: Lowering, node: onnx.NodeProto) -> None:
    spec = [int(v) for v in lw.require_const(node, 1).reshape(-1)]
    in_shape = lw.onnx_shape(lw.values[node.input[0]])
    allowzero = attrs(node).get("allowzero", 0)
    shape = [in_shape[i] if (v == 0 and not allowzero) else v for i, v in enumerate(spec)]
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1]))
        shape[shape.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    _reshape_to(lw, node, shape, batch_dynamic=bool(spec) and spec[0] in (0, -1))


def _flatten(lw: Lowering, node: onnx.NodeProto) -> None:
    in_shape = lw.onnx_shape(lw.values[node.input[0]])
    axis = attrs(node).get("axis", 1)
    axis = axis + len(in_shape) if axis < 0 else axis
    shape = [int(np.prod(in_shape[:axis])), int(np.prod(in_shape[axis:]))]
    _reshape_to(lw, node, shape, batch_dynamic=axis == 1)


def _squeeze_like(lw: Lowering, node: onnx.NodeProto) -> None:
    in_shape = lw.onnx_shape(lw.values[node.input[0]])
    a = attrs(node)
    axes = a.get("axes")
    if len(node.input) > 1 and node.input[1]:
        axes = lw.require_const(node, 1).reshape(-1).tolist()
    if node.op_type == "Squeeze":
        r = len(in_shape)
        axes = [ax + r if ax < 0 else ax for ax in (axes if axes else [i for i, d in enumerate(in_shape) if d == 1])]
        shape = [d for i, d in enumerate(in_shape) if i not in axes]
    else:
        if axes is None:
            raise lw.error(node, "Unsqueeze without axes")
        r = len(in_shape) + len(axes)
        axes = sorted(ax + r if ax < 0 else ax for ax in axes)
        shape = list(in_shape)
        for ax in axes:
            shape.insert(ax, 1)
    _reshape_to(lw, node, shape, batch_dynamic=0 not in axes)


def _transpose(lw: Lowering, node: onnx.NodeProto) -> None:
    x = lw.values[node.input[0]]
    r = lw.rank(x)
    perm = list(attrs(node).get("perm", list(range(r))[::-1]))
    pre = list(NHWC_TO_NCHW) if lw.is_nhwc(x) else list(range(r))
    post = list(NCHW_TO_NHWC) if lw.is_nhwc(x) else list(range(r))
    # stored -> ONNX order -> perm -> stored, as one transpose
    lw.emit_same_scale(node, lw.tf.transpose(x, [pre[perm[p]] for p in post]))


def _concat(lw: Lowering, node: onnx.NodeProto) -> None:
    xs = [lw.values[n] for n in node.input if n]
    axis = attrs(node).get("axis", 0)
    lw.emit_same_scale(node, lw.tf.concat(xs, axis=lw.axis(xs[0], axis)))


def _softmax(lw: Lowering, node: onnx.NodeProto) -> None:
    x = lw.values[node.input[0]]
    axis = attrs(node).get("axis", -1)
    lw.emit(node, lw.tf.nn.softmax(x, axis=lw.axis(x, axis)))


def _pad(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    x = lw.values[node.input[0]]
    a = attrs(node)
    pads = lw.require_const(node, 1).reshape(-1).tolist() if len(node.input) > 1 and node.input[1] else a.get("pads")
    if pads is None:
        raise lw.error(node, "Pad without pads")
    value = float(lw.require_const(node, 2)) if len(node.input) > 2 and node.input[2] else float(a.get("value", 0.0))
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    r = lw.rank(x)
    if len(node.input) > 3 and node.input[3]:
        raise lw.error(node, "Pad with an axes input is not supported")
    pairs = [[int(pads[i]), int(pads[i + r])] for i in range(r)]
    if r == 4:
        pairs = [pairs[i] for i in NCHW_TO_NHWC]  # stored axis i is ONNX axis NCHW_TO_NHWC[i]
    if mode == "constant":
        y = tf.pad(x, pairs, constant_values=value)
    elif mode == "reflect":
        y = tf.pad(x, pairs, mode="REFLECT")
    else:
        raise lw.error(node, f"pad mode '{mode}' is not supported (constant, reflect)")
    lw.emit_same_scale(node, y)


def _resize(lw: Lowering, node: onnx.NodeProto) -> None:
    tf = lw.tf
    x = lw.values[node.input[0]]
    if lw.rank(x) != 4:
        raise lw.error(node, "only 4-D (NCHW) Resize is supported")
    a = attrs(node)
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    in_shape = lw.onnx_shape(x)
    sizes = lw.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if sizes is not None and sizes.size:
        out_hw = [int(sizes[-2]), int(sizes[-1])]
    else:
        scales = lw.const(node.input[2]) if len(node.input) > 2 else None
        if scales is None or scales.size != 4:
            raise lw.error(node, "Resize needs constant scales or sizes")
        out_hw = [int(np.floor(in_shape[2] * scales[2])), int(np.floor(in_shape[3] * scales[3]))]
    align = ctm == "align_corners"
    half = ctm in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn")
    if ctm not in ("align_corners", "asymmetric", "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn"):
        raise lw.error(node, f"coordinate_transformation_mode '{ctm}' is not supported")
    if mode == "nearest":
        nearest_mode = a.get("nearest_mode", b"round_prefer_floor")
        nearest_mode = nearest_mode.decode() if isinstance(nearest_mode, bytes) else nearest_mode
        if ctm == "asymmetric" and nearest_mode != "floor":
            raise lw.error(node, f"nearest Resize with asymmetric coordinates needs nearest_mode 'floor' (got '{nearest_mode}')")
        y = tf.raw_ops.ResizeNearestNeighbor(images=x, size=out_hw, align_corners=align, half_pixel_centers=half)
        lw.emit_same_scale(node, y)
    elif mode == "linear":
        y = tf.raw_ops.ResizeBilinear(images=x, size=out_hw, align_corners=align, half_pixel_centers=half)
        lw.emit(node, y)
    else:
        raise lw.error(node, f"Resize mode '{mode}' is not supported (nearest, linear)")


def _identity(lw: Lowering, node: onnx.NodeProto) -> None:
    lw.values[node.output[0]] = lw.values[node.input[0]]
    if node.input[0] in lw.quantized:
        lw.quantized[node.output[0]] = lw.quantized[node.input[0]]


def _float_op(fn: Callable[..., Any]) -> Callable[[Lowering, onnx.NodeProto], None]:
    """An op with no int8 TFLite kernel: runs in float, its output left unquantized."""

    def lower(lw: Lowering, node: onnx.NodeProto) -> None:
        args = [lw.values[n] if n in lw.values else lw.tf.constant(lw.const(n)) for n in node.input if n]
        lw.values[node.output[0]] = fn(lw.tf, *args)

    return lower


#: ONNX op type -> int8 lowering. Every output gets the canonical (or table, or TFLite-fixed) scale.
OPS: dict[str, Callable[[Lowering, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "Gemm": _dense,
    "MatMul": _dense,
    "Add": _binary("add"),
    "Sub": _binary("subtract"),
    "Mul": _binary("multiply"),
    "Div": _div,
    "Relu": _relu,
    "Clip": _clip,
    "Sigmoid": _unary(lambda tf, x: tf.math.sigmoid(x)),
    "Tanh": _unary(lambda tf, x: tf.math.tanh(x)),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "LeakyRelu": lambda lw, node: lw.emit(node, lw.tf.nn.leaky_relu(lw.values[node.input[0]],
                                                                    attrs(node).get("alpha", 0.01))),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"),
    "GlobalMaxPool": _global_pool("max"),
    "ReduceMean": _reduce("mean"),
    "ReduceMax": _reduce("max"),
    "Concat": _concat,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Softmax": _softmax,
    "Pad": _pad,
    "Resize": _resize,
    "Identity": _identity,
    "Dropout": _identity,
}

#: Ops TFLite runs only in float: lowered only with allow_float_fallback, listed in the report.
FLOAT_OPS: dict[str, Callable[[Lowering, onnx.NodeProto], None]] = {
    "Sqrt": _float_op(lambda tf, x: tf.math.sqrt(x)),
    "Exp": _float_op(lambda tf, x: tf.math.exp(x)),
    "Log": _float_op(lambda tf, x: tf.math.log(x)),
    "Reciprocal": _float_op(lambda tf, x: tf.math.reciprocal(x)),
    "Pow": _float_op(lambda tf, x, y: tf.math.pow(x, y)),
}
