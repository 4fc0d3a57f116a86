"""Rebuild the canonical QDQ graph in TensorFlow (NHWC) with fake-quant ops carrying the canonical
scales, then convert it to a full-integer TFLite flatbuffer.

Why this works (docs/toolchain-facts.md): the TFLite converter turns each ``fake_quant_with_min_max_vars``
into the quantization parameters of the tensor it follows, without calibrating. So every
tensor the TFLite model keeps between int8 ops gets a fake-quant whose range gives exactly
the scale the canonical model (or its calibration table) says:

- activation: ``min = (-128 - zp) * s, max = (127 - zp) * s`` (8 bits, full range);
- weight: per-channel ``min = -127 * s, max = 127 * s`` with ``narrow_range=True``, on the last
  axis of the TF filter (the output channel, as in the canonical model).

Tensors are stored NHWC when they are 4-D and in ONNX order otherwise; ops that care about
axes convert them. ``OPS`` is the op table: ONNX op type -> lowering function.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from deploykit.backend import CanonicalModel, input_names, output_names, require
from deploykit.canonical import QdqGraph, attrs
from deploykit.errors import LoweringError

#: TFLite's int8 kernels fix these outputs' parameters (scale, zero point); the canonical
#: model leaves them float because zero point 0 cannot meet them.
FIXED_OUTPUT = {"Softmax": (1 / 256, -128), "Sigmoid": (1 / 256, -128), "Tanh": (1 / 128, 0)}
#: ONNX ops whose TFLite kernel needs the same int8 parameters on input and output
#: (Clip other than Relu/Relu6 is MINIMUM + MAXIMUM).
SAME_SCALE_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "AveragePool",
                            "Concat", "Pad", "Resize", "Identity", "GlobalMaxPool", "ReduceMax", "Clip"})
#: Activations TFLite fuses into the op before them (no tensor, so no scale, in between).
FUSABLE_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul"})
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
ONNX_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


@dataclass(frozen=True)
class QuantSpec:
    """Quantization parameters the lowering gives one tensor, and where they come from.

    source: "canonical" (a Q/DQ node of the canonical model), "calibration" (the calibration
    table), "fixed" (mandated by the TFLite spec), "derived" (same as the op's input, or a
    constant's own range: tensors the canonical model has no name for).
    """

    scale: float
    zero_point: int
    source: str
    tensor: str  # ONNX tensor name (or a description for derived tensors)


@dataclass(frozen=True)
class WeightSpec:
    tensor: str  # the canonical int8 initializer
    node: str  # the ONNX node that consumes it
    scales: np.ndarray  # per output channel, the canonical scales
    values: np.ndarray  # int8, in the TF filter layout (output channel last)
    bias: np.ndarray | None = None  # the float bias added after it (one per output channel)


@dataclass
class Lowered:
    """What the walk produced: the TF concrete function and what the verification needs."""

    concrete: Any
    module: Any = None
    activations: dict[str, QuantSpec] = field(default_factory=dict)  # fake-quant op name -> spec
    weights: dict[str, WeightSpec] = field(default_factory=dict)  # fake-quant op name -> spec
    float_ops: list[dict[str, str]] = field(default_factory=list)
    #: TF op of each forced requantize -> (parameters before, after): its tensor may carry either
    requantize_ops: dict[str, tuple[QuantSpec, QuantSpec]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    islands: bool = False  # encoder: float except the tensors the canonical model quantizes
    float_layers: list[str] = field(default_factory=list)  # declared float islands (canonical metadata)
    #: canonical tensor -> output of the QuantizeLinear that reads it (for the tensor_map)
    q_outputs: dict[str, str] = field(default_factory=dict)


#: imported by ``import tensorflow`` (an eager load of Keras' optimizers, about 2.5 s of CPU of
#: its 10 s here) and never used: the lowering builds tf.functions, no Keras models
UNUSED_BY_TFLITE = ("keras", "tf_keras")


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter is not for our users
    # lazy: importing the plugin must not import TensorFlow
    return require("tensorflow", "pip install 'deploykit[tflite]'", hide=UNUSED_BY_TFLITE)


def declared_float_layers(model: onnx.ModelProto) -> list[str]:
    """Node names the canonical model's metadata keeps float (``deploykit.float_layers``)."""
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        names = json.loads(meta.get("deploykit.float_layers", "[]"))
    except ValueError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def safe_name(name: str) -> str:
    """A TF op name for an ONNX tensor name (TF allows [A-Za-z0-9_.\\-/])."""
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name).strip("/") or "t"
    return name if re.match(r"[A-Za-z0-9.]", name) else "t" + name


