"""Float islands: which layers stay float (``--keep-float``), and what that costs in MACs.

A pattern is a node name, an op type (``Gemm``), or a shell glob over node names
(``/blocks.6/*``). Each pattern must match at least one node: a typo must not silently ship an
all-int8 model the user believes has a float layer. Of the matched nodes, the float layers are
the ones the canonical placement would otherwise quantize (compute ops, pooling, residual Add,
Concat); matching a node that is float anyway (a Softmax) is allowed and changes nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from deploykit.canonical import COMPUTE_OPS, attrs
from deploykit.errors import ConfigError
from deploykit.ortsession import exposing


def resolve_keep_float(model: onnx.ModelProto, patterns: Iterable[str], where: str = "--keep-float") -> list[str]:
    """Node names matched by ``patterns``, in graph order, limited to nodes placement quantizes.

    Raises ConfigError naming the first pattern that matches no node at all.
    """
    from deploykit.quantize.place import placement

    nodes = list(model.graph.node)
    matched: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            continue
        hits = {n.name for n in nodes if n.name == pattern or n.op_type == pattern or fnmatch.fnmatchcase(n.name, pattern)}
        if not hits:
            examples = ", ".join(n.name for n in nodes if n.op_type in COMPUTE_OPS)[:200]
            raise ConfigError(f"{where}: pattern '{pattern}' matches no node of the model (a node name, an op type "
                              f"such as Conv or Gemm, or a glob; compute nodes: {examples}...)")
        matched |= hits
    quantizable = set(placement(model))
    return [n.name for n in nodes if n.name in matched and n.name in quantizable]


def layer_macs(model: onnx.ModelProto, example: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Multiply-accumulates of every compute node (Conv, ConvTranspose, Gemm, MatMul) per sample.

    ``example``: one batch of real inputs (the evaluation data). Its first sample is run through
    onnxruntime and every compute node's shapes are read off the tensors: a sequence model's
    MatMuls then cost what they cost at that sequence length (shape inference alone leaves the
    sequence dimension symbolic, and the reshapes of attention unknown). Without it, or when that
    run fails, the shapes onnx shape inference finds; a symbolic dimension (batch, sequence) then
    counts as 1.
    """
    shapes = _observed_shapes(model, example) if example is not None else None
    if shapes is None:
        shapes = _inferred_shapes(model)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        y = shapes.get(node.output[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        a = shapes.get(node.input[0])
        macs = 0
        if y is not None and w is not None:
            n_out = int(np.prod(y[1:])) if len(y) > 1 else int(np.prod(y))
            if node.op_type == "Conv":
                macs = n_out * int(np.prod(w[1:]))  # [M, C/g, kh, kw]: C/g*kh*kw per output
            elif node.op_type == "ConvTranspose":
                x = a or []
                macs = (int(np.prod(x[1:])) if len(x) > 1 else 0) * int(np.prod(w[1:]))
            elif node.op_type == "Gemm":
                k = w[1] if attrs(node).get("transB", 0) else w[0]
                macs = n_out * int(k)
            else:  # MatMul [.., M, K] x [.., K, N]
                k = a[-1] if a else w[-2] if len(w) > 1 else 1
                macs = int(np.prod(y)) * int(k)
        out[node.name] = macs
    return out


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- shape inference is best effort; unknown shapes count as 0 MACs
        inferred = model
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]
    return shapes


def _observed_shapes(model: onnx.ModelProto, example: Mapping[str, np.ndarray]) -> dict[str, list[int]] | None:
    """Shapes of the compute nodes' tensors in one onnxruntime run on the first sample of
    ``example``; None when the model does not run on it (the caller falls back to inference)."""
    constants = {i.name for i in model.graph.initializer}
    wanted = {t for n in model.graph.node if n.op_type in COMPUTE_OPS
              for t in (n.input[0], n.input[1] if len(n.input) > 1 else "", n.output[0]) if t and t not in constants}
    try:
        sess = exposing(model, sorted(wanted))  # optimizations off: every node's tensors kept
        names = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {k: np.asarray(v)[:1] for k, v in example.items() if k in names})
    except Exception:  # noqa: BLE001 -- best effort: shape inference is the fallback
        return None
    return {o.name: list(np.shape(v)) for o, v in zip(sess.get_outputs(), got)}


def mac_summary(macs: Mapping[str, int], float_layers: Iterable[str]) -> dict[str, object]:
    """For the manifest: float layers with their MACs, and the int8 share of all compute MACs."""
    floats = [n for n in float_layers]
    total = sum(macs.values())
    float_macs = sum(macs.get(n, 0) for n in floats)
    return {
        "float_layers": [{"name": n, "macs": macs.get(n, 0)} for n in floats],
        "total_macs": total,
        "float_macs": float_macs,
        "int8_mac_share": (total - float_macs) / total if total else 1.0,
    }
