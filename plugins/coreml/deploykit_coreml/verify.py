"""Reading an .mlpackage back and comparing every stored int8 weight and scale with the canonical model.

Works on any OS: the spec comes from ``MLModel(path, skip_model_load=True).get_spec()`` and the
weights from ``weights/weight.bin`` through coremltools' blob reader. The comparison is exact:
against the canonical fp32 scale for fp32 compute precision, against its fp16-rounded value for
fp16 (Core ML then stores scales as fp16). With fp16 scales, a weight channel whose canonical
scale rounds to 0 in fp16 is stored as :func:`deploykit_coreml.lowering.fp16_storable` says
(scale 2**-24, int8 values re-rounded); verification expects exactly that and names those
channels in ``details.not_kept``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from deploykit.backend import CheckResult
from deploykit.canonical import QdqGraph
from deploykit_coreml import sdk
from deploykit_coreml.lowering import FP16_TINY, fp16_storable

#: add_fp16_cast renames every op it rewrites "<name>_cast_fp16".
FP16_SUFFIX = "_cast_fp16"
SCALE_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
DEQUANTIZE_OPS = ("dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
COMPUTE_OPS = ("conv", "conv_transpose", "linear", "matmul")
MAX_LISTED = 50


@dataclass(frozen=True)
class StoredOp:
    """One op of the package's main function with its constant parameters decoded."""

    type: str
    name: str
    params: Mapping[str, np.ndarray]
    inputs: Mapping[str, str]  # parameter -> name of the (non-constant) var feeding it


def weights_dir(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML"


def _decode(value, reader, dtypes) -> np.ndarray:
    """A MIL proto Value (immediate or in weight.bin) as a numpy array of its declared shape."""
    tensor_type = value.type.tensorType
    name = dtypes.Name(tensor_type.dataType)
    dims = [d.constant.size for d in tensor_type.dimensions]
    np_dtype = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                "INT32": np.int32, "INT16": np.int16, "UINT16": np.uint16, "BOOL": np.bool_,
                "FLOAT64": np.float64, "INT64": np.int64}.get(name)
    if value.HasField("blobFileValue"):
        read = {"FLOAT32": "read_float_data", "FLOAT16": "read_fp16_data", "INT8": "read_int8_data",
                "UINT8": "read_uint8_data", "INT32": "read_int32_data", "INT16": "read_int16_data",
                "UINT16": "read_uint16_data"}.get(name)
        if read is None or reader is None:
            raise ValueError(f"cannot read a {name} blob")
        array = np.asarray(getattr(reader, read)(value.blobFileValue.offset))
        if name == "FLOAT16":  # the reader returns the raw fp16 bits
            array = array.view(np.float16) if array.dtype == np.uint16 else array.astype(np.float16)
        return array.reshape(dims)
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "strings":
        return np.array(list(tensor.strings.values)).reshape(dims)
    if kind == "bytes":
        return np.frombuffer(tensor.bytes.values, dtype=np_dtype).reshape(dims)
    if kind is None:
        return np.zeros(dims, np_dtype)
    return np.asarray(list(getattr(tensor, kind).values), dtype=np_dtype).reshape(dims)


def read_package(package: Path | str) -> dict[str, StoredOp]:
    """Ops of the package's main function that carry quantization parameters, plus compute ops,
    keyed by their output name with the fp16 suffix removed."""
    ct = sdk.coremltools()
    from coremltools.libmilstoragepython import _BlobStorageReader
    from coremltools.proto import MIL_pb2

    package = Path(package)
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    if not spec.HasField("mlProgram"):
        raise ValueError(f"{package} is not an ML program")
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    blob = weights_dir(package) / "weights" / "weight.bin"
    reader = _BlobStorageReader(str(blob)) if blob.exists() else None
    consts = {op.outputs[0].name: op.attributes["val"] for op in block.operations if op.type == "const"}
    out: dict[str, StoredOp] = {}
    for op in block.operations:
        if op.type not in SCALE_OPS + COMPUTE_OPS:
            continue
        params: dict[str, np.ndarray] = {}
        inputs: dict[str, str] = {}
        for key, value in op.attributes.items():
            if key != "name":
                params[key] = _decode(value, reader, MIL_pb2.DataType)
        for key, argument in op.inputs.items():
            if not argument.arguments:
                continue
            arg = argument.arguments[0]
            if arg.HasField("value"):
                params[key] = _decode(arg.value, reader, MIL_pb2.DataType)
            elif arg.name in consts:
                params[key] = _decode(consts[arg.name], reader, MIL_pb2.DataType)
            else:
                inputs[key] = arg.name
        name = op.outputs[0].name
        key = name[: -len(FP16_SUFFIX)] if name.endswith(FP16_SUFFIX) else name
        out[key] = StoredOp(op.type, name, params, inputs)
    return out