# --------------------------------------------------------------------------------------
# input shapes
# --------------------------------------------------------------------------------------
def shapes_source(model: onnx.ModelProto, overrides: Mapping[str, Any], example: Mapping[str, Any] | None) -> str:
    """Where fixed_input_shapes takes the shapes from, for the report."""
    dynamic = [vi.name for vi in model.graph.input
               if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in vi.type.tensor_type.shape.dim[1:])]
    if all(n in overrides for n in dynamic) and overrides:
        return "targets.toml input_shapes"
    if dynamic and example and all(n in example for n in dynamic):
        return "the evaluation data (first batch, at batch 1)"
    return "the model (dynamic batch compiled as 1)"


def fixed_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, Any], target_name: str,
                       example: Mapping[str, Any] | None = None) -> dict[str, list[int]]:
    """ONNX (NCHW) input shapes with every dynamic dim fixed: overrides, else the evaluation
    data's shape (``example``, batch set to 1) for dynamic dims other than the batch, else batch 1."""
    inits = {i.name for i in model.graph.initializer}
    unknown = set(overrides) - set(input_names(model))
    if unknown:
        raise LoweringError(f"target '{target_name}': option input_shapes names unknown inputs {sorted(unknown)}; "
                            f"the model's inputs are {input_names(model)}")
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.name in overrides:
            shape = overrides[vi.name]
            if (not isinstance(shape, list) or len(shape) != len(dims)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise LoweringError(f"target '{target_name}': input_shapes.{vi.name} = {shape!r} must be a list of "
                                    f"{len(dims)} positive integers")
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value != shape[i]:
                    raise LoweringError(f"target '{target_name}': input_shapes.{vi.name} = {shape} but dim {i} of "
                                        f"input '{vi.name}' is fixed at {d.dim_value}")
            shapes[vi.name] = list(shape)
            continue
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif i == 0:
                shape.append(1)  # dynamic batch: compile batch 1, the runner resizes or loops
            elif example and vi.name in example and len(example[vi.name]) == len(dims):
                shape.append(int(example[vi.name][i]))  # e.g. the sequence length of the evaluation data
            else:
                hint = [str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "?" for x in dims]
                hint[0] = "1" if hint[0] == "?" else hint[0]
                raise LoweringError(
                    f"input '{vi.name}' has dynamic dimension {i} ('{d.dim_param or '?'}') that the TFLite converter "
                    f"cannot handle; give a fixed shape in targets.toml: [targets.{target_name}.options] "
                    f"input_shapes = {{ {vi.name} = [{', '.join(hint)}] }} (replace ? with the size)")
        shapes[vi.name] = shape
    return shapes


# --------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------
class Lowering:
    """State of one walk over the canonical graph, inside the traced tf.function."""

    def __init__(self, canonical: CanonicalModel, allow_float_fallback: bool, target_name: str,
                 fake_quant: bool = True) -> None:
        self.tf = _tf()
        self.model = canonical.model
        self.g = QdqGraph(canonical.model)
        self.table = canonical.calibration
        self.allow_float_fallback = allow_float_fallback
        self.with_fake_quant = fake_quant  # False: the same graph in float (the latency baseline)
        self.target_name = target_name
        self.values: dict[str, Any] = {}  # ONNX tensor -> TF tensor (4-D tensors NHWC)
        self.folded: dict[str, np.ndarray] = {}  # shape arithmetic evaluated at the fixed input shapes
        self.quantized: dict[str, QuantSpec] = {}  # ONNX tensor -> the fake-quant applied to it
        self.result = Lowered(None)
        self.result.q_outputs = {n.input[0]: n.output[0] for n in canonical.model.graph.node
                                 if n.op_type == "QuantizeLinear"}
        self.absorbed: set[str] = set()  # nodes lowered as part of another (a MatMul's bias Add)
        #: float islands mode (encoders): only the tensors the canonical model quantizes get a
        #: fake-quant; everything else (LayerNorm, GELU, Softmax, mask arithmetic) stays float
        #: or integer as in the canonical model, and tensors keep ONNX axis order.
        self.islands = float_ops.needs_islands(canonical.model)
        #: nodes the canonical model keeps float on purpose (its metadata): lowered float, their
        #: inputs dequantized and their outputs quantized again where the canonical model does
        self.float_layers = set(declared_float_layers(canonical.model))
        self.nhwc = not self.islands
        self.gelus: dict[str, tuple[str, bool]] = {}  # last node of an exported GELU -> (x, tanh form)
        if self.islands:
            self.gelus, absorbed = float_ops.find_gelus(self)
            self.absorbed |= absorbed
        self.unquantized_outputs: set[str] = self._fused_activation_inputs()
        self._names: set[str] = set()
        self._last_weight: str | None = None  # fake-quant name of the weight weight_filter made last

    # ---- helpers for op lowerings ---------------------------------------------------
    def error(self, node: onnx.NodeProto, message: str) -> LoweringError:
        return LoweringError(f"node '{node.name}' ({node.op_type}): {message}")

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.folded:
            return self.folded[name]
        if name in self.g.initializers:
            return self.g.const(name)
        weight = self.g.weight(name)
        if weight is not None:  # a dequantized weight read as a plain constant
            values, p = weight
            shape = [1] * values.ndim
            if p.axis is not None:
                shape[p.axis] = -1
            return values.astype(np.float32) * p.scale.reshape(shape)
        return None

    def require_const(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        value = self.const(node.input[index]) if index < len(node.input) else None
        if value is None:
            raise self.error(node, f"input {index} must be a constant for the TFLite lowering")
        return value

    def rank(self, t) -> int:
        return len(t.shape)

    def is_nhwc(self, t) -> bool:
        """Whether a tensor is stored NHWC: 4-D tensors of a CNN; an encoder keeps ONNX order."""
        return self.nhwc and self.rank(t) == 4

    def onnx_order(self, t):
        """The tensor in ONNX axis order (4-D tensors of a CNN are stored NHWC)."""
        return self.tf.transpose(t, NHWC_TO_NCHW) if self.is_nhwc(t) else t

    def stored(self, t):
        """ONNX-order tensor -> stored layout."""
        return self.tf.transpose(t, NCHW_TO_NHWC) if self.is_nhwc(t) else t

    def onnx_shape(self, t) -> list[int]:
        shape = [int(d) for d in t.shape]
        return [shape[i] for i in NHWC_TO_NCHW] if self.is_nhwc(t) else shape

    def axis(self, t, axis: int) -> int:
        r = self.rank(t)
        axis = axis + r if axis < 0 else axis
        return ONNX_TO_NHWC_AXIS[axis] if self.is_nhwc(t) else axis

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def fake_quant(self, t, spec: QuantSpec, tag: str, register_producer: bool = True):
        s, zp = spec.scale, spec.zero_point
        name = self.unique(f"dkq/{safe_name(tag)}")
        # TFLite names a tensor after the ops fused into its producer ("Relu_1;Conv2D_1"), so
        # both the fake-quant and the op it follows identify the tensor for the verification
        self.result.activations[name] = spec
        # not in islands mode: the converter names a QUANTIZE after its float producer plus a
        # digit ("add_3" -> "add_31"), which can be another producer's name
        if register_producer and not self.islands and not self.tf.executing_eagerly():
            self.result.activations.setdefault(t.op.name, spec)
        if not self.with_fake_quant:
            return t
        return self.tf.quantization.fake_quant_with_min_max_vars(
            t, min=float(np.float32((-128 - zp) * s)), max=float(np.float32((127 - zp) * s)),
            num_bits=8, narrow_range=False, name=name)

    def weight_filter(self, node: onnx.NodeProto, index: int, to_tf: Callable[[np.ndarray], np.ndarray],
                      channels: slice | None = None):
        """The fake-quantized TF filter of a compute node's weight input.

        ``to_tf`` moves the int8 ONNX weight into the TF filter layout with the output channel
        (the canonical per-channel axis) last, where the per-channel fake-quant puts it.
        """
        weight = self.g.weight(node.input[index])
        if weight is None and node.name in self.float_layers and node.input[index] in self.g.initializers:
            # a declared float island: float weights, no fake-quant, nothing to verify
            self._last_weight = None
            return self.tf.constant(to_tf(self.require_const(node, index).astype(np.float32)))
        if weight is None:
            raise self.error(node, f"weight input '{node.input[index]}' is not an int8 initializer behind a "
                                   "DequantizeLinear; run 'deploykit inspect --lint' on the canonical model")
        values, p = weight
        w = to_tf(values)
        scales = p.scale.reshape(-1).astype(np.float32)
        if scales.size == 1:
            scales = np.repeat(scales, w.shape[-1])
        if scales.size != w.shape[-1]:
            raise self.error(node, f"{scales.size} weight scales for {w.shape[-1]} output channels")
        if channels is not None:  # one group of a grouped conv: its own filter constant
            w, scales = w[..., channels], scales[channels]
        name = self.unique(f"dkw/{safe_name(node.input[index])}")
        self._last_weight = name
        dq = self.g.dq_feeding(node.input[index])
        assert dq is not None  # weight() found it
        self.result.weights[name] = WeightSpec(dq.input[0], node.name, scales, w)
        tf = self.tf
        if not self.with_fake_quant:
            return tf.constant(w.astype(np.float32) * scales)
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(w.astype(np.float32) * scales), min=-127 * scales, max=127 * scales,
            num_bits=8, narrow_range=True, name=name)

    def table_zero_point(self, tensor: str) -> int:
        """The calibration table's int8 zero point (asymmetric activations), 0 when symmetric."""
        zero_point = getattr(self.table, "zero_point", None)
        return int(zero_point(tensor)) if callable(zero_point) else 0

    def set_bias(self, bias: np.ndarray | None, channels: slice | None = None) -> None:
        """The float bias of the weight just made by weight_filter (the patch writes it as int32)."""
        last = self._last_weight
        if bias is None or last is None:
            return
        spec = self.result.weights[last]
        b = np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), spec.scales.shape) if channels is None \
            else np.asarray(bias, np.float32).reshape(-1)[channels]
        self.result.weights[last] = dataclasses.replace(spec, bias=np.array(b, np.float32))

    def spec_for(self, tensor: str, node: onnx.NodeProto | None = None) -> QuantSpec | None:
        """Parameters for an activation tensor: a canonical Q that reads it, else the table."""
        for consumer in self.g.consumers.get(tensor, []):
            if consumer.op_type == "QuantizeLinear":
                p = self.g.params(consumer)
                return QuantSpec(float(p.scale.reshape(-1)[0]), int(p.zero_point.reshape(-1)[0]), "canonical", tensor)
        if node is not None and node.op_type in FIXED_OUTPUT:
            s, zp = FIXED_OUTPUT[node.op_type]
            return QuantSpec(s, zp, "fixed", tensor)
        if tensor in self.table:
            return QuantSpec(self.table.scale(tensor), self.table_zero_point(tensor), "calibration", tensor)
        return None

    def emit(self, node: onnx.NodeProto, t, index: int = 0, spec: QuantSpec | None = None) -> None:
        """Bind a node's output and give it its quantization parameters."""
        name = node.output[index]
        if self.islands or node.name in self.float_layers:
            # float (or integer) as in the canonical model; its Q, if any, quantizes
            self.values[name] = t
            return
        if name not in self.unquantized_outputs:
            if node.op_type in FIXED_OUTPUT and spec is None:
                s, zp = FIXED_OUTPUT[node.op_type]
                spec = QuantSpec(s, zp, "fixed", name)
            spec = spec or self.spec_for(name, node)
            if spec is None:
                raise self.error(node, f"output '{name}' has no scale: it is not in the calibration table; "
                                       "rebuild the canonical model with this deploykit version")
            source = self.quantized.get(node.input[0]) if node.input else None
            if (node.op_type in SAME_SCALE_OPS and node.op_type != "Concat" and source is not None
                    and ops.fused_activation(self, node) is None and not same_params(source, spec)):
                # the kernel keeps its input's parameters: give them to its output, then requantize
                kept = dataclasses.replace(source, source="derived", tensor=f"{name} (input's scale)")
                t = self.requantize(self.fake_quant(t, kept, f"{name}_same_scale"), kept, spec)
            else:
                t = self.fake_quant(t, spec, name)
                if spec.source == "fixed":
                    t, spec = self._requantize_fixed(node, t, spec)
            self.quantized[name] = spec
        self.values[name] = t

    def requantize(self, t, src: QuantSpec, spec: QuantSpec):
        """Force a requantize (a QUANTIZE int8 -> int8 op) to ``spec``. Two fake-quants in a row
        are merged by the converter, and a MUL by 1.0 is optimised away; a MAXIMUM with the lowest
        representable value changes nothing and makes the converter requantize next to it."""
        low = float(np.float32((-128 - src.zero_point) * src.scale))
        t = self.tf.math.maximum(t, low)
        # the converter puts the QUANTIZE before or after the MAXIMUM (or makes a RELU of it when
        # the lowest value is 0): the verification accepts its output at either parameters
        if not self.tf.executing_eagerly():
            self.result.requantize_ops[t.op.name] = (src, spec)
        return self.fake_quant(t, spec, f"{spec.tensor}_requantized", register_producer=False)

    def _requantize_fixed(self, node: onnx.NodeProto, t, fixed: QuantSpec):
        """A TFLite-fixed output read by an op that keeps its input's scale (Tanh -> Transpose):
        requantize to the table's scale, or the fixed scale would replace the canonical one
        downstream. Other readers (Mul, Conv through its Q) rescale on their own."""
        name = node.output[0]
        readers = {c.op_type for c in self.g.consumers.get(name, [])}
        if name not in self.table or not readers & SAME_SCALE_OPS:
            return t, fixed
        spec = QuantSpec(self.table.scale(name), self.table_zero_point(name), "calibration", name)
        if same_params(spec, fixed):
            return t, fixed
        return self.requantize(t, fixed, spec), spec

    def emit_same_scale(self, node: onnx.NodeProto, t, index: int = 0) -> None:
        """Output of a scale-preserving op: the table's scale, else its input's."""
        name = node.output[index]
        spec = self.spec_for(name, node)
        if spec is None and node.input[0] in self.quantized:
            src = self.quantized[node.input[0]]
            spec = QuantSpec(src.scale, src.zero_point, "derived", name)
        self.emit(node, t, index, spec)

    def constant_operand(self, node: onnx.NodeProto, c: np.ndarray | np.generic):
        """A float constant an int8 op reads: quantized per-tensor with its own range."""
        amax = float(np.abs(c).max(initial=0.0)) or 1.0
        spec = QuantSpec(float(np.float32(amax / 127)), 0, "derived", f"constant of {node.name}")
        return self.fake_quant(self.tf.constant(c.astype(np.float32)), spec, f"{node.name}_const")

    def derived(self, t, node: onnx.NodeProto, what: str, amax: float):
        """An intermediate tensor of a decomposed op: symmetric range from its input's range."""
        amax = float(amax) if np.isfinite(amax) and amax > 0 else 1.0
        spec = QuantSpec(float(np.float32(amax / 127)), 0, "derived", f"{what} of {node.name}")
        return self.fake_quant(t, spec, f"{node.name}_{what}")

    def amax_of(self, tensor: str) -> float:
        spec = self.quantized.get(tensor)
        return 127 * spec.scale if spec else (self.table[tensor].amax if tensor in self.table else 1.0)

    # ---- graph-level --------------------------------------------------------------
    def _fused_activation_inputs(self) -> set[str]:
        """Outputs of Conv/Gemm/Add/... read only by an activation TFLite fuses into them."""
        out = set()
        graph_outputs = set(output_names(self.model))
        for node in self.model.graph.node:
            if node.op_type not in FUSABLE_PRODUCERS or node.output[0] in graph_outputs:
                continue
            if node.op_type == "Conv" and ops.group_kind(self, node) == "grouped":
                continue  # split + concat: every group's output needs the concat's scale
            if node.op_type == "MatMul" and self.g.weight(node.input[1]) is None:
                continue  # BATCH_MATMUL has no fused activation
            consumers = self.g.consumers.get(node.output[0], [])
            if len(consumers) == 1 and ops.fused_activation(self, consumers[0]) is not None:
                out.add(node.output[0])
        return out

    def fold(self, node: onnx.NodeProto) -> bool:
        """Evaluate shape arithmetic (Shape -> Gather/Concat/... -> Reshape/Resize) in numpy:
        the input shapes are fixed, so these are constants and never reach TFLite."""
        if node.op_type == "Shape" and node.input[0] in self.values:
            a = attrs(node)
            shape = np.array(self.onnx_shape(self.values[node.input[0]]), np.int64)
            self.folded[node.output[0]] = shape[a.get("start", 0):a.get("end", len(shape))]
            return True
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.input:
            return node.op_type == "Constant" and self._evaluate(node, [])
        if any(n in self.values for n in node.input if n):
            return False
        inputs = [self.const(n) if n else None for n in node.input]
        if any(v is None for n, v in zip(node.input, inputs) if n):
            return False
        return self._evaluate(node, inputs)

    def _evaluate(self, node: onnx.NodeProto, inputs: list) -> bool:
        from onnx.reference import ReferenceEvaluator

        try:
            outs = ReferenceEvaluator(node).run(None, {n: v for n, v in zip(node.input, inputs) if n})
        except Exception:
            return False
        for name, value in zip(node.output, outs):
            self.folded[name] = np.asarray(value)
        return True

    def lower_node(self, node: onnx.NodeProto) -> None:
        try:
            self._lower_node(node)
        except LoweringError:
            raise
        except KeyError as exc:
            raise self.error(node, f"input {exc} is not available (produced by an op the lowering skipped, "
                                   "or not a float tensor)") from None
        except (ValueError, TypeError) as exc:  # TF shape/type errors while tracing
            raise self.error(node, f"TensorFlow rejected the lowering: {str(exc).splitlines()[0][:300]}") from None

    def _lower_node(self, node: onnx.NodeProto) -> None:
        if node.name in self.absorbed or self.fold(node):
            return
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear"):
            ops.qdq(self, node)
        elif self.islands and (node.name in self.gelus or op in float_ops.FLOAT_GRAPH_OPS):
            float_ops.lower(self, node)
        elif op in ops.OPS:
            ops.OPS[op](self, node)
        elif op in ops.FLOAT_OPS:
            if not self.allow_float_fallback:
                raise self.error(node, f"TFLite has no int8 kernel for {op}; set allow_float_fallback = true in "
                                       f"[targets.{self.target_name}.options] to run it in float")
            ops.FLOAT_OPS[op](self, node)
            self.result.float_ops.append({"node": node.name, "op_type": op})
        else:
            hint = (f"no TFLite lowering exists for it, not even a float one (allow_float_fallback covers "
                    f"{', '.join(sorted(ops.FLOAT_OPS))})")
            raise self.error(node, f"op {op} is not supported by the TFLite lowering: {hint}; "
                                   f"int8 ops: {', '.join(sorted(ops.OPS))}")


