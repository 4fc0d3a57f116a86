"""Accuracy-recovering PTQ recipes on the canonical model (``--recipe``, ``[calibration] recipe``).

A recipe is a comma-separated list of steps, recorded in the model's metadata
(``deploykit.recipe``) and the manifest:

- ``cle``: cross-layer equalization. For a Conv feeding (through nothing, Relu or a
  LeakyRelu) the next Conv, channel ``c`` of the first is divided by ``s_c`` and the matching
  input channel of the second multiplied by it, ``s_c = sqrt(r1_c / r2_c)`` of the two weight
  ranges, so both see the same range and the activation between them loses its outlier
  channels. Function-preserving only through positively homogeneous activations: ReLU6 /
  Clip(0, 6) and hard-swish pairs are *not* scale-invariant and are skipped.
- ``smoothquant[:ALPHA]`` (default alpha 0.5): for each MatMul with a constant weight, the
  activation's per-input-channel range is moved into the weight, ``s_k = max|X_k|^a /
  max|W_k|^(1-a)``: ``X / s`` (a float Mul before the Q/DQ, or folded into a LayerNorm whose
  only readers are those MatMuls) and ``s * W``. For transformers, whose LayerNorm outputs
  have a few outlier channels that ruin a per-tensor int8 scale.
- ``bias_correction``: empirical bias correction in one streaming pass over the calibration
  data: the mean per-channel difference between each quantized layer's output in the
  canonical model and in the FP32 model is subtracted from that layer's (float) bias.
- ``adaround[:ITERATIONS]`` (default 300): learned weight rounding (Nagel et al. 2020), layer by
  layer on the calibration data with torch on the CPU: each FP32 weight rounds down or up on
  the canonical grid as a soft rounding variable minimising the layer's output error
  (quantized input with the upstream layers' rounding learned, FP32 output target) decides;
  kept for a layer only where it lowers that layer's error.
- ``gptq[:DAMPING]`` (default 0.01): GPTQ (Frantar et al. 2023) on every int8 MatMul / Gemm,
  in NumPy: the weight's input rows are rounded one at a time on the canonical grid and each
  row's rounding error is pushed onto the rows not yet rounded through the inverse Hessian
  ``(X^T X + damping * mean(diag) * I)^-1`` of the layer's quantized input ``X``; so the
  rounding errors cancel in the layer's output instead of adding up. Same waves, samples and
  keep-only-improvements rule as ``adaround``; seconds per layer, no torch. The two choose
  the same int8 weights: a recipe takes one of them.

``cle`` and ``smoothquant`` rewrite the FP32 model before calibration (``pre_calibration``;
the model's function is unchanged). ``bias_correction``, ``adaround`` and ``gptq`` compute ``Edits`` on
a placed canonical model (``post_placement``); ``apply_edits`` applies them again to any model
placed from the same statistics (another set of float layers), skipping float layers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.data import DataSource
from deploykit.errors import ConfigError
from deploykit.ortsession import exposing

log = logging.getLogger("deploykit")

META_RECIPE = "deploykit.recipe"
STEPS = ("cle", "smoothquant", "bias_correction", "adaround", "gptq")
PRE_STEPS = ("cle", "smoothquant")
DEFAULT_ALPHA = 0.5
DEFAULT_ADAROUND_ITERATIONS = 300
DEFAULT_GPTQ_DAMPING = 0.01
LAMBDA = 10.0  # relative to the layer's nearest-rounding error: weaker left the soft rounding undecided (measured 0.01, 1, 10)
#: Recipes measured best on real pretrained networks (docs/recipes.md): bias correction on a
#: depthwise CNN, SmoothQuant at 0.9 on a sentence encoder (all-MiniLM-L6-v2, alpha 0.65 / 0.8 /
#: 0.9 / 0.95 / 1.0: embedding cosine with FP32 0.9907 / 0.9966 / 0.9971 / 0.9968 / 0.9956; the
#: smaller activation steps also make the canonical model less sensitive to a runtime's float
#: order: TFLite's cosine with it 0.9962 / 0.9985 / 0.9990 / 0.9991 / 0.9992), then GPTQ on the
#: weights SmoothQuant made harder (MiniLM: 0.9971 -> 0.9978; docs/performance.md).
DEFAULT_CNN = "bias_correction"
DEFAULT_TRANSFORMER = "smoothquant:0.9,gptq"
_COMPUTE = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Step:
    name: str
    value: float | None = None  # smoothquant alpha, adaround iterations, gptq damping

    def __str__(self) -> str:
        if self.value is None:
            return self.name
        return f"{self.name}:{int(self.value) if self.name == 'adaround' else self.value:g}"


def parse_recipe(spec: str | None) -> tuple[Step, ...]:
    """``"bias_correction"``, ``"smoothquant:0.9"``, ``"cle,bias_correction"``, ``"none"`` / ``""``.

    Raises ConfigError naming the bad entry. ``"auto"`` is resolved by ``resolve_auto``."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    steps: list[Step] = []
    for raw in spec.split(","):
        item = raw.strip()
        name, _, arg = item.partition(":")
        name = name.strip().lower().replace("-", "_")
        if name not in STEPS:
            raise ConfigError(f"unknown recipe step '{item}' in '{spec}'; use {', '.join(STEPS)} "
                              "(comma-separated; smoothquant:ALPHA, adaround:ITERATIONS, gptq:DAMPING), auto or none")
        value: float | None = None
        if arg:
            try:
                value = float(arg)
            except ValueError:
                raise ConfigError(f"recipe step '{item}': '{arg}' is not a number") from None
            if name == "smoothquant" and not 0.0 <= value <= 1.0:
                raise ConfigError(f"recipe step '{item}': alpha must be within [0, 1]")
            if name == "adaround" and (value < 1 or value != int(value)):
                raise ConfigError(f"recipe step '{item}': iterations must be a positive integer")
            if name == "gptq" and not 0.0 < value <= 1.0:
                raise ConfigError(f"recipe step '{item}': damping must be within (0, 1]")
            if name not in ("smoothquant", "adaround", "gptq"):
                raise ConfigError(f"recipe step '{item}': {name} takes no argument")
        if any(s.name == name for s in steps):
            raise ConfigError(f"recipe '{spec}' names {name} twice")
        steps.append(Step(name, value))
    if {"adaround", "gptq"} <= {s.name for s in steps}:
        raise ConfigError(f"recipe '{spec}' names adaround and gptq: both choose the int8 weights, use one")
    # pre-calibration rewrites run first, in the order given; then the post-placement edits
    return tuple(sorted(steps, key=lambda s: (s.name not in PRE_STEPS, steps.index(s))))