def _expected_scale(scale: np.ndarray, fp16: bool) -> np.ndarray:
    scale = np.asarray(scale, np.float32).reshape(-1)
    return scale.astype(np.float16).astype(np.float32) if fp16 else scale


def _same(stored: np.ndarray | None, expected: np.ndarray) -> bool:
    if stored is None:
        return False
    stored = np.asarray(stored).astype(np.float64).reshape(-1)
    expected = np.asarray(expected).astype(np.float64).reshape(-1)
    if stored.size == 1 and expected.size > 1:  # Core ML may store an all-equal vector as one value
        stored = np.broadcast_to(stored, expected.shape)
    return stored.shape == expected.shape and bool(np.array_equal(stored, expected))


META_QDQ_OPS = "deploykit.qdq_ops"
META_PRECISION = "deploykit.compute_precision"


def package_metadata(package: Path | str) -> dict[str, str]:
    ct = sdk.coremltools()

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return dict(spec.description.metadata.userDefined)


def verify_package(model: onnx.ModelProto, package: Path | str) -> CheckResult:
    """The "scales_match" check from the package alone: the lowering records, in the package's
    metadata, which MIL op carries each canonical Q/DQ node and the compute precision."""
    meta = package_metadata(package)
    if META_QDQ_OPS not in meta:
        return CheckResult("scales_match", "fail", message=f"{Path(package).name} has no {META_QDQ_OPS} "
                                                           "metadata: not built by deploykit's Core ML lowering")
    return compare(model, read_package(package), json.loads(meta[META_QDQ_OPS]),
                   meta.get(META_PRECISION, "fp16") == "fp16")


