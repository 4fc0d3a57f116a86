"""Write the canonical parameters back into the converted flatbuffer, and check that nothing
else changed.

The converter keeps fake-quant ranges as scales, but not everywhere (measured on
EfficientNet-Lite0, 48 of 111 tensors differed before this step):

- per-channel weight scales: a channel whose range is tiny or zero is widened and its int8
  values re-derived; the canonical int8 weights, per-channel scales and int32 biases are
  written back instead. A dead channel whose float bias does not fit TFLite's int32 accumulator
  at the canonical scale (``bias / (input scale * weight scale)`` plus the largest sum of
  products beyond 2**31 - 1) takes the weight scale that puts its bias at ``BIAS_LIMIT``
  (2**30), half the int32 range, leaving the other half to the products: a bias at the very
  edge of int32 wraps around once the kernel adds them (measured on EfficientNet-Lite0's stem:
  dead channels read 125 instead of 0). Those channels are named in ``not_kept`` with the reason.
- activation scales: the converter derives a tensor's scale from its fake-quant range,
  ``(max - min) / 255``; with a non-zero zero point (asymmetric activations) that sum of two
  float32 roundings can land one float32 step away from the canonical scale. Such scales (same
  zero point, relative difference below 1e-6) are written back, on every tensor carrying the
  converter's value, before the biases are computed from them.
- a float op whose TFLite int8 kernel has fixed output parameters (SOFTMAX: 1/256) and whose
  output the canonical model quantizes: the converter quantizes to the fixed scale, then
  requantizes to the canonical one (two roundings, up to several steps off). The two QUANTIZE
  ops become one that rounds once, as the canonical model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INT32_MAX = 2 ** 31 - 1
#: A rewritten dead channel's int32 bias is at most this: the rest of the int32 range holds the
#: sum of products (at most 255 * 127 per input, so up to 33,000 inputs per output).
BIAS_LIMIT = 2 ** 30
#: ops whose input 1 is a per-channel int8 filter and input 2 an int32 bias
FILTER_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}


@dataclass
class PatchReport:
    weights_rewritten: list[str] = field(default_factory=list)  # weights whose scales or values differed
    channels_rewritten: int = 0
    not_kept: list[str] = field(default_factory=list)  # "weight channel c: reason"
    not_kept_channels: dict[str, list[int]] = field(default_factory=dict)  # canonical weight -> channels
    requantize_merged: list[str] = field(default_factory=list)  # QUANTIZE pairs made one rounding
    activation_scales_restored: list[str] = field(default_factory=list)  # converter rounding undone
    unchanged_checked: int = 0  # tensors compared before/after and found identical

    def as_dict(self) -> dict[str, Any]:
        return {"weights_rewritten": self.weights_rewritten, "channels_rewritten": self.channels_rewritten,
                "not_kept": self.not_kept, "requantize_merged": self.requantize_merged,
                "activation_scales_restored": self.activation_scales_restored,
                "unchanged_checked": self.unchanged_checked}


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def _name(t: Any) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else str(t.name)


def _op_names(model: Any, schema: Any) -> list[str]:
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for code in model.operatorCodes:
        c = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        out.append(builtin.get(c, str(c)))
    return out


def patch(model_content: bytes, lowered: Any) -> tuple[bytes, PatchReport]:
    """The flatbuffer with canonical weights/biases and single-rounding requantizes, and a report."""
    schema, fb = _schema()
    model = fb.read_model_from_bytearray(bytearray(model_content))
    report = PatchReport()
    names = _op_names(model, schema)
    sg = model.subgraphs[0]
    touched: set[int] = set()
    buffer_users: dict[int, int] = {}
    for t in sg.tensors:
        buffer_users[t.buffer] = buffer_users.get(t.buffer, 0) + 1

    _restore_activation_scales(sg, schema, lowered, report, touched)
    for op in sg.operators:
        kind = names[op.opcodeIndex]
        if kind not in FILTER_OPS or len(op.inputs) < 2:
            continue
        x, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
        if w.type != schema.TensorType.INT8 or x.type != schema.TensorType.INT8:
            continue
        spec = next((lowered.weights[tok] for tok in _name(w).split(";") if tok in lowered.weights), None)
        if spec is None:
            continue
        _rewrite_filter(model, sg, op, kind, spec, schema, report, touched, buffer_users)

    _merge_requantize(sg, names, lowered, report, touched)
    out = fb.convert_object_to_bytearray(model)
    report.unchanged_checked = _check_unchanged(model_content, out, touched, fb)
    return out, report


#: a stored activation scale this close to the canonical one is the converter's float rounding
SCALE_ROUNDING = 1e-6


def _restore_activation_scales(sg: Any, schema: Any, lowered: Any, report: PatchReport, touched: set[int]) -> None:
    """Undo the converter's one-step float rounding of activation scales (see the module doc)."""
    fixes: dict[tuple[float, int], float] = {}  # the converter's (scale, zero point) -> the canonical scale
    for t in sg.tensors:
        q = t.quantization
        if t.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            continue
        spec = next((lowered.activations[tok] for tok in _name(t).split(";") if tok in lowered.activations), None)
        if spec is None or spec.source == "fixed":
            continue
        stored, want = np.float32(q.scale[0]), np.float32(spec.scale)
        if stored != want and int(q.zeroPoint[0]) == spec.zero_point and abs(stored - want) <= SCALE_ROUNDING * want:
            fixes[(float(stored), spec.zero_point)] = float(want)
    for i, t in enumerate(sg.tensors):
        q = t.quantization
        if t.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            continue
        want_scale = fixes.get((float(np.float32(q.scale[0])), int(q.zeroPoint[0])))
        if want_scale is not None:
            q.scale = [want_scale]
            touched.add(i)
            report.activation_scales_restored.append(_name(t))


