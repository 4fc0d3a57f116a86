"""What ``deploykit inspect`` shows: what a model file really declares and uses.

Opset domains are the ones the nodes use (a model can declare domains it never imports:
onnxruntime's optimiser writes nine); inputs and outputs with dtype and shape (outputs
take their type from shape inference when the file leaves it out); metadata with terminal
control characters escaped, since it comes from whoever wrote the file.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx

from deploykit.model import used_domains
from deploykit.tables import escape, render


def _dims(t: onnx.TypeProto.Tensor) -> list[str] | None:
    if not t.HasField("shape"):
        return None  # rank unknown
    return [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _value(v: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = v.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": v.name, "dtype": kind or "unknown", "shape": None}
    t = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "unknown"
    return {"name": v.name, "dtype": dtype, "shape": _dims(t)}


def _outputs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    outs = [_value(o) for o in model.graph.output]
    if all(o["dtype"] != "unknown" and o["shape"] is not None for o in outs):
        return outs
    try:  # the file left an output's type out: ask shape inference
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        by_name = {v.name: _value(v) for v in list(inferred.graph.output) + list(inferred.graph.value_info)}
        return [by_name.get(o["name"], o) if o["dtype"] == "unknown" or o["shape"] is None else o for o in outs]
    except Exception:  # noqa: BLE001  # inference is a nicety here; the declared (partial) type stays
        return outs


def describe(model: onnx.ModelProto, path: Path, meta_skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON-able description of ``model`` (loaded from ``path``)."""
    used = used_domains(model)
    declared = {("ai.onnx" if o.domain in ("", "ai.onnx") else o.domain): int(o.version) for o in model.opset_import}
    inits = {i.name for i in model.graph.initializer}
    ops = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in model.graph.node)
    return {
        "model": str(path),
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {d: v for d, v in declared.items() if d in used},
        "opset_declared_unused": sorted(d for d in declared if d not in used),
        "inputs": [_value(i) for i in model.graph.input if i.name not in inits],
        "outputs": _outputs(model),
        "nodes": len(model.graph.node),
        "ops": dict(ops.most_common()),
        "metadata": {p.key: p.value for p in model.metadata_props if p.key not in meta_skip},
    }


def _shape(shape: list[str] | None) -> str:
    return "rank unknown" if shape is None else "[" + ", ".join(shape) + "]"


def render_text(info: dict[str, Any], tty: bool | None = None) -> str:
    """The terminal form of :func:`describe`; every string from the file is escaped."""
    opsets = ", ".join(f"{escape(d)} {v}" for d, v in info["opset"].items())
    lines = [f"{escape(info['model'])}: ONNX IR {info['ir_version']}, {info['nodes']} nodes"
             + (f", produced by {escape(info['producer'])}" if info["producer"] else ""),
             f"opset domains used: {opsets}"]
    if info["opset_declared_unused"]:
        lines.append("declared but unused: " + ", ".join(escape(d) for d in info["opset_declared_unused"]))
    rows = [["input", escape(v["name"]), escape(v["dtype"]), escape(_shape(v["shape"]))] for v in info["inputs"]]
    rows += [["output", escape(v["name"]), escape(v["dtype"]), escape(_shape(v["shape"]))] for v in info["outputs"]]
    lines += ["", render(["", "name", "dtype", "shape"], rows, tty=tty), ""]
    lines.append("ops: " + ", ".join(f"{escape(k)} {v}" for k, v in info["ops"].items()))
    for k, v in info["metadata"].items():
        lines.append(f"{escape(k)}: {escape(v)}")
    return "\n".join(lines)
