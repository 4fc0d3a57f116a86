"""Which engine layers really run in int8, read from TensorRT's engine inspector.

``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` on an engine built with
``ProfilingVerbosity.DETAILED`` gives ``{"Layers": [{"Name", "LayerType", "ParameterType",
"Inputs": [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...]}], "Bindings": [...]}``
(the format TensorRT's engine explorer, TREx, parses). A layer's precision is the data type of
its first input, as TREx reads it: an int8 convolution consumes an int8 tensor.
"""

from __future__ import annotations

import json
import re
from typing import Any

from deploykit.backend import CheckResult, precision_audit

#: ParameterType / LayerType words of the layers that do the arithmetic (conv, deconv, gemm, matmul).
_COMPUTE = re.compile(r"convolution|deconvolution|gemm|matrixmultiply|fullyconnected", re.IGNORECASE)
#: Format/Datatype strings name the type as one word: "Int8", "INT8", "FP32", "Half", "Float", ...
_DTYPES = (("int8", "int8"), ("uint8", "uint8"), ("fp8", "fp8"), ("int4", "int4"), ("fp16", "fp16"),
           ("half", "fp16"), ("bfloat16", "bf16"), ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"),
           ("int64", "int64"))
_PROFILE_SUFFIX = re.compile(r"\[profile \d+\]")


def _dtype(fmt: str) -> str:
    words = fmt.lower().replace(".", " ").split()
    for word, dtype in _DTYPES:
        if word in words:
            return dtype
    return "unknown"


def compute_layers(engine_info: str | dict[str, Any]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(name, type, precision) of every compute layer of profile 0, and the names of fused
    Myelin layers, whose inner ops the inspector does not break down."""
    info = json.loads(engine_info) if isinstance(engine_info, str) else engine_info
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    if layers and not isinstance(layers[0], dict):
        raise ValueError("the engine inspector gave layer names only: build with ProfilingVerbosity.DETAILED")
    compute, opaque = [], []
    for layer in layers:
        name = str(layer.get("Name", ""))
        if _PROFILE_SUFFIX.search(name):  # other optimisation profiles repeat the same layers
            continue
        kind = str(layer.get("ParameterType") or layer.get("LayerType") or "")
        sub = str(layer.get("LayerType", ""))
        if sub.lower() == "myelin":
            opaque.append(name)
            continue
        if not (_COMPUTE.search(kind) or _COMPUTE.search(sub)):
            continue
        inputs = layer.get("Inputs") or []
        precision = _dtype(str(inputs[0].get("Format/Datatype", ""))) if inputs else "unknown"
        compute.append((name, kind or sub, precision))
    return compute, opaque


def int8_audit(engine_info: str | dict[str, Any], declared_float: list[str] | tuple[str, ...] = ()) -> CheckResult:
    """The shared ``int8_fraction`` check (deploykit.backend.precision_audit) for a TensorRT engine;
    ``declared_float``: the canonical model's float islands, named apart (strongly typed: they
    build as the FP32 layers the ONNX model has)."""
    layers, opaque = compute_layers(engine_info)
    result = precision_audit(layers, declared_float)
    if not opaque:
        return result
    details = dict(result.details)
    details["myelin_layers"] = opaque
    return CheckResult(result.name, result.status, result.value, result.threshold, result.bound,
                       result.message + f"; {len(opaque)} fused Myelin layer(s) not broken down", details)