def _set_buffer(model: Any, t: Any, values: np.ndarray, buffer_users: dict[int, int]) -> None:
    from tensorflow.lite.python import schema_py_generated as schema

    data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    if buffer_users.get(t.buffer, 0) > 1:  # shared (deduplicated) buffer: give this tensor its own
        buf = schema.BufferT()
        model.buffers.append(buf)
        buffer_users[t.buffer] -= 1
        t.buffer = len(model.buffers) - 1
        buffer_users[t.buffer] = 1
    model.buffers[t.buffer].data = data


def _rewrite_filter(model: Any, sg: Any, op: Any, kind: str, spec: Any, schema: Any, report: PatchReport,
                    touched: set[int], buffer_users: dict[int, int]) -> None:
    x, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
    shape = [int(d) for d in w.shape]
    want = spec.values  # [H, W, I, O] (conv) / [kH, kW, 1, C*mult] (depthwise) / [1, 1, K, N] (dense)
    if kind == "DEPTHWISE_CONV_2D":
        values = want.reshape(shape)
    else:
        values = want.transpose(3, 0, 1, 2).reshape(shape)
    axis = FILTER_OPS[kind]
    scales = spec.scales.astype(np.float32).copy()
    stored = np.frombuffer(bytes(model.buffers[w.buffer].data), np.int8).reshape(shape) \
        if model.buffers[w.buffer].data is not None else None
    old_scales = np.asarray(w.quantization.scale, np.float32)
    s_in = float(np.asarray(x.quantization.scale, np.float32)[0])
    zp_in = int(np.asarray(x.quantization.zeroPoint if x.quantization.zeroPoint is not None else [0])[0])
    bias_t = sg.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    bias = spec.bias
    if bias is None and bias_t is not None and bias_t.type == schema.TensorType.INT32:
        old = np.frombuffer(bytes(model.buffers[bias_t.buffer].data), np.int32).astype(np.float64)
        bias = old * np.asarray(bias_t.quantization.scale, np.float64)  # the converter's float bias
    values = values.astype(np.int8)
    if bias is not None:
        bias = np.asarray(bias, np.float64).reshape(-1)
        bias_steps = np.abs(bias) / (s_in * scales.astype(np.float64))
        reduce = tuple(a for a in range(values.ndim) if a != axis)
        products = (128 + abs(zp_in)) * np.abs(values.astype(np.int64)).sum(axis=reduce)  # |x - zp| <= 128 + |zp|
        for c in np.nonzero(bias_steps + products > INT32_MAX)[0]:
            # dead channel: bias and products overflow int32 at the canonical scale
            new = np.float32(abs(bias[c]) / (s_in * BIAS_LIMIT))
            ch = tuple(int(c) if a == axis else slice(None) for a in range(values.ndim))
            w_float = values[ch].astype(np.float64) * scales[c]
            values[ch] = np.clip(np.round(w_float / new), -127, 127).astype(np.int8)
            report.not_kept.append(f"{spec.tensor} channel {c}: bias {bias[c]:.4g} overflows the int32 accumulator "
                                   f"at input scale {s_in:.4g} x weight scale {scales[c]:.4g}; weight scale "
                                   f"{new:.4g} instead")
            scales[c] = new
            report.not_kept_channels.setdefault(spec.tensor, []).append(int(c))
    changed = stored is None or not np.array_equal(stored, values) or old_scales.shape != scales.shape \
        or not np.array_equal(old_scales, scales)
    if changed:
        n = int(np.sum(old_scales != scales)) if old_scales.shape == scales.shape else scales.size
        report.channels_rewritten += n
        report.weights_rewritten.append(spec.tensor)
        _set_buffer(model, w, values, buffer_users)
        w.quantization.scale = scales.tolist()
        w.quantization.zeroPoint = [0] * scales.size
        w.quantization.quantizedDimension = axis
        touched.add(op.inputs[1])
    if bias_t is not None and bias_t.type == schema.TensorType.INT32 and bias is not None:
        bias_scales = (np.float64(s_in) * scales.astype(np.float64))
        q = np.round(bias / bias_scales).astype(np.int64)
        old_q = np.frombuffer(bytes(model.buffers[bias_t.buffer].data), np.int32)
        if changed or not np.array_equal(old_q.astype(np.int64), q):
            _set_buffer(model, bias_t, q.astype(np.int32), buffer_users)
            bias_t.quantization.scale = bias_scales.astype(np.float32).tolist()
            bias_t.quantization.zeroPoint = [0] * scales.size
            touched.add(op.inputs[2])


