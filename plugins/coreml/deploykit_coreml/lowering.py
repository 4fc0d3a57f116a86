"""Lowering the canonical QDQ graph to a Core ML ML program, built op by op with the MIL builder.

coremltools has no ONNX front end, so the graph is walked here: weight DequantizeLinear nodes
become int8 ``constexpr_affine_dequantize`` (iOS17) / ``constexpr_blockwise_shift_scale``
(iOS18) ops with the canonical per-channel scales, activation Q/DQ pairs become
``quantize`` / ``dequantize`` with the canonical scales, everything else goes through the op
table in :mod:`deploykit_coreml.ops`. Every MIL op that carries a canonical scale gets a name
recorded in :class:`Lowered.qdq_names`, which verification uses to find it in the package.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, NoReturn

import numpy as np
import onnx

from deploykit.canonical import QdqGraph
from deploykit.errors import ConfigError, LoweringError
from deploykit_coreml import sdk

#: Deployment targets that have int8 activation quantize/dequantize (the iOS17 opset).
DEPLOYMENT_TARGETS = ("iOS17", "macOS14", "iOS18", "macOS15")
#: Older targets, with the minimum of the same OS family they would need.
OLDER_TARGETS = {"iOS13": "iOS17", "iOS14": "iOS17", "iOS15": "iOS17", "iOS16": "iOS17",
                 "macOS10.15": "macOS14", "macOS11": "macOS14", "macOS12": "macOS14", "macOS13": "macOS14",
                 "watchOS6": "watchOS10", "watchOS7": "watchOS10", "watchOS8": "watchOS10", "watchOS9": "watchOS10",
                 "tvOS13": "tvOS17", "tvOS14": "tvOS17", "tvOS15": "tvOS17", "tvOS16": "tvOS17"}
#: iOS18-level targets store weights with constexpr_blockwise_shift_scale.
IOS18_TARGETS = ("iOS18", "macOS15")
#: Default passes that would change the stored scales or the ops verification looks for:
#: - distributive_quantized_binary_op_scale_normalization rewrites the scales around add;
#: - nullify_redundant_quantization_zero_point drops the canonical zero points and renames the ops;
#: - const_deduplication merges identical weights, so a canonical weight would lose its own op.
REMOVED_PASSES = ("common::distributive_quantized_binary_op_scale_normalization",
                  "common::nullify_redundant_quantization_zero_point",
                  "common::const_deduplication")
FP16_MAX = 65504.0
#: The smallest positive fp16 value (a subnormal, 2**-24): no scale stored in fp16 is smaller.
FP16_TINY = 2.0 ** -24
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8}


def check_deployment_target(value: str) -> str:
    """The target name, or a ConfigError naming the minimum int8 activation quantization needs."""
    if value in DEPLOYMENT_TARGETS:
        return value
    if value in OLDER_TARGETS:
        raise ConfigError(
            f"coreml option minimum_deployment_target = '{value}' is too old: int8 activation "
            f"quantize/dequantize needs {OLDER_TARGETS[value]} or newer (one of {', '.join(DEPLOYMENT_TARGETS)})")
    raise ConfigError(f"coreml option minimum_deployment_target = '{value}' is unknown; "
                      f"use one of {', '.join(DEPLOYMENT_TARGETS)}")


@dataclass(frozen=True)
class InputSpec:
    """One model input: the Core ML name, the canonical (ONNX) name, the shape with None for the batch."""

    coreml_name: str
    onnx_name: str
    shape: tuple[int | str | None, ...]  # None: the batch; a name: a dynamic dimension such as the sequence
    dtype: str  # "fp32" or "int32" (int64 ONNX inputs become int32: Core ML has no int64 inputs)


@dataclass(frozen=True)
class QdqName:
    """Where one canonical Q/DQ node went: the MIL op that carries its scale."""

    onnx_node: str
    op_type: str  # QuantizeLinear / DequantizeLinear
    mil_op: str
    weight: bool


@dataclass
class Lowered:
    """A MIL program and what the rest of the backend needs to know about it."""

    program: Any
    inputs: list[InputSpec]
    outputs: list[tuple[str, str]]  # (Core ML name, canonical name)
    qdq_names: list[QdqName]
    op_counts: dict[str, int] = field(default_factory=dict)


def mil_identifier(name: str) -> str:
    """A MIL-safe identifier for an ONNX tensor name."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if out and not out[0].isdigit() else f"t_{out}"