def format_recipe(steps: Sequence[Step]) -> str:
    return ",".join(str(s) for s in steps) or "none"


def is_transformer(model: onnx.ModelProto) -> bool:
    """MatMuls with constant weights next to LayerNormalization: an encoder."""
    inits = {i.name for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    weighted = sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)
    return weighted >= 2 and "LayerNormalization" in ops


def resolve_auto(spec: str | None, model: onnx.ModelProto) -> str:
    """``auto`` (the default): the recipe measured best for this kind of network."""
    if spec is not None and spec.strip().lower() == "auto":
        return DEFAULT_TRANSFORMER if is_transformer(model) else DEFAULT_CNN
    return spec or "none"


# --------------------------------------------------------------------------- helpers


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set_const(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def add_const(self, name: str, value: np.ndarray) -> str:
        init = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.model.graph.initializer.append(init)
        self.inits[name] = self.model.graph.initializer[-1]
        return name

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _batches(data: DataSource, batch_size: int, inputs: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    for batch in data.batches(batch_size):
        yield {k: v for k, v in batch.feeds.items() if k in inputs}


def _model_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _progress(total: int | None, desc: str) -> Any:
    from deploykit.progress import bar

    return bar(total, desc, "sample")


# --------------------------------------------------------------------------- CLE

_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})


