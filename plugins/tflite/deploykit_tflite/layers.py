"""The per-layer runner for .tflite artifacts (``Capability.LAYER_RUNNER``, see deploykit.layers).

The flatbuffer itself is cut, not the canonical model: every TFLite tensor that carries a
canonical quantized tensor (``artifact.metadata["tensor_map"]``, written by the lowering's
verification) becomes a subgraph input, and its producing op writes a new copy of it that
becomes a subgraph output. The LiteRT interpreter then runs the artifact's own ops and int8
kernels (XNNPACK included, as the artifact runner does) with every layer fed the canonical
model's own input to it, so one layer's rounding does not reach the next.

Values cross as ``q - zero_point`` in the canonical model's axis order: a CNN lowered in NHWC is
transposed at the boundary, an encoder's tensor the converter reshaped (a MatMul as CONV_2D on
[tokens, 1, 1, width]) is reshaped; a canonical tensor no TFLite tensor carries is not compared
(named in ``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from deploykit.errors import BackendUnavailable
from deploykit_tflite.lowering import NCHW_TO_NHWC, NHWC_TO_NCHW, safe_name
from deploykit_tflite.runner import INSTALL_HINT, interpreter_class, set_input

OUTPUT_PREFIX = "deploykit_layer_out/"


@dataclass(frozen=True)
class CutPoint:
    """One canonical quantized tensor as the flatbuffer holds it."""

    canonical: str  # the canonical QuantizeLinear output
    tensor: int  # index of the TFLite tensor carrying it
    output: int  # index of the copy its producer writes (the tensor itself for a graph input)
    zero_point: int
    scale: float
    layout: str  # "nhwc", "same" or "reshape" (see _layout)
    shape: tuple[int, ...]  # the TFLite tensor's shape
    graph_input: bool  # no producer: the runner quantizes the model input into it


def _flatbuffers() -> tuple[Any, Any]:
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as exc:
        raise BackendUnavailable(f"ai_edge_litert is not importable ({exc}); install it: {INSTALL_HINT}") from None
    return schema, flatbuffer_utils


def _name(tensor: Any) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _layout(tflite_shape: Sequence[int], canonical_shape: Sequence[Any] | None, nhwc: bool) -> str | None:
    """How the TFLite tensor holds the canonical one (batch aside; a symbolic canonical dim
    matches any size): "nhwc" (a CNN's 4-D tensor, transposed), "same", "reshape" (the same
    values in the same order, reshaped: the converter's [tokens, 1, 1, width] for a CONV_2D
    carrying a MatMul in ONNX axis order), or None."""
    if canonical_shape is None:
        return None
    tflite, want = [int(d) for d in tflite_shape], list(canonical_shape)
    if nhwc and len(want) == 4:
        if len(tflite) != 4:
            return None
        want = [want[i] for i in NCHW_TO_NHWC]
        return "nhwc" if all(not isinstance(w, int) or w <= 0 or t == w for t, w in zip(tflite[1:], want[1:])) else None
    if len(tflite) == len(want) and all(not isinstance(w, int) or w <= 0 or t == w for t, w in zip(tflite[1:], want[1:])):
        return "same"
    known = [w for w in want[1:] if isinstance(w, int) and w > 0]
    if len(known) == len(want) - 1 and int(np.prod(tflite)) % max(int(np.prod(known)), 1) != 0:
        return None  # no batch of the canonical tensor fills it
    return "reshape"


@dataclass
class CutFlatbuffer:
    content: bytes
    points: list[CutPoint]
    skipped: list[str]  # canonical tensors not compared, with the reason
    model_inputs: list[int]  # the uncut model's input tensors, in the signature's (canonical) order
    signature_names: list[str]  # their names in the signature (sanitised ONNX names), "" without one


def cut_flatbuffer(content: bytes, tensor_map: Mapping[str, str], cut_names: Sequence[str],
                   canonical_shapes: Mapping[str, Sequence[Any]], nhwc: bool) -> CutFlatbuffer:
    """The flatbuffer cut at every mapped canonical tensor."""
    schema, fb = _flatbuffers()
    model = fb.read_model_from_bytearray(bytearray(content))
    sg = model.subgraphs[0]
    signature = model.signatureDefs[0] if model.signatureDefs else None
    if signature is not None and signature.inputs:
        named = [(m.name.decode() if isinstance(m.name, bytes) else str(m.name), int(m.tensorIndex))
                 for m in signature.inputs]
    else:
        named = [("", int(i)) for i in sg.inputs]
    by_name: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, t in enumerate(sg.tensors):
        if _name(t) in by_name:
            ambiguous.add(_name(t))
        by_name[_name(t)] = i
    producer = {int(o): op for op in sg.operators for o in op.outputs}
    inputs = [int(i) for i in sg.inputs]
    # a TFLite tensor carrying several canonical tensors (none today) is cut once, for the last
    chosen: dict[int, str] = {}
    skipped: list[str] = []
    for name in cut_names:
        tflite = tensor_map.get(name)
        if tflite is None or tflite not in by_name:
            skipped.append(f"{name}: no TFLite tensor carries it")
            continue
        if tflite in ambiguous:
            skipped.append(f"{name}: several TFLite tensors are named '{tflite}'")
            continue
        chosen[by_name[tflite]] = name
    points: list[CutPoint] = []
    for index, name in chosen.items():
        t = sg.tensors[index]
        layout = _layout(list(t.shape), canonical_shapes.get(name), nhwc)
        q = t.quantization
        per_tensor_int8 = t.type == schema.TensorType.INT8 and q is not None and q.scale is not None and len(q.scale) == 1
        if not per_tensor_int8 or layout is None:
            skipped.append(f"{name}: TFLite tensor '{_name(t)}' {list(t.shape)} is not a per-tensor int8 form of "
                           f"the canonical {canonical_shapes.get(name)}")
            continue
        zero_point, scale = int(q.zeroPoint[0]), float(q.scale[0])
        shape = tuple(int(d) for d in t.shape)
        if index in inputs or index not in producer:
            points.append(CutPoint(name, index, index, zero_point, scale, layout, shape, True))
            continue
        copy = schema.TensorT()
        copy.shape, copy.type, copy.buffer = list(t.shape), t.type, 0
        copy.name = (OUTPUT_PREFIX + _name(t)).encode()
        copy.quantization = q
        sg.tensors.append(copy)
        out = len(sg.tensors) - 1
        op = producer[index]
        op.outputs = [out if int(o) == index else int(o) for o in op.outputs]
        sg.inputs = list(sg.inputs) + [index]
        sg.outputs = [out if int(o) == index else int(o) for o in sg.outputs]
        if out not in sg.outputs:
            sg.outputs = list(sg.outputs) + [out]
        points.append(CutPoint(name, index, out, zero_point, scale, layout, shape, False))
    model.signatureDefs = []  # the signature names the uncut model's inputs and outputs
    return CutFlatbuffer(bytes(fb.convert_object_to_bytearray(model)), points, skipped,
                         [i for _, i in named], [n for n, _ in named])


class TFLiteLayerRunner:
    """A deploykit.layers.LayerRunner on a cut copy of the .tflite artifact, run by LiteRT."""

    def __init__(self, path: Path, tensor_map: Mapping[str, str], cut: Any, canonical_shapes: Mapping[str, Sequence[Any]],
                 input_names: Sequence[str], nhwc: bool, threads: int = 0) -> None:
        cut_fb = cut_flatbuffer(Path(path).read_bytes(), tensor_map, cut.names, canonical_shapes, nhwc)
        self.points, self.skipped = cut_fb.points, cut_fb.skipped
        self.nhwc = nhwc
        self.interpreter: Any = interpreter_class()(model_content=cut_fb.content, num_threads=threads or None)
        self.interpreter.allocate_tensors()
        details = {int(d["index"]): d for d in self.interpreter.get_input_details()}
        by_signature = dict(zip(cut_fb.signature_names, cut_fb.model_inputs))
        if all(safe_name(n) in by_signature for n in input_names):
            indices = [by_signature[safe_name(n)] for n in input_names]
        elif len(input_names) == len(cut_fb.model_inputs):
            indices = list(cut_fb.model_inputs)
        else:
            raise ValueError(f".tflite has {len(cut_fb.model_inputs)} model inputs, the artifact names "
                             f"{len(input_names)}")
        self.model_inputs = [(name, details[i]) for name, i in zip(input_names, indices)]
        self.batch = int(self.model_inputs[0][1]["shape"][0]) if self.model_inputs else 1

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = int(np.asarray(feeds[self.model_inputs[0][0]]).shape[0])
        parts: dict[str, list[np.ndarray]] = {p.canonical: [] for p in self.points}
        for start in range(0, total, self.batch):
            n = min(self.batch, total - start)

            def chunk(value: Any) -> np.ndarray:
                v = np.asarray(value)[start:start + n]
                return v if n == self.batch else np.concatenate([v, np.repeat(v[-1:], self.batch - n, axis=0)])

            for name, d in self.model_inputs:
                set_input(self.interpreter, d, chunk(feeds[name]), self.nhwc)
            for p in self.points:
                if p.graph_input:
                    continue
                value = chunk(feeds[p.canonical]).astype(np.int32) + p.zero_point
                if p.layout == "nhwc":
                    value = value.transpose(NCHW_TO_NHWC)
                elif p.layout == "reshape":
                    if value.size != int(np.prod(p.shape)):
                        raise ValueError(f"layer runner: '{p.canonical}' has {value.size} values per batch of "
                                         f"{self.batch}, its TFLite tensor {list(p.shape)} holds {int(np.prod(p.shape))}")
                    value = value.reshape(p.shape)
                self.interpreter.set_tensor(p.tensor, np.ascontiguousarray(np.clip(value, -128, 127), np.int8))
            self.interpreter.invoke()
            for p in self.points:
                got = self.interpreter.get_tensor(p.output).astype(np.int32) - p.zero_point
                if p.layout == "nhwc":
                    got = got.transpose(NHWC_TO_NCHW)
                elif p.layout == "reshape":  # same order: one row per sample of the chunk
                    got = got.reshape(self.batch, -1)
                parts[p.canonical].append(got[:n])
        return {name: np.concatenate(values) for name, values in parts.items() if values}

    def close(self) -> None:
        self.interpreter = None