class LoweringContext:
    """Values of ONNX tensors while the graph is walked: MIL Vars, or numpy arrays for constants."""

    def __init__(self, model: onnx.ModelProto, opset: str, fp16: bool = False) -> None:
        self.model = model
        self.fp16 = fp16
        self.graph = QdqGraph(model)
        self.opset = opset
        self.values: dict[str, Any] = {}
        self.used_names: set[str] = set()
        self.qdq_names: list[QdqName] = []
        self.initializers = {i.name for i in model.graph.initializer}
        self.output_names: dict[str, str] = {}

    # ---- names --------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name = mil_identifier(base)
        candidate, i = name, 0
        while candidate in self.used_names:
            i += 1
            candidate = f"{name}_{i}"
        self.used_names.add(candidate)
        return candidate

    def name(self, node: onnx.NodeProto) -> str:
        """The MIL name of the node's first output (call once per node). Graph outputs keep their
        reserved names, so the package's outputs are named like the canonical model's."""
        reserved = self.output_names.get(node.output[0])
        return reserved if reserved is not None else self.fresh(node.output[0])

    # ---- values -------------------------------------------------------------------------
    def constant(self, value: np.ndarray) -> np.ndarray:
        """Constants in the dtypes Core ML has: fp32, int32, bool.

        With fp16 compute, float constants are clamped to the fp16 range: an attention mask of
        -3.4e38 would become -inf and turn a fully masked softmax row into NaN."""
        from deploykit_coreml.ops import PartialShape

        if isinstance(value, PartialShape):  # already int32, and must keep its marker
            return value
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
            return np.asarray(np.clip(value, -FP16_MAX, FP16_MAX), np.float32) if self.fp16 else value
        if value.dtype.kind in "iu" and value.dtype != np.int8:
            info = np.iinfo(np.int32)
            return np.clip(value, info.min, info.max).astype(np.int32)
        return value

    def input(self, node: onnx.NodeProto, i: int):
        name = node.input[i]
        if name in self.values:
            return self.values[name]
        const = self.graph.const(name)
        if const is not None:
            value = self.constant(const)
            self.values[name] = value
            return value
        raise LoweringError(f"node '{node.name}' ({node.op_type}): input '{name}' has no producer")

    def const(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        value = self.input(node, i)
        if not isinstance(value, np.ndarray):
            raise LoweringError(f"node '{node.name}' ({node.op_type}): input {i} '{node.input[i]}' must be a "
                                "constant for Core ML; fold it before quantizing")
        return value

    def bind(self, node: onnx.NodeProto, value) -> None:
        self.values[node.output[0]] = value

    def is_integer(self, value) -> bool:
        from coremltools.converters.mil.mil import types

        if isinstance(value, np.ndarray):
            return value.dtype.kind in "iu"
        return types.is_int(value.dtype)

    def scalar_like(self, value, number: float):
        return np.int32(number) if self.is_integer(value) else np.float32(number)

    def unsupported(self, node: onnx.NodeProto, why: str) -> NoReturn:
        raise LoweringError(f"node '{node.name}' ({node.op_type}): {why}")

    # ---- Q/DQ ---------------------------------------------------------------------------
    def quantize(self, node: onnx.NodeProto) -> None:
        from coremltools.converters.mil import Builder as mb

        p = self.graph.params(node)
        x = self.input(node, 0)
        if isinstance(x, np.ndarray):
            self.unsupported(node, "QuantizeLinear of a constant")
        dtype = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}.get(p.zero_point.dtype)
        if dtype is None:
            self.unsupported(node, f"zero point type {p.zero_point.dtype}: Core ML quantizes to int8/uint8")
        name = self.name(node)
        kwargs = {"axis": np.int32(p.axis)} if p.axis is not None else {}
        self.bind(node, mb.quantize(input=x, scale=_scale(p.scale), zero_point=_zero_point(p.zero_point),
                                    output_dtype=dtype, name=name, **kwargs))
        self.qdq_names.append(QdqName(node.name, node.op_type, name, False))

    def dequantize(self, node: onnx.NodeProto) -> None:
        from coremltools.converters.mil import Builder as mb

        p = self.graph.params(node)
        if self.graph.is_weight_dq(node):
            self._weight(node, p)
            return
        x = self.input(node, 0)
        name = self.name(node)
        kwargs = {"axis": np.int32(p.axis)} if p.axis is not None else {}
        self.bind(node, mb.dequantize(input=x, scale=_scale(p.scale), zero_point=_zero_point(p.zero_point),
                                      name=name, **kwargs))
        self.qdq_names.append(QdqName(node.name, node.op_type, name, False))

    def _weight(self, node: onnx.NodeProto, p) -> None:
        from coremltools.converters.mil import Builder as mb

        data = self.graph.constant(node.input[0])
        if data.dtype != np.int8:
            self.unsupported(node, f"weight '{node.input[0]}' is {data.dtype}; the canonical model stores int8")
        name = self.name(node)
        axis = None if p.axis is None else p.axis % data.ndim
        scale_values = p.scale
        if self.fp16:
            stored = fp16_storable(data, p.scale, p.zero_point, axis)
            data, scale_values = stored.data, stored.scale
        if self.opset in IOS18_TARGETS:
            # blockwise op: scale/offset have the weight's rank, size 1 except on the channel axis
            block_shape = [1] * data.ndim
            if axis is not None:
                block_shape[axis] = data.shape[axis]
            scale = scale_values.reshape(block_shape).astype(np.float32)
            offset = p.zero_point.reshape(block_shape).astype(np.int8)
            value = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, name=name)
        else:
            kwargs = {"axis": np.int32(axis if axis is not None else 0)}
            value = mb.constexpr_affine_dequantize(quantized_data=data, scale=_scale(scale_values),
                                                   zero_point=_zero_point(p.zero_point).astype(np.int8),
                                                   name=name, **kwargs)
        self.bind(node, value)
        self.qdq_names.append(QdqName(node.name, node.op_type, name, True))