def cross_layer_equalize(model: onnx.ModelProto, iterations: int = 3) -> tuple[onnx.ModelProto, int]:
    """Equalize consecutive Conv pairs (function-preserving); returns the copy and the pair count."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    pairs = []
    for n1 in out.graph.node:
        if n1.op_type != "Conv" or len(n1.input) < 2 or n1.input[1] not in g.inits:
            continue
        mid = g.only_reader(n1.output[0])
        act = None
        if mid is not None and mid.op_type in _HOMOGENEOUS:
            act, mid = mid, g.only_reader(mid.output[0])
        if mid is None or mid.op_type != "Conv" or mid.input[0] != (act.output[0] if act else n1.output[0]):
            continue
        if len(mid.input) < 2 or mid.input[1] not in g.inits:
            continue
        pairs.append((n1, mid))
    for _ in range(iterations):
        for n1, n2 in pairs:
            w1, w2 = g.const(n1.input[1]), g.const(n2.input[1])
            assert w1 is not None and w2 is not None
            g2 = int(_attr(n2, "group", 1))
            cout = w1.shape[0]
            if g2 == 1:
                r2 = np.abs(w2).max(axis=(0, 2, 3)) if w2.ndim == 4 else np.abs(w2).max(axis=0)
            elif g2 == cout and w2.shape[1] == 1:  # depthwise second conv: input channel c is output c
                r2 = np.abs(w2).reshape(cout, -1).max(axis=1)
            else:
                continue
            r1 = np.abs(w1).reshape(cout, -1).max(axis=1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(cout, np.float32)
            s[ok] = np.sqrt(r1[ok] / r2[ok]).astype(np.float32)
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            g.set_const(n1.input[1], (w1 / s.reshape(shape1)).astype(np.float32))
            if len(n1.input) > 2 and n1.input[2] in g.inits:
                b1 = g.const(n1.input[2])
                assert b1 is not None
                g.set_const(n1.input[2], (b1 / s).astype(np.float32))
            if g2 == 1:
                g.set_const(n2.input[1], (w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))).astype(np.float32))
            else:
                g.set_const(n2.input[1], (w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))).astype(np.float32))
    return out, len(pairs)


# --------------------------------------------------------------------------- SmoothQuant


def _weighted_matmuls(g: _Graph) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls reading it with a constant 2-D weight."""
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.model.graph.node:
        if (n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in g.inits and n.input[0] not in g.inits
                and len(g.inits[n.input[1]].dims) == 2):
            groups[n.input[0]].append(n)
    return groups


def channel_absmax(model: onnx.ModelProto, tensors: Sequence[str], data: DataSource,
                   batch_size: int = 8) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the data (one streaming pass)."""
    sess = exposing(model, tensors)
    inputs = _model_inputs(model)
    out: dict[str, np.ndarray] = {}
    with _progress(data.limit, "smoothquant: channel ranges") as bar:
        for feeds in _batches(data, batch_size, inputs):
            for name, value in zip(tensors, sess.run(list(tensors), feeds)):
                m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                out[name] = m if name not in out else np.maximum(out[name], m)
            bar.update(len(next(iter(feeds.values()))))
    return out


def smoothing_factors(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s_k = max|X_k|^a / max|W_k|^(1-a)`` (1 where
    a channel is all zero): the activation is divided by ``s``, the weight's input rows
    multiplied by it. Also used by deploykit.qat on the torch graph."""
    x = np.asarray(xmax, np.float64)
    w = np.asarray(wmax, np.float64)
    s = np.power(np.maximum(x, 1e-5), alpha) / np.power(np.maximum(w, 1e-5), 1.0 - alpha)
    s = np.where((x > 0) & (w > 0), s, 1.0).astype(np.float32)
    return np.clip(s, 1e-5, 1e5)


