"""Which layers of a canonical model saturate the int16 pair sums of x86 CPUs without VNNI,
measured on the calibration data.

Without VNNI, int8 convolution and GEMM kernels (OpenVINO's, via oneDNN) multiply u8 activations
by s8 weights with ``vpmaddubsw``: each pair of products of adjacent input channels (at one
kernel tap; adjacent K of a MatMul) is added into a *saturating* int16 (deploykit/cpu.py). The
u8 value is the canonical int8 activation shifted by 128 (the zero point's compensation is added
after the sums). A pair sum
outside [-32768, 32767] is clipped, so the layer's int32 accumulator is off by the clipped
amount. This module replays that arithmetic in NumPy on the canonical model's own int8
activations and weights and reports, per quantized dense Conv and MatMul / Gemm with an int8
weight, the error the clipping adds to the layer's output relative to that output (L2 over the
samples).

The record travels in the canonical model's metadata (``deploykit.int16_saturation``), so a
lowering that can split a layer's weights into halves that cannot saturate (OpenVINO's
``overflow_fix = "saturating"``) splits only the ones that need it: splitting costs that layer
twice its int8 compute. Measured (docs/performance.md): EfficientNet-Lite0, 16 of its 33 dense
convolutions above 1%, and splitting those gives OpenVINO the top-1 agreement of splitting all
33; all-MiniLM-L6-v2, most of its K=384 projections at 1-3%, and splitting every weighted MatMul
took OpenVINO's embedding cosine with FP32 from 0.9953 to the canonical model's 0.9971.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from deploykit.canonical import QdqGraph, attrs, set_metadata
from deploykit.data import DataSource
from deploykit.ortsession import exposing

#: metadata key: JSON {"profile": activation profile, "samples": n, "relative_error": {layer: error}}
META_SATURATION = "deploykit.int16_saturation"
#: calibration samples the replay runs on (its cost is about one int8 pass in NumPy per sample)
SAMPLES = 16
INT16_MIN, INT16_MAX = -32768, 32767
PAIRED_OPS = ("Conv", "MatMul", "Gemm")
_ROWS = 4096  # activation rows per chunk of the replay (bounds its memory)


def paired_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(layer, the DequantizeLinear feeding its activation) of every layer whose int8 kernels
    add pairs of products: quantized Convs that are not depthwise (group 1), and MatMul / Gemm
    with an int8 weight as their second input (oneDNN's int8 GEMM pairs adjacent K)."""
    g = QdqGraph(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in PAIRED_OPS or len(node.input) < 2 or attrs(node).get("group", 1) != 1:
            continue
        if node.op_type == "Gemm" and attrs(node).get("transA", 0):
            continue
        dq = g.dq_feeding(node.input[0])
        if g.weight(node.input[1]) is not None and dq is not None and not g.is_weight_dq(dq):
            out.append((node, dq))
    return out


class _Tally:  # sums of squares: saturation error, layer output
    def __init__(self) -> None:
        self.error2 = 0.0
        self.exact2 = 0.0

    @property
    def relative(self) -> float:
        return float(np.sqrt(self.error2 / self.exact2)) if self.exact2 > 0 else 0.0


def _pair_error(x: np.ndarray, w: np.ndarray, top: np.ndarray) -> np.ndarray | None:
    """Accumulator error [rows, O] of ``x`` [rows, K] (u8 values) times ``w`` [K, O] (int8) when
    each pair of adjacent K is summed into a saturating int16 (K even); None when no pair can
    reach the int16 limits given ``top`` [K], the largest u8 of each K. Only the (pair, output)
    combinations that can reach them are summed."""
    k = w.reshape(-1, 2, w.shape[1])  # [pair, 2, O]
    hi = top.reshape(-1, 2, 1)
    reach = ((hi * np.maximum(k, 0)).sum(axis=1) > INT16_MAX) | ((hi * np.minimum(k, 0)).sum(axis=1) < INT16_MIN)
    out, pair = np.nonzero(reach.T)  # sorted by output
    if not len(pair):
        return None
    outs, starts = np.unique(out, return_index=True)
    ka, kb = k[pair, 0, out][:, None], k[pair, 1, out][:, None]
    error = np.zeros((x.shape[0], w.shape[1]), np.int64)
    for r in range(0, x.shape[0], _ROWS):
        xt = x[r:r + _ROWS].T.reshape(-1, 2, min(_ROWS, x.shape[0] - r))  # [pair, 2, rows]
        sums = ka * xt[pair, 0] + kb * xt[pair, 1]  # [M, rows]: the int16 pair sums
        clipped = np.clip(sums, INT16_MIN, INT16_MAX) - sums
        error[r:r + _ROWS, outs] = np.add.reduceat(clipped, starts, axis=0).T
    return error


def matmul_pair_error(u8: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The int32 accumulator error [rows, N] int16 pair-sum clipping causes in a MatMul of
    ``u8`` [rows, K] by the int8 weight ``w`` [K, N]; an odd K pads a zero weight."""
    odd = w.shape[0] % 2
    x = np.pad(u8.astype(np.int32), ((0, 0), (0, odd)))
    wt = np.pad(w.astype(np.int32), ((0, odd), (0, 0)))
    error = _pair_error(x, wt, x.max(axis=0))
    return np.zeros((u8.shape[0], w.shape[1]), np.int64) if error is None else error


def pair_sum_error(u8: np.ndarray, zero: int, w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The int32 accumulator error [N, O, H', W'] int16 pair-sum clipping causes in one Conv:
    ``u8`` [N, C, H, W] activations as the kernel sees them (zero point ``zero``, which is also
    the padding), ``w`` [O, C, kh, kw] int8 weights. Pairs are adjacent input channels at one
    tap (oneDNN's blocked int8 layouts); an odd channel count pads a zero weight."""
    a = attrs(node)
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    n, c, h, wd = u8.shape
    o, _, kh, kw = w.shape
    odd = c % 2
    x = np.pad(u8.astype(np.int32), ((0, 0), (0, odd), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zero)
    wt = np.pad(w.astype(np.int32), ((0, 0), (0, odd), (0, 0), (0, 0)))
    ho = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    top = x.max(axis=(0, 2, 3))
    error = np.zeros((n * ho * wo, o), np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            rows = tap.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])  # [N*H'*W', C]
            part = _pair_error(rows, wt[:, :, i, j].T, top)
            if part is not None:
                error += part
    return error.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def measure(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]], samples: int = SAMPLES) -> dict[str, float]:
    """Relative error int16 pair-sum saturation adds to the output of each paired layer (dense
    Conv, MatMul / Gemm with an int8 weight): ``||error|| / ||output||``, the output as the
    canonical model computes it, over the first ``samples`` samples of ``batches`` (model input
    feeds), the activations quantized exactly as the canonical model quantizes them."""
    layers = paired_layers(model)
    if not layers:
        return {}
    g = QdqGraph(model)
    fixed = []  # per layer, what no batch changes: the activation's u8 view and grid, the int8 weight, one step
    for node, dq in layers:
        p = g.params(dq)
        shift = 128 if p.dtype == onnx.TensorProto.INT8 else 0  # the kernel's u8 view of the activation
        zero = int(np.asarray(p.zero_point).reshape(-1)[0]) + shift
        scale = float(np.asarray(p.scale).reshape(-1)[0])
        weight = g.weight(node.input[1])
        assert weight is not None
        q, wp = weight
        if node.op_type == "Conv":
            steps = scale * np.broadcast_to(wp.scale.reshape(-1), (q.shape[0],))  # one accumulator step, per output
        else:  # MatMul [.., K] x [K, N]; Gemm with transB: [N, K]
            q = q.T if node.op_type == "Gemm" and attrs(node).get("transB", 0) else q
            steps = scale * np.broadcast_to(wp.scale.reshape(-1), (q.shape[1],))
        fixed.append((node, dq, zero, scale, q, steps))
    session = exposing(model, [t for node, dq in layers for t in (dq.output[0], node.output[0])])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    tallies = {node.name: _Tally() for node, _ in layers}
    seen = 0
    for feeds in batches:
        if seen >= samples:
            break
        take = min(samples - seen, len(next(iter(feeds.values()))))
        got = dict(zip(outputs, session.run(None, {k: v[:take] for k, v in feeds.items() if k in inputs})))
        seen += take
        for node, dq, zero, scale, q, steps in fixed:
            u8 = np.round(got[dq.output[0]] / scale).astype(np.int32) + zero
            if node.op_type == "Conv":
                error = pair_sum_error(u8, zero, q, node) * steps[None, :, None, None]
            else:
                error = matmul_pair_error(u8.reshape(-1, q.shape[0]), q) * steps[None, :]
            tallies[node.name].error2 += float((error ** 2).sum())
            tallies[node.name].exact2 += float((got[node.output[0]].astype(np.float64) ** 2).sum())
    return {name: t.relative for name, t in tallies.items()}