@dataclass(frozen=True)
class StorableWeight:
    """An int8 weight as Core ML can store it with fp16 scales."""

    data: np.ndarray  # int8, the canonical values except in ``channels``
    scale: np.ndarray  # float32, the canonical scales except in ``channels`` (FP16_TINY there)
    channels: tuple[int, ...]  # channels whose canonical scale rounds to 0 in fp16


def fp16_storable(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> StorableWeight:
    """The weight Core ML stores when its scales are fp16 (``compute_precision = "fp16"``).

    A canonical scale below 2**-25 rounds to 0 in fp16, which no dequantize can use. minmax
    calibration gives such scales to dead channels (all weights near 0: EfficientNet-Lite0 has
    109 in 27 weights, down to 2e-11). Left to coremltools, 13 of them became 2**-24 with the
    int8 values kept, which multiplies those weights by up to 2**-24 / scale (2.6e3 on
    EfficientNet-Lite0). Here such a channel stores 2**-24 with its int8 values re-rounded to
    it: every dequantized weight stays within 2**-25 (3e-8) of the canonical one, the closest
    fp16 scales allow. Verification expects exactly this and names the channels."""
    scale = np.asarray(scale, np.float32).reshape(-1)
    zero_point = np.asarray(zero_point).reshape(-1)
    tiny = np.nonzero(scale.astype(np.float16) == 0)[0]
    if tiny.size == 0:
        return StorableWeight(data, scale, ())
    data = np.array(data, copy=True)
    scale = scale.copy()
    for c in tiny:
        zp = int(zero_point[c] if zero_point.size > 1 else zero_point[0])
        index: tuple[Any, ...] = (slice(None),) * (axis or 0) + (int(c),) if scale.size > 1 else (...,)
        steps = (data[index].astype(np.float64) - zp) * (float(scale[c]) / FP16_TINY)
        data[index] = np.clip(np.round(steps) + zp, -128, 127).astype(np.int8)
        scale[c] = np.float32(FP16_TINY)
    return StorableWeight(data, scale, tuple(int(c) for c in tiny))


def _scale(scale: np.ndarray):
    scale = np.asarray(scale, np.float32)
    return scale.reshape(()) if scale.size == 1 else scale.reshape(-1)


def _zero_point(zp: np.ndarray):
    zp = np.asarray(zp)
    return zp.reshape(()) if zp.size == 1 else zp.reshape(-1)


def _input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    out = []
    used: set[str] = set()
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        if tt.elem_type == onnx.TensorProto.FLOAT:
            dtype = "fp32"
        elif tt.elem_type in _INT_TYPES:
            dtype = "int32"
        else:
            kind = onnx.TensorProto.DataType.Name(tt.elem_type)
            raise LoweringError(f"input '{value.name}': element type {kind} has no Core ML input type")
        shape: list[int | str | None] = []
        for i, dim in enumerate(tt.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif i == 0:
                shape.append(None)  # the batch
            else:  # a named dynamic dimension (a token sequence): inputs sharing the name share the dim
                shape.append(dim.dim_param or f"{value.name}_dim{i}")
        name = mil_identifier(value.name)
        if name in used:
            raise LoweringError(f"input '{value.name}': two inputs map to the Core ML name '{name}'")
        used.add(name)
        out.append(InputSpec(name, value.name, tuple(shape), dtype))
    return out


def dynamic_dims(inputs: list[InputSpec]) -> list[str]:
    """The named dynamic (non-batch) dimensions of the inputs, in order of appearance."""
    names: list[str] = []
    for spec in inputs:
        names += [d for d in spec.shape if isinstance(d, str) and d not in names]
    return names


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node with no Core ML lowering (the pre-flight lists them all before any work)."""
    from deploykit_coreml.ops import OP_TABLE

    return [n for n in model.graph.node if n.op_type not in OP_TABLE or n.domain not in ("", "ai.onnx")]


def build_program(model: onnx.ModelProto, deployment_target: str, batch: str = "range",
                  batch_size: int = 1, fp16: bool = False) -> Lowered:
    """Walk the canonical graph and build the MIL program (no conversion, no files)."""
    ct = sdk.coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    from deploykit_coreml.ops import OP_TABLE

    check_deployment_target(deployment_target)
    unsupported = unsupported_nodes(model)
    if unsupported:  # before any work: name every op type, and the first node of each
        firsts: dict[str, str] = {}
        for n in unsupported:
            firsts.setdefault(f"{n.domain + '::' if n.domain else ''}{n.op_type}", n.name)
        listed = ", ".join(f"{op} ('{name}')" for op, name in firsts.items())
        raise LoweringError(f"{len(unsupported)} nodes of {len(firsts)} op types have no Core ML lowering: {listed}; "
                            "supported ops: see docs/backends/coreml.md")

    inputs = _input_specs(model)
    opset = getattr(ct.target, deployment_target)
    symbol = get_new_symbol() if batch == "range" else None
    symbols = {name: get_new_symbol() for name in dynamic_dims(inputs)}  # shared by inputs: same dim
    specs = {}
    for spec in inputs:
        shape = tuple((symbol if batch == "range" else batch_size) if d is None else symbols[d] if isinstance(d, str)
                      else d for d in spec.shape)
        specs[spec.coreml_name] = mb.TensorSpec(shape=shape, dtype=types.fp32 if spec.dtype == "fp32" else types.int32)

    ctx = LoweringContext(model, deployment_target, fp16)
    output_names = [o.name for o in model.graph.output]
    ctx.used_names |= set(specs)
    for name in output_names:
        ctx.output_names[name] = ctx.fresh(name)
    counts: dict[str, int] = {}
    with Function(specs, opset_version=opset) as function:
        for spec in inputs:
            ctx.values[spec.onnx_name] = function.inputs[spec.coreml_name]
        for node in model.graph.node:
            try:
                OP_TABLE[node.op_type](ctx, node)
            except (LoweringError, ConfigError):
                raise
            except Exception as exc:  # a builder type/shape error: say which node
                raise LoweringError(f"node '{node.name}' ({node.op_type}): Core ML builder rejected it: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        outputs = []
        for name in output_names:
            value = ctx.values.get(name)
            if value is None:
                raise LoweringError(f"graph output '{name}' is not produced by any node")
            wanted = ctx.output_names[name]
            if isinstance(value, np.ndarray) or value.name != wanted:  # e.g. an Identity or a constant
                value = mb.identity(x=value, name=wanted)
            outputs.append(value)
        function.set_outputs(outputs)
    program = Program()
    program.add_function("main", function)
    return Lowered(program, inputs, [(ctx.output_names[n], n) for n in output_names], ctx.qdq_names, counts)


def pass_pipeline():
    """The default pipeline minus the passes that would change stored scales or rename Q/DQ ops."""
    ct = sdk.coremltools()

    pipeline = ct.PassPipeline.DEFAULT  # a new pipeline object per call: convert() mutates it
    pipeline.remove_passes(list(REMOVED_PASSES))
    return pipeline


def dim_sizes(options: Mapping[str, Any]) -> list[int]:
    """The enumerated sizes of the dynamic dimensions (sorted, unique)."""
    return sorted({int(v) for v in options.get("dim_sizes", ()) or ()})


def check_shapes(options: Mapping[str, Any]) -> None:
    """Shape options, refused up front with what to do: enumerated shapes on several inputs need
    iOS18/macOS15 (coremltools refuses them for earlier ML program targets at the end of a long
    conversion)."""
    shapes = options.get("shapes", "range")
    if shapes not in ("range", "enumerated"):
        raise ConfigError(f"coreml option shapes = {shapes!r}: use 'range' or 'enumerated'")
    sizes = options.get("dim_sizes", ()) or ()
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ConfigError(f"coreml option dim_sizes = {list(sizes)!r}: give positive integers, e.g. [16, 32, 64, 128]")
    if int(options.get("max_dim", 512)) < 1:
        raise ConfigError(f"coreml option max_dim = {options.get('max_dim')!r} must be >= 1")
    if shapes == "enumerated":
        if options.get("minimum_deployment_target") not in IOS18_TARGETS:
            raise ConfigError(f"coreml option shapes = 'enumerated' needs minimum_deployment_target iOS18 or macOS15 "
                              f"(is {options.get('minimum_deployment_target')!r}); use shapes = 'range' for iOS17/macOS14")
        if not sizes:
            raise ConfigError("coreml option shapes = 'enumerated' needs dim_sizes, the sizes of the dynamic "
                              "dimensions to enumerate, e.g. dim_sizes = [16, 32, 64, 128]")


def input_types(lowered: Lowered, options: Mapping[str, Any], max_batch: int) -> list:
    """ct.TensorType per input: the batch and the named dynamic dims as RangeDims, or enumerated shapes
    (every combination of the batch sizes and ``dim_sizes``, the same list on every input)."""
    ct = sdk.coremltools()

    ranged = options["batch"] == "range"
    batch_default = min(int(options["batch_size"]), max_batch)
    sizes = dim_sizes(options)
    max_dim = int(options.get("max_dim", 512))
    dim_default = min(sizes[0] if sizes else 128, max_dim)
    names = dynamic_dims(lowered.inputs)
    out = []
    if options.get("shapes", "range") == "enumerated" and names:
        batches = sorted({1, batch_default, max_batch}) if ranged else [int(options["batch_size"])]
        combos = [(b, s) for b in batches for s in sizes]
        for spec in lowered.inputs:
            dtype = np.float32 if spec.dtype == "fp32" else np.int32
            shapes = [tuple(b if d is None else s if isinstance(d, str) else d for d in spec.shape) for b, s in combos]
            default = tuple(batch_default if d is None else sizes[0] if isinstance(d, str) else d for d in spec.shape)
            out.append(ct.TensorType(name=spec.coreml_name, dtype=dtype,
                                     shape=ct.EnumeratedShapes(shapes=shapes, default=default)))
        return out
    # one RangeDim object per dimension, shared by the inputs that share it
    batch_dim = ct.RangeDim(1, max_batch, batch_default) if ranged else int(options["batch_size"])
    named = {name: ct.RangeDim(1, max_dim, dim_default) for name in names}
    for spec in lowered.inputs:
        dtype = np.float32 if spec.dtype == "fp32" else np.int32
        dims: list[Any] = [batch_dim if d is None else named[d] if isinstance(d, str) else d for d in spec.shape]
        out.append(ct.TensorType(name=spec.coreml_name, shape=ct.Shape(tuple(dims)), dtype=dtype))
    return out


def convert(lowered: Lowered, options: Mapping[str, Any], max_batch: int):
    """ct.convert the program to an ML program (in memory; save with MLModel.save)."""
    ct = sdk.coremltools()

    check_shapes(options)
    target = getattr(ct.target, options["minimum_deployment_target"])
    precision = ct.precision.FLOAT16 if options["compute_precision"] == "fp16" else ct.precision.FLOAT32
    inputs = input_types(lowered, options, max_batch)
    # coremltools draws a tqdm bar per pass pipeline on stderr; deploykit has its own progress
    quiet = contextlib.redirect_stderr(io.StringIO()) if not logging.getLogger().isEnabledFor(logging.DEBUG) \
        else contextlib.nullcontext()
    with quiet:
        return ct.convert(lowered.program, convert_to="mlprogram", minimum_deployment_target=target,
                          compute_precision=precision, compute_units=getattr(ct.ComputeUnit, options["compute_units"]),
                          pass_pipeline=pass_pipeline(), inputs=inputs, skip_model_load=True)