def lower_graph(canonical: CanonicalModel, shapes: Mapping[str, list[int]], allow_float_fallback: bool,
                target_name: str, fake_quant: bool = True) -> Lowered:
    """Trace the canonical graph into a TF concrete function (fixed NHWC input shapes).

    ``fake_quant=False`` traces the same graph without fake-quant ops, in float: the baseline
    the latency benchmark compares INT8 against."""
    tf = _tf()
    model = canonical.model
    names = input_names(model)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    signature = []
    nhwc_layout = not float_ops.needs_islands(model)
    dtypes = {onnx.TensorProto.FLOAT: tf.float32, onnx.TensorProto.INT64: tf.int64,
              onnx.TensorProto.INT32: tf.int32, onnx.TensorProto.BOOL: tf.bool}
    for n in names:
        if elem[n] not in dtypes:
            raise LoweringError(f"input '{n}' is {onnx.TensorProto.DataType.Name(elem[n])}: the TFLite lowering "
                                f"takes float32, int64, int32 and bool inputs")
        shape = shapes[n]
        nhwc = [shape[i] for i in NCHW_TO_NHWC] if len(shape) == 4 and nhwc_layout else shape
        signature.append(tf.TensorSpec(nhwc, dtypes[elem[n]], name=safe_name(n)))
    inputs = [{"name": n, "shape": shapes[n], "nhwc": len(shapes[n]) == 4 and nhwc_layout} for n in names]
    walks: list[Lowering] = []

    def graph_fn(*args):
        # a fresh walk per trace: the converter may trace again, the last trace is the one converted
        lw = Lowering(canonical, allow_float_fallback, target_name, fake_quant)
        walks.append(lw)
        for n, t in zip(names, args):
            spec = lw.spec_for(n) if t.dtype == tf.float32 and not lw.islands else None
            if spec is not None:
                t = lw.fake_quant(t, spec, n)
                lw.quantized[n] = spec
            lw.values[n] = t
        for node in model.graph.node:
            lw.lower_node(node)
        return tuple(tf.identity(lw.values[o], name=safe_name(o)) for o in output_names(model))

    module = tf.Module()  # the converter's non-deprecated path wants a trackable owner
    module.graph_fn = tf.function(graph_fn, input_signature=signature, autograph=False)
    concrete = module.graph_fn.get_concrete_function()
    result = walks[-1].result
    result.concrete, result.module, result.inputs = concrete, module, inputs
    result.islands = walks[-1].islands
    result.float_layers = sorted(walks[-1].float_layers)
    for o, t in zip(output_names(model), concrete.structured_outputs):
        result.outputs.append({"name": o, "nhwc": len(t.shape) == 4 and nhwc_layout, "shape": [int(d) for d in t.shape]})
    return result