def _merge_requantize(sg: Any, names: list[str], lowered: Any, report: PatchReport, touched: set[int]) -> None:
    """QUANTIZE(float -> fixed scale) -> QUANTIZE(-> canonical scale): one QUANTIZE from float."""
    producer = {o: op for op in sg.operators for o in op.outputs}
    readers: dict[int, int] = {}
    for op in sg.operators:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    outputs = set(sg.outputs)
    remove = []
    for op in sg.operators:
        if names[op.opcodeIndex] != "QUANTIZE":
            continue
        mid = op.inputs[0]
        first = producer.get(mid)
        if first is None or names[first.opcodeIndex] != "QUANTIZE" or readers.get(mid) != 1 or mid in outputs:
            continue
        src = sg.tensors[first.inputs[0]]
        if src.type != 0:  # FLOAT32
            continue
        op.inputs[0] = first.inputs[0]
        remove.append(first)
        touched.add(mid)
        report.requantize_merged.append(_name(sg.tensors[op.outputs[0]]))
    sg.operators = [op for op in sg.operators if not any(op is r for r in remove)]


def _check_unchanged(before: bytes, after: bytes, touched: set[int], fb: Any) -> int:
    """Every tensor not rewritten keeps its type, shape, parameters and data."""
    from deploykit.errors import LoweringError

    a_model = fb.read_model_from_bytearray(bytearray(before))
    b_model = fb.read_model_from_bytearray(bytearray(after))
    a, b = a_model.subgraphs[0], b_model.subgraphs[0]
    if len(a.tensors) != len(b.tensors):
        raise LoweringError(f"patching the flatbuffer changed the tensor count ({len(a.tensors)} -> {len(b.tensors)})")
    checked = 0
    for i, (ta, tb) in enumerate(zip(a.tensors, b.tensors)):
        if i in touched:
            continue
        qa, qb = ta.quantization, tb.quantization
        same = (ta.type == tb.type and list(ta.shape) == list(tb.shape)
                and (qa is None) == (qb is None)
                and (qa is None or (list(np.asarray(qa.scale if qa.scale is not None else []))
                                    == list(np.asarray(qb.scale if qb.scale is not None else []))))
                and bytes(a_model.buffers[ta.buffer].data if a_model.buffers[ta.buffer].data is not None else b"")
                == bytes(b_model.buffers[tb.buffer].data if b_model.buffers[tb.buffer].data is not None else b""))
        if not same:
            raise LoweringError(f"patching the flatbuffer changed tensor {i} '{_name(tb)}' it was not meant to touch")
        checked += 1
    return checked