def smooth_quant(model: onnx.ModelProto, data: DataSource, alpha: float = DEFAULT_ALPHA,
                 batch_size: int = 8) -> tuple[onnx.ModelProto, int]:
    """SmoothQuant on every MatMul with a constant weight; returns the copy and the number of
    activation tensors smoothed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    groups = _weighted_matmuls(g)
    if not groups:
        return out, 0
    xmax = channel_absmax(out, list(groups), data, batch_size)
    new_nodes: dict[str, onnx.NodeProto] = {}  # producer output -> Mul inserted after it
    for tensor, mms in groups.items():
        weights = [g.const(m.input[1]) for m in mms]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights if w is not None], axis=0)
        s = smoothing_factors(xmax[tensor], wmax, alpha)
        for m, w in zip(mms, weights):
            assert w is not None
            name = g.add_const(f"{m.name}_smoothed_weight", (w * s[:, None]).astype(np.float32))
            m.input[1] = name
        producer = g.producer.get(tensor)
        readers = g.consumers.get(tensor, [])
        if (producer is not None and producer.op_type == "LayerNormalization" and len(readers) == len(mms)
                and tensor not in g.outputs and all(i in g.inits for i in producer.input[1:3])
                and len(g.consumers.get(producer.input[1], [])) == 1):
            gamma, beta = g.const(producer.input[1]), g.const(producer.input[2])
            assert gamma is not None and beta is not None
            g.set_const(producer.input[1], (gamma / s).astype(np.float32))
            g.set_const(producer.input[2], (beta / s).astype(np.float32))
            continue
        inv = g.add_const(f"{_safe(tensor)}_smooth_inv", (1.0 / s).astype(np.float32))
        smoothed = f"{_safe(tensor)}_smoothed"
        mul = helper.make_node("Mul", [tensor, inv], [smoothed], name=f"{_safe(tensor)}_SmoothQuant")
        for m in mms:
            m.input[0] = smoothed
        new_nodes[tensor] = mul
        known = {v.name: v for v in list(out.graph.input) + list(out.graph.value_info) + list(out.graph.output)}
        vi = onnx.ValueInfoProto()
        if tensor in known:
            vi.CopyFrom(known[tensor])
        else:
            vi.CopyFrom(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        vi.name = smoothed
        out.graph.value_info.append(vi)  # the calibration observes float tensors it knows the type of
    if new_nodes:
        nodes: list[onnx.NodeProto] = []
        graph_inputs = [t for t in new_nodes if t not in g.producer]
        nodes.extend(new_nodes[t] for t in graph_inputs)
        for n in out.graph.node:
            nodes.append(n)
            nodes.extend(new_nodes[o] for o in n.output if o in new_nodes)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    _drop_unused(out)
    return out, len(groups)


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.:/-" else "_" for c in name)


# --------------------------------------------------------------------------- post-placement edits


@dataclass
class Edits:
    """What ``bias_correction``, ``adaround`` and ``gptq`` changed, by compute node name."""

    bias_delta: dict[str, np.ndarray] = field(default_factory=dict)  # subtract from the float bias
    int8_weights: dict[str, np.ndarray] = field(default_factory=dict)  # replace the node's int8 weight
    summary: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.bias_delta or self.int8_weights)


def _bias_target(g: _Graph, node: onnx.NodeProto) -> tuple[str, int, str | None] | None:
    """(tensor whose mean error the bias can cancel, channel axis, bias initializer or None)."""
    if node.op_type == "Conv":
        return node.output[0], 1, node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None
        return node.output[0], -1, node.input[2] if len(node.input) > 2 and node.input[2] else None
    weight = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    constant = len(node.input) > 1 and (node.input[1] in g.inits or (
        weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in g.inits))
    if node.op_type == "MatMul" and constant:  # MatMul + Add(bias) as exported
        add = g.only_reader(node.output[0])
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if other in g.inits and len(g.inits[other].dims) == 1:
                return add.output[0], -1, other
        return None
    return None


def quantized_compute_nodes(qdq: onnx.ModelProto) -> list[str]:
    """Compute nodes whose weight input reads through a DequantizeLinear (int8 layers)."""
    g = _Graph(qdq)
    names = []
    for n in qdq.graph.node:
        if n.op_type in _COMPUTE and len(n.input) > 1:
            p = g.producer.get(n.input[1])
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in g.inits:
                names.append(n.name)
    return names


def bias_correction(fp32: onnx.ModelProto, qdq: onnx.ModelProto, data: DataSource,
                    batch_size: int = 8) -> dict[str, np.ndarray]:
    """Mean per-channel output error each int8 layer adds by itself, from one streaming pass.

    Run on the canonical model alone: for every int8 layer the per-channel means of its input
    before quantization (``x``) and after (``x_q``, what the layer reads). The layer's own
    error on the mean is ``W_q * mean(x_q) - W * mean(x)`` (weight and input rounding and
    clipping), pushed through the layer by its weights. Measuring each layer's *output*
    against the FP32 model instead counts every upstream error again at every layer below it,
    and correcting all layers from one pass then over-corrects (it wrecked EfficientNet-Lite0).
    Conv borders (padding) are ignored: the mean is taken as if every output saw every input.
    """
    g = _Graph(qdq)
    g32 = _Graph(fp32)
    layers: dict[str, tuple[onnx.NodeProto, str, str, np.ndarray, np.ndarray]] = {}
    for name in quantized_compute_nodes(qdq):
        node = next(n for n in qdq.graph.node if n.name == name)
        if _bias_target(g, node) is None:
            continue
        dq = g.producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        w8 = _int8_weight(g, node)
        ref = next((n for n in fp32.graph.node if n.name == name), None)
        w = g32.const(ref.input[1]) if ref is not None else None
        if w8 is None or w is None:
            continue
        wq = w8[1].astype(np.float32) * _bcast(w8[2], w8[3], w8[1].ndim)
        layers[name] = (node, q.input[0], node.input[0], w.astype(np.float32), wq)
    if not layers:
        return {}
    tensors = list(dict.fromkeys(t for _, raw, deq, _, _ in layers.values() for t in (raw, deq)))
    sess = exposing(qdq, tensors)
    inputs = _model_inputs(qdq)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    channel_axis = {t: 1 for t in tensors}
    for node, raw, deq, _, _ in layers.values():
        if node.op_type != "Conv":
            channel_axis[raw] = channel_axis[deq] = -1
    with _progress(data.limit, "bias correction") as bar:
        for feeds in _batches(data, batch_size, inputs):
            for t, v in zip(tensors, sess.run(tensors, feeds)):
                axis = channel_axis[t] % v.ndim
                flat = np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis]).astype(np.float64)
                sums[t] = flat.sum(0) + sums.get(t, 0.0)
                counts[t] += flat.shape[0]
            bar.update(len(next(iter(feeds.values()))))
    mean = {t: sums[t] / max(counts[t], 1) for t in tensors}
    out: dict[str, np.ndarray] = {}
    for name, (node, raw, deq, w, wq) in layers.items():
        out[name] = (_through(node, wq, mean[deq]) - _through(node, w, mean[raw])).astype(np.float32)
    return out


def _through(node: onnx.NodeProto, w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The layer's output mean per channel for an input of per-channel mean ``m`` (no bias)."""
    if node.op_type == "Conv":
        group = int(_attr(node, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        per_out = w.reshape(cout, cin_g, -1).sum(-1)  # [cout, cin/g]
        m_in = m.reshape(group, cin_g)[np.arange(cout) // (cout // group)]  # each output's input group
        return np.asarray((per_out * m_in).sum(1))
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return np.asarray(w @ m)
    return np.asarray(m @ w)


def _int8_weight(g: _Graph, node: onnx.NodeProto) -> tuple[str, np.ndarray, np.ndarray, int] | None:
    """(int8 initializer name, int8 values, scales, axis) of a quantized compute node's weight."""
    p = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in g.inits:
        return None
    q, s = g.const(p.input[0]), g.const(p.input[1])
    if q is None or s is None or q.dtype != np.int8:
        return None
    return p.input[0], q, s, int(_attr(p, "axis", 1))


def adaround(fp32: onnx.ModelProto, qdq: onnx.ModelProto, data: DataSource, iterations: int = DEFAULT_ADAROUND_ITERATIONS,
             samples: int = 64, batch_size: int = 8, float_layers: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Learned rounding of each int8 layer's weights (kept only where it lowers the error).

    Each layer rounds its FP32 weight (``fp32``'s node of the same name) up or down on the
    canonical model's grid, to reproduce the FP32 model's output from the input the int8 model
    gives it (Nagel et al. 2020's asymmetric reconstruction), in waves (:func:`_round_in_waves`).
    """
    try:
        import torch
    except ImportError:
        raise ConfigError("recipe adaround needs torch: pip install torch==2.13.0") from None
    torch.manual_seed(0)

    def round_layer(node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, w: np.ndarray, scale: np.ndarray, axis: int,
                    bias: np.ndarray | None) -> np.ndarray | None:
        return _adaround_layer(torch, node, torch.from_numpy(x), torch.from_numpy(y), w, scale, axis, bias, iterations)

    new, info = _round_in_waves(fp32, qdq, data, round_layer, "adaround", _COMPUTE, samples, batch_size, float_layers)
    return new, {**info, "iterations": iterations}


def gptq(fp32: onnx.ModelProto, qdq: onnx.ModelProto, data: DataSource, damping: float = DEFAULT_GPTQ_DAMPING,
         samples: int = 64, batch_size: int = 8, float_layers: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """GPTQ rounding of each int8 MatMul / Gemm weight (kept only where it lowers the error), in
    waves (:func:`_round_in_waves`)."""

    def round_layer(node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, w: np.ndarray, scale: np.ndarray, axis: int,
                    bias: np.ndarray | None) -> np.ndarray | None:
        return _gptq_layer(node, x, y, w, scale, axis, bias, damping)

    new, info = _round_in_waves(fp32, qdq, data, round_layer, "gptq", ("Gemm", "MatMul"), samples, batch_size, float_layers)
    return new, {**info, "damping": damping}


def _round_in_waves(fp32: onnx.ModelProto, qdq: onnx.ModelProto, data: DataSource, round_layer: Any, desc: str,
                    ops: Sequence[str], samples: int, batch_size: int,
                    float_layers: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """New int8 weights, by node, for the int8 ``ops`` layers ``round_layer`` improves.

    ``round_layer(node, x, y, w, scale, axis, bias)`` gets the layer's input as the int8 model
    computes it (after its DequantizeLinear), the FP32 model's output of the layer, its FP32
    weight (``fp32``'s node of the same name) and its int8 grid; it returns the int8 weight or
    None. Layers go in waves: a layer is rounded once every int8 layer upstream of it has its
    rounding, from inputs computed with those roundings; inputs taken from the nearest-rounded
    model would make every layer compensate upstream errors its predecessors already compensate.
    """
    g = _Graph(qdq)
    g32 = _Graph(fp32)
    ref_nodes = {n.name: n for n in fp32.graph.node}
    skip = set(float_layers)
    quantized = set(quantized_compute_nodes(qdq))
    inputs = _model_inputs(fp32)
    layers: dict[str, tuple[onnx.NodeProto, tuple[str, np.ndarray, np.ndarray, int], np.ndarray]] = {}
    for n in qdq.graph.node:
        if n.name in skip or n.op_type not in ops or n.name not in quantized:
            continue
        w8 = _int8_weight(g, n)
        ref = ref_nodes.get(n.name)
        w = g32.const(ref.input[1]) if ref is not None and len(ref.input) > 1 else None
        if w8 is None or w is None or w.shape != w8[1].shape:
            continue
        if g.producer.get(n.input[0]) is None and n.input[0] not in inputs:
            continue
        layers[n.name] = (n, w8, w.astype(np.float32))
    new: dict[str, np.ndarray] = {}
    seen = 0
    pending = list(layers)
    upstream = {name: _upstream_nodes(g, n.input[0]) for name, (n, _, _) in layers.items()}
    reference = exposing(fp32, list(dict.fromkeys(n.output[0] for n, _, _ in layers.values()))) if layers else None
    with _progress(len(layers), f"{desc}: layers") as bar:
        while pending:
            wave = [name for name in pending if not upstream[name] & (set(pending) - {name})]
            pending = [name for name in pending if name not in wave]
            current = apply_edits(qdq, Edits(int8_weights=new), skip) if new else qdq
            nodes = [layers[name][0] for name in wave]
            xs, ys, seen = _layer_io(current, reference, nodes, data, batch_size, samples, inputs)
            for node in nodes:
                _, (_, _, scale, axis), w = layers[node.name]
                rounded = round_layer(node, xs[node.input[0]], ys[node.output[0]], w, scale, axis, _bias(g, fp32, node))
                if rounded is not None:
                    new[node.name] = rounded
                bar.update(1)
    return new, {"layers": len(layers), "kept": len(new), "samples": seen}


def _upstream_nodes(g: _Graph, tensor: str) -> set[str]:
    """Names of every node ``tensor`` depends on."""
    out: set[str] = set()
    stack = [tensor]
    visited: set[str] = set()
    while stack:
        t = stack.pop()
        if t in visited:
            continue
        visited.add(t)
        p = g.producer.get(t)
        if p is not None and p.name not in out:
            out.add(p.name)
            stack.extend(p.input)
    return out


def _layer_io(qdq: onnx.ModelProto, reference: Any, nodes: Sequence[onnx.NodeProto], data: DataSource,
              batch_size: int, samples: int, inputs: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Each node's input as ``qdq`` computes it (after its DequantizeLinear) and its output as
    the FP32 model's session ``reference`` (exposing it) does, on the first ``samples`` samples."""
    in_names = list(dict.fromkeys(n.input[0] for n in nodes))
    out_names = list(dict.fromkeys(n.output[0] for n in nodes))
    s_q, s_f = exposing(qdq, in_names), reference
    xs: dict[str, list[np.ndarray]] = defaultdict(list)
    ys: dict[str, list[np.ndarray]] = defaultdict(list)
    seen = 0
    for feeds in _batches(data, batch_size, inputs):
        if seen >= samples:
            break
        for t, v in zip(in_names, s_q.run(in_names, feeds)):
            xs[t].append(v)
        for t, v in zip(out_names, s_f.run(out_names, feeds)):
            ys[t].append(v)
        seen += len(next(iter(feeds.values())))
    return ({t: np.concatenate(v)[:samples] for t, v in xs.items()}, {t: np.concatenate(v)[:samples] for t, v in ys.items()},
            min(seen, samples))


def _bcast(scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _bias(g: _Graph, fp32: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        return g.const(node.input[2])
    return None


def _layer_fn(torch: Any, node: onnx.NodeProto) -> Any:
    F = torch.nn.functional
    if node.op_type == "Conv":
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        strides = list(_attr(node, "strides", [1, 1]))
        dil = list(_attr(node, "dilations", [1, 1]))
        group = int(_attr(node, "group", 1))
        if len(pads) != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None

        def conv(x: Any, w: Any, b: Any) -> Any:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            return F.conv2d(x, w, b, stride=strides, dilation=dil, groups=group)
        return conv
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        trans_b = bool(_attr(node, "transB", 0))
        return lambda x, w, b: (x @ (w.T if trans_b else w)) + (0 if b is None else b)
    return lambda x, w, b: x @ w  # MatMul


def _adaround_layer(torch: Any, node: onnx.NodeProto, x: Any, y: Any, w: np.ndarray, scale: np.ndarray, axis: int,
                    bias: np.ndarray | None, iterations: int) -> np.ndarray | None:
    fn = _layer_fn(torch, node)
    if fn is None or (node.op_type == "Conv" and x.ndim != 4):
        return None
    s = torch.from_numpy(_bcast(scale, axis, w.ndim).astype(np.float32))
    wf = torch.from_numpy(w.astype(np.float32))
    b = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    base = torch.floor(wf / s)
    rest = wf / s - base  # in [0, 1): nearest rounding is rest >= 0.5
    zeta, gamma = 1.1, -0.1
    v = torch.log((rest.clamp(0.01, 0.99) - gamma) / (zeta - gamma) / (1 - (rest.clamp(0.01, 0.99) - gamma) / (zeta - gamma)))
    v = v.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=5e-2)

    def error(wq: Any) -> float:
        with torch.no_grad():
            return float(((fn(x, wq, b) - y) ** 2).mean())

    nearest = torch.clamp(torch.round(wf / s), -127, 127) * s
    err_nearest = error(nearest)
    lam = LAMBDA * max(err_nearest, 1e-12)  # the rounding regulariser, on the scale of this layer's error
    n = x.shape[0]
    mb = max(1, min(32, n))
    warm = int(0.2 * iterations)
    for it in range(iterations):
        idx = torch.randint(0, n, (mb,))
        h = (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0, 1)
        wq = torch.clamp(base + h, -127, 127) * s
        loss = ((fn(x[idx], wq, b) - y[idx]) ** 2).mean()
        if it >= warm:  # push every h to 0 or 1, beta annealed from 20 to 2 (Nagel et al. 2020)
            beta = 20 - (20 - 2) * (it - warm) / max(1, iterations - warm)
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (v >= 0).float()
        wq = torch.clamp(base + hard, -127, 127) * s
    err = error(wq)
    if not err < err_nearest:
        return None
    return np.asarray(torch.clamp(base + hard, -127, 127).numpy(), dtype=np.int8)


def gptq_levels(wk: np.ndarray, s: np.ndarray, h: np.ndarray, damping: float) -> np.ndarray | None:
    """GPTQ's rounding of one weight ``wk`` [K inputs, N outputs] on the grid of its per-output
    scales ``s`` [N], given the Gram matrix ``h`` = X^T X [K, K] of the layer's input: each
    input row is rounded in turn and its rounding error pushed onto the rows not yet rounded,
    weighted by the inverse Gram matrix, so the errors cancel in the layer's output. Returns
    the int8 levels [K, N] (float64), or None when the damped Gram matrix is not invertible.
    Shared by the build's ``gptq`` step and ``qat.prepare``'s."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0  # an input row never used: its weight cannot matter
    h[dead, dead] = 1.0
    h += damping * float(np.mean(np.diag(h))) * np.eye(len(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1: row k's error feedback
    except np.linalg.LinAlgError:
        return None
    work = np.array(wk, dtype=np.float64)
    q = np.zeros_like(work)
    for k in range(work.shape[0]):
        q[k] = np.clip(np.round(work[k] / s), -127, 127)
        err = (work[k] - q[k] * s) / u[k, k]
        work[k + 1:] -= np.outer(u[k, k + 1:], err)
    return q


def _gptq_layer(node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, w: np.ndarray, scale: np.ndarray, axis: int,
                bias: np.ndarray | None, damping: float) -> np.ndarray | None:
    """GPTQ on one MatMul / Gemm: the int8 weight, or None when it does not lower the layer's
    output error (against the FP32 output ``y``) below nearest rounding's."""
    trans_b = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    if w.ndim != 2 or (node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                                    or _attr(node, "beta", 1.0) != 1.0)):
        return None
    wk = (w.T if trans_b else w).astype(np.float64)  # [K, N]: input rows, output columns
    out_axis = (1 - axis) if trans_b else axis
    if np.ndim(scale) == 1 and out_axis != 1:
        return None  # a scale per input row: GPTQ's error feedback across rows would change the grid
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (wk.shape[1],)) if np.ndim(scale) else \
        np.full(wk.shape[1], float(scale))
    xk = x.reshape(-1, wk.shape[0]).astype(np.float64)
    q = gptq_levels(wk, s, xk.T @ xk, damping)
    if q is None:
        return None
    yk = y.reshape(-1, wk.shape[1]).astype(np.float64)
    b = 0.0 if bias is None else np.asarray(bias, np.float64)

    def error(levels: np.ndarray) -> float:
        return float(((xk @ (levels * s) + b - yk) ** 2).mean())

    if not error(q) < error(np.clip(np.round(wk / s), -127, 127)):
        return None
    return np.asarray(q.T if trans_b else q, dtype=np.int8)


def post_placement(fp32: onnx.ModelProto, qdq: onnx.ModelProto, steps: Sequence[Step], data: DataSource,
                   batch_size: int = 8, float_layers: Iterable[str] = (), adaround_samples: int = 64) -> Edits:
    """Run the post-placement steps on a placed canonical model; returns the edits (not applied)."""
    edits = Edits()
    floats = tuple(float_layers)
    current = qdq
    for step in steps:
        if step.name in ("adaround", "gptq"):
            if step.name == "adaround":
                iters = int(step.value or DEFAULT_ADAROUND_ITERATIONS)
                new, info = adaround(fp32, current, data, iterations=iters, samples=adaround_samples,
                                     batch_size=batch_size, float_layers=floats)
            else:
                damping = DEFAULT_GPTQ_DAMPING if step.value is None else float(step.value)
                new, info = gptq(fp32, current, data, damping=damping, samples=adaround_samples, batch_size=batch_size,
                                 float_layers=floats)
            edits.int8_weights.update(new)
            edits.summary[step.name] = info
            current = apply_edits(current, Edits(int8_weights=new), floats)
        elif step.name == "bias_correction":
            deltas = bias_correction(fp32, current, data, batch_size)
            edits.bias_delta.update({k: v for k, v in deltas.items() if k not in floats})
            edits.summary["bias_correction"] = {"layers": len(edits.bias_delta)}
            current = apply_edits(current, Edits(bias_delta=deltas), floats)
    # bias correction measured last sees adaround's weights: record the order actually run
    return edits


def apply_edits(qdq: onnx.ModelProto, edits: Edits, float_layers: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``qdq`` with the edits applied to its int8 layers (float layers untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    if not edits:
        return out
    g = _Graph(out)
    floats = set(float_layers)
    for node in list(out.graph.node):
        if node.name in floats:
            continue
        if node.name in edits.int8_weights:
            w = _int8_weight(g, node)
            if w is not None and w[1].shape == edits.int8_weights[node.name].shape:
                p = g.producer[node.input[1]]
                name = f"{node.name}_adarounded_quantized"
                if name not in g.inits:
                    g.add_const(name, edits.int8_weights[node.name])
                p.input[0] = name if len(g.consumers[node.input[1]]) == 1 else p.input[0]
        if node.name in edits.bias_delta:
            t = _bias_target(g, node)
            if t is None:
                continue
            bias_name = t[2]
            delta = edits.bias_delta[node.name]
            old = g.const(bias_name) if bias_name else np.zeros_like(delta)
            if old is None or old.shape != delta.shape:
                continue
            name = f"{node.name}_corrected_bias"
            if name in g.inits:
                g.set_const(name, (old - delta).astype(np.float32))
            else:
                g.add_const(name, (old - delta).astype(np.float32))
            if node.op_type in ("Conv", "Gemm"):
                if len(node.input) > 2:
                    node.input[2] = name
                else:
                    node.input.append(name)
            else:
                add = g.only_reader(node.output[0])
                assert add is not None
                add.input[1 if add.input[0] == node.output[0] else 0] = name
    _drop_unused(out)
    return out


def pre_calibration(fp32: onnx.ModelProto, steps: Sequence[Step], data: DataSource,
                    batch_size: int = 8) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run the FP32 rewrites (cle, smoothquant); the model's function is unchanged."""
    summary: dict[str, Any] = {}
    for step in steps:
        if step.name == "cle":
            fp32, pairs = cross_layer_equalize(fp32)
            summary["cle"] = {"pairs": pairs}
            if not pairs:
                log.warning("recipe cle: no Conv pair joined by nothing or a ReLU (ReLU6 / hard-swish pairs are "
                            "not scale-invariant); the model is unchanged")
        elif step.name == "smoothquant":
            alpha = DEFAULT_ALPHA if step.value is None else float(step.value)
            fp32, count = smooth_quant(fp32, data, alpha, batch_size)
            summary["smoothquant"] = {"alpha": alpha, "tensors": count}
    return fp32, summary
