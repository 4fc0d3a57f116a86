"""The canonical QDQ model: its rules, its calibration table, and the lint that checks them.

This is the one file that says what every backend may rely on (docs/canonical-model.md says
the same in prose):

- ONNX opset 18 (``OPSET``); every node has a unique, non-empty name; metadata records the
  deploykit version, calibration method, calibration-data hash and source-model hash.
- Activations: per-tensor int8 in one of two profiles (``PROFILES``, named in metadata
  ``META_PROFILE``): ``symmetric`` (zero point 0, scale = amax / 127; TensorRT needs it) or
  ``asymmetric`` (an int8 zero point per tensor, scale = (hi - lo) / 255, the range [lo, hi]
  always holding 0 exactly). A model without the key is symmetric. Even in the asymmetric
  profile, both inputs of an activation x activation MatMul (attention) have zero point 0,
  except one never negative on the calibration data, which gets -128 (``zero_centred``).
- Weights: int8 initializers feeding DequantizeLinear, per-channel on the output-channel
  axis (``weight_axis``), narrow range [-127, 127], zero point 0.
- Biases stay float (TensorRT rejects an int32 bias DequantizeLinear).
- Q/DQ sit on the inputs of ``COMPUTE_OPS`` (both inputs of an activation x activation
  MatMul) and of ``POOLING_OPS`` over rank-4 activations; a residual Add of two rank-4 activations where one comes from a Conv gets both
  inputs quantized (TensorRT fuses Conv+Add); Concat inputs and output share one scale;
  ``SCALE_PRESERVING_OPS`` give their output the scale of their input.
- Float islands: nodes listed in metadata ``META_FLOAT_LAYERS`` (chosen by the user with
  ``--keep-float``, or by an accuracy search) keep float inputs and float weights. Every other
  compute node must read through Q/DQ: the lint accepts exactly the declared islands.
- Everything else stays float: LayerNorm, Softmax, the attention-mask Add. Softmax and
  Sigmoid outputs have TFLite-fixed parameters (1/256, -128) that zero point 0 cannot meet;
  the TFLite lowering applies them.
- The calibration table (metadata key ``deploykit.calibration_table``, and a sidecar
  ``.calib.json``) carries the range of *every* float activation tensor, with the shared-scale
  constraints above already applied, so a backend that quantizes more tensors takes its
  scales from there and never calibrates again.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

OPSET = 18
INT8_MAX = 127
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Output scale equals input scale (data movement, max, or averaging of one tensor).
SCALE_PRESERVING_OPS = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Transpose",
    "Flatten", "Squeeze", "Unsqueeze", "Pad", "Identity",
})
CONCAT = "Concat"
#: Pooling of a rank-4 activation reads it through Q/DQ, so pooling runs in int8 and the op
#: before it gets a quantized output (TensorRT and onnxruntime fuse on that).
POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"})

META_TABLE = "deploykit.calibration_table"
META_VERSION = "deploykit.version"
META_METHOD = "deploykit.calibration_method"
META_DATA_HASH = "deploykit.calibration_data_hash"
META_SOURCE_HASH = "deploykit.source_model_hash"
META_RANDOM = "deploykit.calibrated_on_random_data"
META_PROFILE = "deploykit.activation_profile"
META_FLOAT_LAYERS = "deploykit.float_layers"  # JSON list of node names kept float on purpose
SYMMETRIC, ASYMMETRIC = "symmetric", "asymmetric"
PROFILES = (SYMMETRIC, ASYMMETRIC)
INT8_MIN = -128
REQUIRED_METADATA = (META_VERSION, META_METHOD, META_DATA_HASH, META_SOURCE_HASH, META_TABLE)


def activation_scale(amax: float) -> float:
    """Symmetric int8 scale for a calibrated |x| threshold; never zero (a dead tensor gets 1/127)."""
    amax = float(amax)
    if not np.isfinite(amax) or amax <= 0:
        amax = 1.0
    return float(np.float32(amax / INT8_MAX))


def asymmetric_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, int8 zero point) covering [lo, hi] widened to hold 0, so 0.0 is exact.

    scale = (hi - lo) / 255 and zero point = round(-128 - lo / scale), clipped to int8. A dead
    tensor (lo == hi == 0) gets scale 1/127 and zero point 0, as in the symmetric profile.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi - lo <= 0:
        return activation_scale(0.0), 0
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(np.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
    return scale, zp


def zero_centred(profile: str, matmul_operand: bool, observed_min: float) -> bool:
    """Whether an activation keeps zero point 0 (scale amax / 127) rather than the asymmetric
    profile's zero point: always in the symmetric profile; in the asymmetric one, an input of an
    activation x activation MatMul (attention's Q, K, V, probabilities), unless it was never
    negative on the calibration data (``observed_min`` >= 0: the softmax probabilities), whose
    [0, max] then gets all 256 steps with zero point -128 instead of 128 (all-MiniLM-L6-v2:
    embedding cosine 0.99777 -> 0.99821). OpenVINO's CPU plugin runs such a MatMul in f32 when an
    operand has a zero point, so its lowering re-encodes a -128 operand as uint8 with zero point
    0, the same grid. ``deploykit.quantize.place`` (PTQ) and ``deploykit.qat`` (the torch graph)
    both decide by this; the lint accepts ``MATMUL_OPERAND_ZERO_POINTS``.
    """
    never_negative = bool(np.isfinite(observed_min) and observed_min >= 0.0)
    return profile == SYMMETRIC or (matmul_operand and not never_negative)


#: Zero points an input of an activation x activation MatMul may have, per profile (``zero_centred``).
MATMUL_OPERAND_ZERO_POINTS = {SYMMETRIC: frozenset({0}), ASYMMETRIC: frozenset({0, INT8_MIN})}


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set ``key`` in the model's metadata (in place): replaced where it exists, else added last."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def model_profile(model: onnx.ModelProto) -> str:
    """The activation profile a canonical model declares (``symmetric`` when it says nothing)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return str(meta.get(META_PROFILE, SYMMETRIC))


def model_float_layers(model: onnx.ModelProto) -> list[str]:
    """Node names the canonical model keeps float on purpose (empty when it declares none)."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        value = json.loads(meta.get(META_FLOAT_LAYERS, "[]"))
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def weight_axis(op_type: str, attrs: Mapping[str, int], weight_rank: int) -> int:
    """Per-channel axis of a weight, the output-channel axis TensorRT expects.

    Conv: 0 ([M, C/g, kH, kW]). ConvTranspose: 0 as well: TensorRT wants the scale on axis 0
    of its [C, M/g, kH, kW] weight. Gemm: 0 with transB=1 ([N, K]), else 1 ([K, N]).
    MatMul: the last axis (N of [.., K, N]).
    """
    if op_type in ("Conv", "ConvTranspose"):
        return 0
    if op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op_type == "MatMul":
        return weight_rank - 1
    raise ValueError(f"no weight axis for {op_type}")


# --------------------------------------------------------------------------------------
# calibration table
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRange:
    """Calibrated range of one float activation tensor.

    Symmetric profile: zero point 0, scale = amax / 127. Asymmetric profile: the int8 zero
    point and scale of :func:`asymmetric_params`; amax is then max(|lo|, |hi|) of that range.
    """

    amax: float  # threshold chosen by the calibration method, after shared-scale constraints
    scale: float
    min: float  # observed
    max: float  # observed
    zero_point: int = 0  # int8

    @property
    def lo(self) -> float:
        """Smallest representable value: (-128 - zero_point) * scale."""
        return float((INT8_MIN - self.zero_point) * np.float32(self.scale))

    @property
    def hi(self) -> float:
        """Largest representable value: (127 - zero_point) * scale."""
        return float((INT8_MAX - self.zero_point) * np.float32(self.scale))


class CalibrationTable(dict[str, TensorRange]):
    """tensor name -> :class:`TensorRange` for every float activation tensor."""

    def scale(self, tensor: str) -> float:
        return float(self[tensor].scale)

    def to_json(self) -> str:
        # [amax, scale, min, max] (+ zero point when not 0: older readers keep working)
        return json.dumps({k: [v.amax, v.scale, v.min, v.max] + ([v.zero_point] if v.zero_point else [])
                           for k, v in sorted(self.items())})

    def zero_point(self, tensor: str) -> int:
        return self[tensor].zero_point

    @classmethod
    def from_json(cls, text: str) -> "CalibrationTable":
        out = cls()
        for k, v in json.loads(text).items():
            out[k] = TensorRange(float(v[0]), float(v[1]), float(v[2]), float(v[3]), int(v[4]) if len(v) > 4 else 0)
        return out

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "CalibrationTable":
        meta = {p.key: p.value for p in model.metadata_props}
        if META_TABLE not in meta:
            raise KeyError(f"model has no {META_TABLE} metadata: not a deploykit canonical model")
        return cls.from_json(meta[META_TABLE])

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


# --------------------------------------------------------------------------------------
# reading a QDQ graph (shared by the lint and by backends)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantParams:
    scale: np.ndarray  # float32, scalar or [C]
    zero_point: np.ndarray  # same shape as scale
    axis: int | None  # None for per-tensor
    dtype: int  # onnx TensorProto elem type of the quantized values


class QdqGraph:
    """Index of a QDQ model: producers, consumers, initializers and Q/DQ parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.initializers.setdefault(node.output[0], attr.t)

    def const(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def constant(self, name: str) -> np.ndarray:
        """The initializer ``name`` as an array; a ValueError naming it when it is not one."""
        value = self.const(name)
        if value is None:
            raise ValueError(f"'{name}' is not a constant initializer")
        return value

    def params(self, node: onnx.NodeProto) -> QuantParams:
        """Scale / zero point / axis of a QuantizeLinear or DequantizeLinear node."""
        scale = self.const(node.input[1])
        if scale is None:
            raise ValueError(f"{node.op_type} '{node.name}': scale '{node.input[1]}' is not a constant")
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = self.const(zp_name) if zp_name else None
        if zp is None:
            zp = np.zeros(scale.shape, np.uint8)
        axis = None
        if scale.ndim >= 1 and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "DequantizeLinear" and node.input[0] in self.initializers:
            dtype = self.initializers[node.input[0]].data_type
        else:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
        return QuantParams(scale.astype(np.float32), zp, axis, dtype)

    def dq_feeding(self, tensor: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def is_weight_dq(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "DequantizeLinear" and node.input[0] in self.initializers

    def weight(self, tensor: str) -> tuple[np.ndarray, QuantParams] | None:
        """(int8 values, params) when ``tensor`` is a dequantized weight initializer."""
        dq = self.dq_feeding(tensor)
        if dq is None or not self.is_weight_dq(dq):
            return None
        values = self.const(dq.input[0])
        return None if values is None else (values, self.params(dq))

    def weight_of(self, tensor: str) -> tuple[np.ndarray, QuantParams]:
        """:meth:`weight` where the caller knows ``tensor`` is a dequantized weight; a ValueError otherwise."""
        found = self.weight(tensor)
        if found is None:
            raise ValueError(f"'{tensor}' is not a dequantized weight initializer")
        return found

    def activation_source(self, tensor: str) -> tuple[str, QuantParams] | None:
        """For the output of an activation DQ: (the float tensor before its Q, params)."""
        dq = self.dq_feeding(tensor)
        if dq is None or self.is_weight_dq(dq):
            return None
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        return q.input[0], self.params(dq)


@dataclass(frozen=True)
class CanonicalModel:
    """The one canonical QDQ model every backend lowers.

    path: the canonical ``.qdq.onnx`` on disk (passes ``deploykit inspect --lint``).
    model: the same model loaded (treat as read-only; copy before rewriting).
    calibration: calibrated range of *every* float activation tensor (scale with zero point 0),
        including tensors the canonical model leaves unwrapped; use it where a target must
        quantize more tensors than the canonical model does.
    fp32_path: the normalised FP32 model, the accuracy reference.
    example_shapes: the shape of each input in the evaluation data at batch 1 (None when the
        build has no data yet); a target that needs fixed shapes (TFLite) reads dynamic
        non-batch dims, such as a sequence length, from here.
    """

    path: Path
    model: onnx.ModelProto
    calibration: CalibrationTable
    fp32_path: Path
    example_shapes: Mapping[str, tuple[int, ...]] | None = None


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def preserves_scale(node: onnx.NodeProto) -> bool:
    """Output scale = input scale: ``SCALE_PRESERVING_OPS``, and Resize in nearest mode only."""
    if node.op_type == "Resize":
        return attrs(node).get("mode", b"nearest") in (b"nearest", "nearest")
    return node.op_type in SCALE_PRESERVING_OPS


# --------------------------------------------------------------------------------------
# lint
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str
    tensorrt: bool = False  # TensorRT's parser would reject the model

    def __str__(self) -> str:
        tag = " [TensorRT]" if self.tensorrt else ""
        return f"{self.rule}{tag}: node '{self.node}': {self.message}"


RULES = {
    "opset": "default-domain opset is 18 (TensorRT needs >= 13)",
    "node-names": "every node has a unique, non-empty name",
    "metadata": "metadata records version, calibration method, data and source hashes, calibration table",
    "profile": "metadata names a known activation profile (symmetric or asymmetric)",
    "zero-point": "weight zero points are 0; activation zero points are 0 in the symmetric profile, and on "
                  "both inputs of an activation x activation MatMul in both, except -128 on a never-negative "
                  "one (softmax probabilities, [0, max] in 256 steps) in the asymmetric profile",
    "dq-input-type": "DequantizeLinear inputs are int8 (no int32 bias DQ, no uint8)",
    "activation-per-tensor": "activation Q/DQ are per-tensor",
    "qdq-pair": "every activation DequantizeLinear is fed by a QuantizeLinear with the same scale and zero point",
    "weight-range": "int8 weights are narrow range [-127, 127]",
    "weight-axis": "weight scales are per-channel on the output-channel axis",
    "compute-inputs-quantized": "inputs of Conv/ConvTranspose/Gemm/MatMul come from DequantizeLinear, "
                                "unless the node is a declared float layer",
    "float-layers": "declared float layers exist and really are float (no Q/DQ on their inputs)",
    "float-bias": "biases are float initializers",
    "residual-add": "a residual Add has both inputs quantized, or neither",
    "concat-scale": "Concat inputs and output share one scale",
    "scale-preserving": "pooling/reshape-like ops keep their input's scale",
    "shared-zero-point": "tensors that share a scale (Concat, pooling, reshape-like ops) share the zero point",
    "table-scale": "every activation Q scale and zero point equal the calibration table's for that tensor",
}


def lint(model: onnx.ModelProto, tensorrt_only: bool = False) -> list[Violation]:
    """Check every contract rule; return the violations (empty list: the model is canonical)."""
    out: list[Violation] = []
    g = QdqGraph(model)
    gname = model.graph.name or "graph"

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        out.append(Violation("opset", gname, f"opset {opset} < 13: TensorRT needs per-channel Q/DQ from opset 13", True))
    elif opset != OPSET:
        out.append(Violation("opset", gname, f"opset {opset}, the canonical model is opset {OPSET}"))

    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name:
            out.append(Violation("node-names", f"#{i} ({node.op_type})", "node has no name"))
        elif node.name in seen:
            out.append(Violation("node-names", node.name, "name used by more than one node"))
        seen.add(node.name)

    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        out.append(Violation("metadata", gname, f"missing metadata {', '.join(missing)}"))
    table = None
    if META_TABLE in meta:
        try:
            table = CalibrationTable.from_json(meta[META_TABLE])
        except (ValueError, TypeError) as exc:
            out.append(Violation("metadata", gname, f"{META_TABLE} is not a valid table: {exc}"))

    profile = meta.get(META_PROFILE, SYMMETRIC)
    if profile not in PROFILES:
        out.append(Violation("profile", gname, f"{META_PROFILE} is '{profile}', not one of {', '.join(PROFILES)}"))
    floats = set(model_float_layers(model))
    names = {n.name for n in model.graph.node}
    for missing_node in sorted(floats - names):
        out.append(Violation("float-layers", missing_node, "declared float layer is not a node of the graph"))

    def scale_of(tensor: str) -> tuple[float, int] | None:
        src = g.activation_source(tensor)
        return (float(src[1].scale.reshape(-1)[0]), int(src[1].zero_point.reshape(-1)[0])) if src else None

    for node in model.graph.node:
        name = node.name or node.op_type
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            try:
                p = g.params(node)
            except ValueError as exc:
                out.append(Violation("qdq-pair", name, str(exc)))
                continue
            weight = g.is_weight_dq(node)
            if np.any(p.zero_point != 0) and (weight or profile != ASYMMETRIC):
                why = "weights are symmetric" if weight else f"the activation profile is {profile}"
                out.append(Violation("zero-point", name,
                                     f"zero point {p.zero_point.reshape(-1)[:4].tolist()} is not 0 ({why})", True))
            if p.zero_point.dtype != np.int8:
                out.append(Violation("dq-input-type", name, f"zero point type {p.zero_point.dtype} is not int8", True))
            if node.op_type == "DequantizeLinear" and g.is_weight_dq(node):
                _lint_weight(g, node, p, out)
            elif node.op_type == "DequantizeLinear":
                if p.axis is not None:
                    out.append(Violation("activation-per-tensor", name, "activation DequantizeLinear is per-channel"))
                q = g.producer.get(node.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    out.append(Violation("qdq-pair", name, "activation DequantizeLinear is not fed by a QuantizeLinear"))
                elif not np.array_equal(g.params(q).scale, p.scale):
                    out.append(Violation("qdq-pair", name, f"scale differs from its QuantizeLinear '{q.name}'"))
                elif not np.array_equal(g.params(q).zero_point, p.zero_point):
                    out.append(Violation("qdq-pair", name, f"zero point differs from its QuantizeLinear '{q.name}'"))
            elif node.op_type == "QuantizeLinear" and table is not None:
                src = node.input[0]
                if src in table and not np.isclose(float(p.scale.reshape(-1)[0]), table.scale(src), rtol=1e-6, atol=0):
                    out.append(Violation("table-scale", name,
                                         f"scale {float(p.scale.reshape(-1)[0]):.6g} != table scale {table.scale(src):.6g} of '{src}'"))
                elif src in table and int(p.zero_point.reshape(-1)[0]) != table.zero_point(src):
                    out.append(Violation("table-scale", name, f"zero point {int(p.zero_point.reshape(-1)[0])} != table "
                                                              f"zero point {table.zero_point(src)} of '{src}'"))

        if node.name in floats:
            quantized_inputs = [i for i in node.input if i and g.dq_feeding(i) is not None]
            if quantized_inputs:
                out.append(Violation("float-layers", name, f"declared float layer reads '{quantized_inputs[0]}' "
                                                          f"through DequantizeLinear"))
        elif node.op_type in COMPUTE_OPS:
            sources = [g.activation_source(i) for i in node.input[:2]]
            if node.op_type == "MatMul" and len(sources) == 2 and all(sources):
                allowed = MATMUL_OPERAND_ZERO_POINTS.get(profile, frozenset({0}))
                if any(int(src[1].zero_point.reshape(-1)[0]) not in allowed for src in sources if src):
                    out.append(Violation("zero-point", name, "an input of an activation x activation MatMul has a "
                                                            "zero point (0, or -128 for a never-negative operand in "
                                                            "the asymmetric profile)"))
            for idx in range(min(2, len(node.input))):
                if not g.dq_feeding(node.input[idx]):
                    out.append(Violation("compute-inputs-quantized", name,
                                         f"input {idx} '{node.input[idx]}' is not produced by DequantizeLinear "
                                         f"(and the node is not a declared float layer)"))
            if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
                bias_dq = g.dq_feeding(node.input[2])
                if bias_dq is not None:
                    out.append(Violation("float-bias", name, "bias is dequantized (int32 bias DequantizeLinear)", True))

        if node.op_type == "Add" and len(node.input) == 2 and node.name not in floats:
            quantized = [g.dq_feeding(i) is not None for i in node.input]
            consts = [i in g.initializers for i in node.input]
            if not any(consts) and quantized[0] != quantized[1]:
                out.append(Violation("residual-add", name, "one input is quantized and the other is not"))

        if node.op_type == CONCAT:
            params = {s for s in (scale_of(i) for i in node.input) if s is not None}
            if table is not None:
                params |= {(table.scale(t), table.zero_point(t)) for t in list(node.input) + list(node.output) if t in table}
            if len({round(s, 12) for s, _ in params}) > 1:
                out.append(Violation("concat-scale", name, f"inputs/output use {len(params)} different scales"))
            elif len({z for _, z in params}) > 1:
                out.append(Violation("shared-zero-point", name, "Concat inputs/output use different zero points"))

        src_in = None
        if preserves_scale(node) and node.input:  # a pooling op reads its input through Q/DQ
            source = g.activation_source(node.input[0])
            src_in = source[0] if source else node.input[0]
        if src_in is not None and table is not None and src_in in table and node.output[0] in table:
            if not np.isclose(table.scale(src_in), table.scale(node.output[0]), rtol=1e-6, atol=0):
                out.append(Violation("scale-preserving", name, "output scale differs from input scale in the calibration table"))
            elif table.zero_point(src_in) != table.zero_point(node.output[0]):
                out.append(Violation("shared-zero-point", name, "output zero point differs from input zero point "
                                                               "in the calibration table"))

    if tensorrt_only:
        out = [v for v in out if v.tensorrt]
    return out


def _lint_weight(g: QdqGraph, dq: onnx.NodeProto, p: QuantParams, out: list[Violation]) -> None:
    name = dq.name or dq.op_type
    init = g.initializers[dq.input[0]]
    if init.data_type != onnx.TensorProto.INT8:
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        out.append(Violation("dq-input-type", name, f"DequantizeLinear input '{dq.input[0]}' is {kind}, not INT8", True))
        return
    w = numpy_helper.to_array(init)
    if w.size and int(w.min()) < -INT8_MAX:
        out.append(Violation("weight-range", name, f"weight '{dq.input[0]}' uses -128 (narrow range is [-127, 127])"))
    for consumer in g.consumers.get(dq.output[0], []):
        if consumer.op_type not in COMPUTE_OPS or list(consumer.input).index(dq.output[0]) != 1:
            continue
        want = weight_axis(consumer.op_type, attrs(consumer), w.ndim)
        axis = p.axis if p.axis is None or p.axis >= 0 else p.axis + w.ndim
        if axis is None:
            if w.ndim > 1 and w.shape[want] > 1:
                out.append(Violation("weight-axis", name, f"weight of {consumer.op_type} '{consumer.name}' is per-tensor; per-channel on axis {want} expected"))
        elif axis != want:
            out.append(Violation("weight-axis", name, f"weight of {consumer.op_type} '{consumer.name}' is quantized on axis {axis}, expected {want}", True))
        elif p.scale.size != w.shape[want]:
            out.append(Violation("weight-axis", name, f"{p.scale.size} scales for {w.shape[want]} channels on axis {want}", True))


def format_violations(violations: Iterable[Violation]) -> str:
    return "\n".join(str(v) for v in violations)
