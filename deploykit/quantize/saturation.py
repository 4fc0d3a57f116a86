"""Which convolutions of a canonical model saturate the int16 pair sums of x86 CPUs without
VNNI, measured on the calibration data.

Without VNNI, int8 convolution kernels (OpenVINO's, via oneDNN) multiply u8 activations by s8
weights with ``vpmaddubsw``: each pair of products of adjacent input channels, at one kernel
tap, is added into a *saturating* int16 (deploykit/cpu.py). The u8 value is the canonical
int8 activation shifted by 128 (zero point compensation is added after the sum). A pair sum
outside [-32768, 32767] is clipped, so the layer's int32 accumulator is off by the clipped
amount. This module replays that arithmetic in NumPy on the canonical model's own int8
activations and weights and reports, per quantized dense Conv, the relative L2 error the
clipping adds to its accumulators: ``||clipped - exact|| / ||exact||`` over the samples.

The record travels in the canonical model's metadata (``deploykit.int16_saturation``), so a
lowering that can split a convolution's weights into halves that cannot saturate (OpenVINO's
``overflow_fix = "saturating"``) splits only the ones that need it: splitting costs that layer
twice its int8 compute. Measured on EfficientNet-Lite0 (docs/performance.md): 13 of its 33
dense convolutions above 2% relative error; splitting those took OpenVINO's top-1 agreement with
FP32 to the level of splitting all 33.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from deploykit.canonical import QdqGraph, attrs
from deploykit.ortsession import exposing

#: metadata key: JSON {"profile": activation profile, "samples": n, "relative_error": {conv: error}}
META_SATURATION = "deploykit.int16_saturation"
#: calibration samples the replay runs on (its cost is about one int8 pass in NumPy per sample)
SAMPLES = 16
INT16_MIN, INT16_MAX = -32768, 32767


def dense_convs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(Conv, the DequantizeLinear feeding its activation) of every quantized Conv that is not
    depthwise (group 1): the convolutions whose kernels add pairs of input channels."""
    g = QdqGraph(model)
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or attrs(node).get("group", 1) != 1:
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


def pair_sum_error(u8: np.ndarray, zero: int, w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The int32 accumulator error [N, O, H', W'] int16 pair-sum clipping causes in one Conv:
    ``u8`` [N, C, H, W] activations as the kernel sees them (zero point ``zero``, which is also
    the padding), ``w`` [O, C, kh, kw] int8 weights. Pairs are adjacent input channels at one
    tap (oneDNN's blocked int8 layouts); an odd channel count pads a zero weight. Only the
    (pair, output channel) combinations that can reach the int16 limits with the batch's
    per-channel activation maxima are summed."""
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
    top = x.max(axis=(0, 2, 3)).reshape(-1, 2)  # [pair, 2]: the largest u8 of each channel
    error = np.zeros((n, o, ho * wo), np.int64)
    for i in range(kh):
        for j in range(kw):
            k = wt[:, :, i, j].T.reshape(-1, 2, o)  # [pair, 2, O]
            reach_hi = (top[:, :, None] * np.maximum(k, 0)).sum(axis=1) > INT16_MAX
            reach_lo = (top[:, :, None] * np.minimum(k, 0)).sum(axis=1) < INT16_MIN
            out, pair = np.nonzero((reach_hi | reach_lo).T)  # sorted by output channel
            if not len(pair):
                continue
            outs, starts = np.unique(out, return_index=True)
            tap = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            tap = tap.reshape(n, -1, 2, ho * wo)
            ka, kb = k[pair, 0, out][:, None], k[pair, 1, out][:, None]
            for b in range(n):
                sums = ka * tap[b, pair, 0] + kb * tap[b, pair, 1]  # [M, HW]: the int16 pair sums
                clipped = np.clip(sums, INT16_MIN, INT16_MAX) - sums
                error[b, outs] += np.add.reduceat(clipped, starts, axis=0)
    return error.reshape(n, o, ho, wo)


def measure(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]], samples: int = SAMPLES) -> dict[str, float]:
    """Relative error int16 pair-sum saturation adds to each quantized dense Conv's output
    (``||error|| / ||output||``, the output as the canonical model computes it) over the first
    ``samples`` samples of ``batches`` (model input feeds), its activations quantized exactly as
    the canonical model quantizes them."""
    convs = dense_convs(model)
    if not convs:
        return {}
    g = QdqGraph(model)
    session = exposing(model, [t for node, dq in convs for t in (dq.output[0], node.output[0])])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    tallies = {node.name: _Tally() for node, _ in convs}
    seen = 0
    for feeds in batches:
        if seen >= samples:
            break
        take = min(samples - seen, len(next(iter(feeds.values()))))
        got = dict(zip(outputs, session.run(None, {k: v[:take] for k, v in feeds.items() if k in inputs})))
        seen += take
        for node, dq in convs:
            p = g.params(dq)
            shift = 128 if p.dtype == onnx.TensorProto.INT8 else 0  # the kernel's u8 view of the activation
            zero = int(np.asarray(p.zero_point).reshape(-1)[0]) + shift
            scale = float(np.asarray(p.scale).reshape(-1)[0])
            weight = g.weight(node.input[1])
            assert weight is not None
            q, wp = weight
            u8 = np.round(got[dq.output[0]] / scale).astype(np.int32) + zero
            steps = scale * np.broadcast_to(wp.scale.reshape(-1), (q.shape[0],))  # float value of one accumulator step
            error = pair_sum_error(u8, zero, q, node) * steps[None, :, None, None]
            tallies[node.name].error2 += float((error ** 2).sum())
            tallies[node.name].exact2 += float((got[node.output[0]].astype(np.float64) ** 2).sum())
    return {name: t.relative for name, t in tallies.items()}


def record(model: onnx.ModelProto, errors: Mapping[str, float], profile: str, samples: int) -> None:
    """Write ``errors`` into ``model``'s metadata (in place)."""
    value = json.dumps({"profile": profile, "samples": samples,
                        "relative_error": {k: round(v, 6) for k, v in errors.items()}})
    for p in model.metadata_props:
        if p.key == META_SATURATION:
            p.value = value
            return
    model.metadata_props.add(key=META_SATURATION, value=value)


def recorded(model: onnx.ModelProto) -> dict[str, float] | None:
    """The per-Conv relative saturation error the model carries, or None when it carries none."""
    meta = {p.key: p.value for p in model.metadata_props}
    if META_SATURATION not in meta:
        return None
    try:
        value = json.loads(meta[META_SATURATION])["relative_error"]
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