def convert(lowered: Lowered, input_type: str = "int8", output_type: str = "int8", quantize: bool = True) -> bytes:
    """Convert the traced function; the fake-quant ranges become the tensors' parameters.
    ``quantize=False`` converts a float graph (``lower_graph(..., fake_quant=False)``) as is."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([lowered.concrete], lowered.module)
    if not quantize:
        return _convert(converter)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # TFLITE_BUILTINS_INT8 alone demands a representative dataset even with fake-quant ops;
    # ops left in float are found by the verification instead (verify.full_integer).
    converter.inference_input_type = tf.int8 if input_type == "int8" else tf.float32
    converter.inference_output_type = tf.int8 if output_type == "int8" else tf.float32
    return _convert(converter)


def _convert(converter) -> bytes:
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises ConverterError / ValueError with long MLIR dumps
        errors = re.findall(r"error: (.*)", str(exc)) or [str(exc).strip().splitlines()[-1] if str(exc).strip() else ""]
        raise LoweringError(f"the TFLite converter failed: {errors[0][:400]}") from None


def same_params(a: QuantSpec, b: QuantSpec) -> bool:
    return np.float32(a.scale) == np.float32(b.scale) and a.zero_point == b.zero_point


from deploykit_tflite import float_ops, ops  # noqa: E402  (the op tables use the names above)