def measure_and_record(model: onnx.ModelProto, calib: DataSource, batch_size: int, profile: str) -> dict[str, Any]:
    """:func:`measure` on the first :data:`SAMPLES` samples of ``calib`` (its feeds for the
    model's inputs), written into ``model``'s metadata by :func:`record` (in place). Returns the
    record ({"profile", "samples", "relative_error"}), empty when the model has no layer to measure."""
    if not paired_layers(model):
        return {}
    inputs = {i.name for i in model.graph.input}
    seen = 0

    def batches() -> Iterator[dict[str, np.ndarray]]:
        nonlocal seen
        for batch in calib.batches(batch_size):
            if seen >= SAMPLES:
                return
            feeds = {k: v for k, v in batch.feeds.items() if k in inputs}
            seen += min(SAMPLES - seen, len(next(iter(feeds.values()))))
            yield feeds

    errors = measure(model, batches())
    record(model, errors, profile, seen)
    return {"profile": profile, "samples": seen, "relative_error": errors}


def record(model: onnx.ModelProto, errors: Mapping[str, float], profile: str, samples: int) -> None:
    """Write ``errors`` into ``model``'s metadata (in place)."""
    value = json.dumps({"profile": profile, "samples": samples,
                        "relative_error": {k: round(v, 6) for k, v in errors.items()}})
    set_metadata(model, META_SATURATION, value)


def recorded(model: onnx.ModelProto) -> dict[str, float] | None:
    """The per-layer relative saturation error the model carries, or None when it carries none."""
    meta = {p.key: p.value for p in model.metadata_props}
    if META_SATURATION not in meta:
        return None
    try:
        value = json.loads(meta[META_SATURATION])["relative_error"]
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