def compare(model: onnx.ModelProto, stored_ops: Mapping[str, StoredOp], mil_name: Mapping[str, str],
            fp16: bool) -> CheckResult:
    g = QdqGraph(model)
    not_kept: list[str] = []  # "node channel c: reason", channels fp16 cannot store as the canonical model
    mismatches: list[dict[str, Any]] = []
    counts = {"weights_compared": 0, "weight_values": 0, "scales_compared": 0, "scale_values": 0,
              "zero_points_compared": 0}

    def miss(node, what, expected=None, stored=None):
        entry = {"node": node.name, "op_type": node.op_type, "what": what}
        if expected is not None:
            entry["expected"] = np.asarray(expected).reshape(-1)[:8].tolist()
        if stored is not None:
            entry["stored"] = np.asarray(stored).reshape(-1)[:8].tolist()
        mismatches.append(entry)

    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        p = g.params(node)
        op = stored_ops.get(mil_name.get(node.name, ""))
        if op is None:
            miss(node, "no Core ML op carries this node's scale (not lowered, or removed by a pass)")
            continue
        weight = g.is_weight_dq(node)
        expected_scale = _expected_scale(p.scale, fp16)
        if weight:
            data = g.constant(node.input[0])
            if fp16:
                axis = None if p.axis is None else p.axis % data.ndim
                storable = fp16_storable(data, p.scale, p.zero_point, axis)
                data, expected_scale = storable.data, _expected_scale(storable.scale, fp16)
                not_kept += [f"{node.name} channel {c}: scale {float(p.scale.reshape(-1)[c]):.3g} rounds to 0 "
                             f"in fp16; stored {FP16_TINY:.3g} (2**-24) with its int8 values re-rounded "
                             "(dequantized weights within 3e-8 of the canonical ones)" for c in storable.channels]
            stored_data = op.params.get("quantized_data", op.params.get("data"))
            counts["weights_compared"] += 1
            counts["weight_values"] += int(data.size)
            if stored_data is None or stored_data.dtype != np.int8 or stored_data.shape != data.shape:
                miss(node, f"stored weight is {None if stored_data is None else (stored_data.dtype, stored_data.shape)}, "
                           f"canonical is int8 {data.shape}")
            elif not np.array_equal(stored_data, data):
                diff = int(np.count_nonzero(stored_data != data))
                miss(node, f"{diff} of {data.size} int8 weight values differ")
            stored_scale = op.params.get("scale")
            stored_zp = op.params.get("zero_point", op.params.get("offset"))
            if op.type == "constexpr_affine_dequantize" and p.axis is not None:
                if int(op.params.get("axis", np.int32(-1))) != p.axis % data.ndim:
                    miss(node, f"per-channel axis {int(op.params.get('axis', -1))} != canonical {p.axis}")
        else:
            stored_scale = op.params.get("scale")
            stored_zp = op.params.get("zero_point")
            if op.type == "quantize" and str(op.params.get("output_dtype", np.array("")).reshape(-1)[0]) != \
                    {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}.get(p.zero_point.dtype, "?"):
                miss(node, f"quantizes to {op.params.get('output_dtype')}, canonical zero point is {p.zero_point.dtype}")
        counts["scales_compared"] += 1
        counts["scale_values"] += int(expected_scale.size)
        if not _same(stored_scale, expected_scale):
            miss(node, "scale differs" + (" from the fp16-rounded canonical scale" if fp16 else ""),
                 expected_scale, stored_scale)
        counts["zero_points_compared"] += 1
        stored_zp = np.zeros(1, np.int8) if stored_zp is None else stored_zp  # absent means 0
        if not _same(stored_zp, p.zero_point.reshape(-1)):
            miss(node, "zero point differs", p.zero_point, stored_zp)

    nothing = counts["weights_compared"] == 0 and counts["scales_compared"] == 0
    status = "fail" if mismatches or nothing else "pass"
    what = (f"{counts['weights_compared']} int8 weights ({counts['weight_values']} values) and "
            f"{counts['scales_compared']} scales ({counts['scale_values']} values)")
    if nothing:
        message = "no quantized weights or scales found in the canonical model: nothing to compare"
    elif mismatches:
        first = "; ".join(f"{m['node']}: {m['what']}" for m in mismatches[:3])
        message = f"{len(mismatches)} mismatches comparing {what} with the canonical model: {first}"
    else:
        message = f"{what} equal the canonical model" + (" (scales as fp16, as stored)" if fp16 else " exactly")
    if not_kept:
        weights = len({entry.split(" channel ")[0] for entry in not_kept})
        message += (f"; {len(not_kept)} dead channels in {weights} weights have scales below fp16's range, stored "
                    "as 2**-24 with re-rounded int8 values (see details.not_kept; compute_precision = \"fp32\" "
                    "keeps them)")
    return CheckResult("scales_match", status, float(len(mismatches)), message=message,
                       details={**counts, "mismatches": mismatches[:MAX_LISTED],
                                "mismatch_count": len(mismatches), "fp16_scales": fp16, "not_kept": not_kept})


def quantized_compute(stored_ops: Mapping[str, StoredOp]) -> CheckResult:
    """Which compute ops (conv, linear, matmul) take only dequantized int8 inputs in the stored program.

    Core ML picks kernel precision on the device; this says what the program allows, not what runs."""
    producers = {op.name: op.type for op in stored_ops.values()}
    layers: list[dict[str, Any]] = []
    for op in stored_ops.values():
        if op.type not in COMPUTE_OPS:
            continue
        feeds = [f for f in (op.inputs.get(k) for k in ("x", "y", "weight")) if f]
        int8 = bool(feeds) and all(producers.get(f) in DEQUANTIZE_OPS for f in feeds)
        layers.append({"name": op.name, "type": op.type, "int8_inputs": int8})
    total = len(layers)
    n = sum(1 for layer in layers if layer["int8_inputs"])
    floats = [layer["name"] for layer in layers if not layer["int8_inputs"]]
    message = f"{n} of {total} compute ops take int8-quantized inputs (Core ML chooses kernel precision on device)"
    if floats:
        message += "; float inputs: " + ", ".join(floats[:8])
    return CheckResult("int8_fraction", "info", (n / total) if total else 0.0, message=message,
                       details={"compute_ops": total, "int8_input_ops": n, "layers": layers})
