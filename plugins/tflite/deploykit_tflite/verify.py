"""Read the converted flatbuffer back with the LiteRT interpreter and check that every int8
tensor carries the canonical scale and zero point, and that no op fell back to float.

Tensors are matched by name: TFLite names a tensor after the TF ops fused into its producer
("Relu_1;Conv2D_1"), and the lowering recorded which TF op (or fake-quant op) gives which
canonical tensor its parameters. A tensor the converter created itself (the output of a
reshape it inserted) must carry the same parameters as a neighbour it only moves data for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deploykit.backend import CheckResult, precision_audit
from deploykit_tflite.lowering import Lowered

COMPUTE_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"})
#: Ops whose int8 output has its input's parameters in TFLite (the kernels require it).
DATA_MOVEMENT_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "PAD", "PADV2", "MAX_POOL_2D",
                               "CONCATENATION", "SPLIT", "SPLIT_V", "STRIDED_SLICE", "SLICE", "GATHER",
                               "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "AVERAGE_POOL_2D", "MIRROR_PAD",
                               "MINIMUM", "MAXIMUM"})
#: Conversion plumbing at a float boundary, not float compute.
BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


def open_interpreter(model_content: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # without the default XNNPACK delegate the op list is the model's own, not delegate partitions
    it = Interpreter(model_content=model_content,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def _params(detail: dict) -> tuple[np.ndarray, np.ndarray, int]:
    q = detail["quantization_parameters"]
    return (np.asarray(q["scales"], np.float32), np.asarray(q["zero_points"], np.int64),
            int(q["quantized_dimension"]))


def verify(model_content: bytes, lowered: Lowered, allow_float_fallback: bool,
           patched: Any = None) -> tuple[list[CheckResult], dict[str, Any]]:
    """Read the flatbuffer back: scales and int8 weights against the canonical model, float ops,
    int8 share. ``patched`` (a patch.PatchReport) names the channels the patch could not keep."""
    not_kept = dict(patched.not_kept_channels) if patched is not None else {}
    it = open_interpreter(model_content)
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()  # the only API listing ops and their tensors
    producer: dict[int, dict] = {}
    consumers: dict[int, list[dict]] = {}
    for op in ops:
        for t in op["outputs"]:
            producer[int(t)] = op
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(op)
    graph_inputs = {int(d["index"]) for d in it.get_input_details()}
    constant = {i for i in details if i not in producer and i not in graph_inputs}

    mismatches: list[str] = []
    fixed: list[str] = []
    derived: list[str] = []
    propagated: list[str] = []
    counts = {"activations": 0, "weights": 0}
    tensor_map: dict[str, str] = {}  # canonical QuantizeLinear output -> TFLite tensor name
    unmatched: list[int] = []
    for index, d in sorted(details.items()):
        if d["dtype"] == np.float32 and index in constant:
            weight = next((lowered.weights[t] for t in d["name"].split(";") if t in lowered.weights), None)
            if weight is not None:  # a MatMul computing in float on the canonical int8 weights
                counts["float_weights"] = counts.get("float_weights", 0) + 1
                _check_float_weight(it, index, weight, mismatches)
            continue
        if d["dtype"] != np.int8:
            continue
        tokens = [t for t in d["name"].split(";") if t]
        scales, zps, qdim = _params(d)
        weight = next((lowered.weights[t] for t in tokens if t in lowered.weights), None)
        if weight is not None:
            counts["weights"] += 1
            _check_weight(it, index, d, weight, scales, zps, mismatches, not_kept.get(weight.tensor, []))
            continue
        if index in constant:
            continue  # a constant operand (e.g. of MUL by a scalar): quantized with its own range
        requantize = next((lowered.requantize_ops[t] for t in tokens if t in lowered.requantize_ops), None)
        if requantize is not None and scales.size == 1:
            counts["activations"] += 1
            if not any(np.float32(s.scale) == scales[0] and s.zero_point == int(zps[0]) for s in requantize):
                mismatches.append(f"tensor '{d['name']}' (requantize of '{requantize[1].tensor}'): scale "
                                  f"{scales[0]:.9g} is neither {requantize[0].scale:.9g} nor {requantize[1].scale:.9g}")
            continue
        spec = next((lowered.activations[t] for t in tokens if t in lowered.activations), None)
        if spec is None:
            unmatched.append(index)
            continue
        counts["activations"] += 1
        if spec.source == "canonical" and spec.tensor in lowered.q_outputs:
            tensor_map.setdefault(lowered.q_outputs[spec.tensor], d["name"])
        where = f"tensor '{d['name']}' ({spec.source} '{spec.tensor}')"
        if scales.size != 1:
            mismatches.append(f"{where}: per-channel parameters on an activation")
            continue
        if np.float32(spec.scale) != scales[0] or spec.zero_point != int(zps[0]):
            mismatches.append(f"{where}: scale {scales[0]:.9g} zero point {int(zps[0])}, "
                              f"expected {np.float32(spec.scale):.9g} / {spec.zero_point}")
        elif spec.source == "fixed":
            fixed.append(f"{spec.tensor}: scale {scales[0]:.6g}, zero point {int(zps[0])} (fixed by the TFLite spec)")
        elif spec.source == "derived":
            derived.append(f"{spec.tensor}: scale {scales[0]:.6g}")
    # a canonical tensor read only by float ops (a MatMul computing in float on the canonical int8
    # values) is carried by the int8 input of the DEQUANTIZE the lowering named after it
    for op in ops:
        if op["op_name"] != "DEQUANTIZE" or not len(op["inputs"]) or not len(op["outputs"]):
            continue
        src, out = details[int(op["inputs"][0])], details[int(op["outputs"][0])]
        spec = next((lowered.activations[t] for t in out["name"].split(";") if t in lowered.activations), None)
        if src["dtype"] == np.int8 and spec is not None and spec.source == "canonical" and spec.tensor in lowered.q_outputs:
            tensor_map.setdefault(lowered.q_outputs[spec.tensor], src["name"])
    for index in unmatched:
        d = details[index]
        neighbour = _same_params_neighbour(index, details, producer, consumers)
        if neighbour is None:
            scales, zps, _ = _params(d)
            mismatches.append(f"tensor '{d['name']}': scale {scales[:1].tolist()} zero point {zps[:1].tolist()} "
                              "has no canonical counterpart")
        else:
            propagated.append(f"{d['name']} (same as '{details[neighbour]['name']}')")

    compared = counts["activations"] + counts["weights"]
    status = "fail" if mismatches or compared == 0 else "pass"
    float_weights = counts.pop("float_weights", 0)
    msg = (f"{counts['activations']} activation and {counts['weights']} weight tensors compared, "
           f"{len(mismatches)} mismatches; {len(fixed)} fixed by the TFLite spec")
    if float_weights:
        msg += (f"; {float_weights} MatMul weights computing in float hold the canonical int8 values times "
                "their scales")
    if patched is not None and patched.not_kept:
        msg += (f"; {len(patched.not_kept)} dead channels in {len(patched.not_kept_channels)} weights not kept "
                "(bias beyond int32 at the canonical scale, see details.not_kept)")
    if mismatches:
        msg += ": " + "; ".join(mismatches[:3])
    scales_check = CheckResult("scales_match", status, float(len(mismatches)), message=msg, details={
        "compared": compared, **counts, "float_weights": float_weights, "mismatches": mismatches[:50], "fixed_by_tflite_spec": fixed,
        "not_kept": list(patched.not_kept) if patched is not None else [],
        "derived": derived, "propagated_by_converter": propagated})

    op_names = [op["op_name"] for op in ops]
    float_ops = []
    for op in ops:
        if op["op_name"] in BOUNDARY_OPS:
            continue
        tensors = [int(t) for t in list(op["inputs"]) + list(op["outputs"]) if int(t) >= 0 and int(t) not in constant]
        if any(details[t]["dtype"] == np.float32 for t in tensors):
            out = details[int(op["outputs"][0])]["name"] if len(op["outputs"]) else ""
            float_ops.append({"op": op["op_name"], "output": out})
    if float_ops and lowered.islands:
        full = CheckResult("full_integer", "info", float(len(float_ops)),
                           message=f"{len(float_ops)} ops run in float where the canonical model keeps float "
                                   "(LayerNorm, GELU, Softmax, residual adds, mask arithmetic): "
                                   + ", ".join(sorted({o['op'] for o in float_ops})),
                           details={"float_ops": float_ops})
    elif float_ops and lowered.float_layers:
        full = CheckResult("full_integer", "info", float(len(float_ops)),
                           message=f"{len(float_ops)} ops run in float: the canonical model declares "
                                   f"{len(lowered.float_layers)} float layers ({', '.join(lowered.float_layers[:6])})",
                           details={"float_ops": float_ops, "float_layers": lowered.float_layers})
    elif float_ops and not allow_float_fallback:
        full = CheckResult("full_integer", "fail", float(len(float_ops)),
                           message=f"{len(float_ops)} ops run in float: " + ", ".join(f"{o['op']} ({o['output']})" for o in float_ops[:6])
                           + "; allow_float_fallback is false", details={"float_ops": float_ops})
    else:
        full = CheckResult("full_integer", "pass" if not float_ops else "info", float(len(float_ops)),
                           message=(f"{len(float_ops)} ops run in float (allowed): " + ", ".join(o["op"] for o in float_ops)
                                    if float_ops else f"all {len(ops)} ops run in int8"),
                           details={"float_ops": float_ops})
    layers = []
    for op in ops:
        if op["op_name"] in COMPUTE_OPS:
            x = details[int(op["inputs"][0])]
            layers.append((x["name"], op["op_name"], "int8" if x["dtype"] == np.int8 else np.dtype(x["dtype"]).name))
    counts_by_op: dict[str, int] = {}
    for name in op_names:
        counts_by_op[name] = counts_by_op.get(name, 0) + 1
    metadata = {"ops": op_names, "op_counts": counts_by_op, "float_ops": float_ops,
                "fixed_by_tflite_spec": fixed, "tensor_map": tensor_map}
    return [scales_check, full, precision_audit(layers)], metadata


def _check_weight(it, index: int, d: dict, weight, scales: np.ndarray, zps: np.ndarray, mismatches: list[str],
                  not_kept: list[int]) -> None:
    where = f"weight '{weight.tensor}' of '{weight.node}'"
    keep = np.ones(weight.scales.shape, bool)
    keep[not_kept] = False  # named by the patch, with the reason, in details.not_kept
    if scales.shape != weight.scales.shape or not np.array_equal(scales[keep], weight.scales[keep]):
        diff = "sizes differ" if scales.shape != weight.scales.shape else \
            f"{int((scales[keep] != weight.scales[keep]).sum())} of {scales.size} per-channel scales differ"
        mismatches.append(f"{where}: {diff}")
    if np.any(zps != 0):
        mismatches.append(f"{where}: non-zero zero points")
    try:
        stored = it.get_tensor(index)
    except ValueError:
        return  # the runtime may not expose a constant buffer; scales were still compared
    # TFLite filters: CONV_2D [O, H, W, I], DEPTHWISE_CONV_2D [1, H, W, C*mult]; ours are [H, W, I, O]
    want = weight.values
    mask = np.broadcast_to(keep, want.shape)  # output channel last, like the values
    candidates = [(want.transpose(3, 0, 1, 2), mask.transpose(3, 0, 1, 2))]
    if want.size == stored.size:
        candidates.append((want.reshape(stored.shape), mask.reshape(stored.shape)))
    if not any(c.shape == stored.shape and np.array_equal(c[m], stored[m]) for c, m in candidates):
        mismatches.append(f"{where}: int8 values differ from the canonical ones")


def _check_float_weight(it, index: int, weight, mismatches: list[str]) -> None:
    """A float filter must hold the canonical int8 values times their scales (to float rounding)."""
    try:
        stored = it.get_tensor(index)
    except ValueError:
        return
    want = weight.values.astype(np.float32) * weight.scales
    candidates = [want.transpose(3, 0, 1, 2)]
    if want.size == stored.size:
        candidates.append(want.reshape(stored.shape))
    if not any(c.shape == stored.shape and np.allclose(c, stored, rtol=1e-6, atol=0) for c in candidates):
        mismatches.append(f"float weight '{weight.tensor}' of '{weight.node}': values are not the canonical int8 "
                          "weights times their scales")


def _same_params_neighbour(index: int, details: dict, producer: dict, consumers: dict) -> int | None:
    """A tensor the converter added: it must have the parameters of a data-movement neighbour."""
    mine = _params(details[index])[:2]
    near = []
    op = producer.get(index)
    if op is not None and op["op_name"] in DATA_MOVEMENT_OPS:
        near += [int(t) for t in op["inputs"] if int(t) >= 0]
    for op in consumers.get(index, []):
        if op["op_name"] in DATA_MOVEMENT_OPS:
            near += [int(t) for t in op["outputs"]]
    for n in near:
        other = _params(details[n])[:2]
        if details[n]["dtype"] == np.int8 and np.array_equal(mine[0], other[0]) and np.array_equal(mine[1], other[1]):
            return n
    return None
