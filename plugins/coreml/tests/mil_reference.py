"""A small numpy/torch evaluator of the MIL ops the lowering produces, for tests on Linux.

There is no Core ML runtime on Linux, so the meaning of the lowered program (pad order, Gemm,
slices, the attention mask) is checked by evaluating the converted program (after coremltools'
passes, i.e. what the package stores) op by op and comparing with onnxruntime on the canonical
model. It is a test oracle, not a runtime: unknown ops raise.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def _torch():
    import torch

    return torch


def _val(env, var):
    if isinstance(var, (list, tuple)):
        return [_val(env, v) for v in var]
    if var.name in env:
        return env[var.name]
    if var.val is not None:
        return np.asarray(var.val)
    raise KeyError(f"no value for {var.name}")


def _pad_nchw(x, op, kernel, strides, dilations):
    pad_type = str(op["pad_type"]) if "pad_type" in op else "valid"
    spatial = x.ndim - 2
    if pad_type == "custom":
        pad = [int(p) for p in op["pad"]]
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(spatial)]
    elif pad_type == "valid":
        pairs = [(0, 0)] * spatial
    else:  # same / same_lower
        pairs = []
        for i in range(spatial):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if pad_type == "same" else (big, small))
    flat = [p for pair in reversed(pairs) for p in pair]
    return flat


def _quant_shape(scale, x, axis):
    scale = np.asarray(scale, np.float32)
    if scale.ndim == 0 or axis is None:
        return scale
    shape = [1] * x.ndim
    shape[int(axis)] = -1
    return scale.reshape(shape)


def run_program(program, feeds: Mapping[str, np.ndarray], trace: dict | None = None,
                substitute: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The program's outputs; ``trace``, when given, receives every op's output by MIL name.

    ``substitute`` (MIL name -> value): after computing such an op, record its own result in
    ``trace`` but feed the given value to the ops after it: each layer then runs on the reference's
    inputs, so differences do not compound (a layer-by-layer comparison)."""
    computed: dict[str, np.ndarray] = {}
    torch = _torch()
    F = torch.nn.functional
    fn = program.functions["main"]
    env: dict[str, np.ndarray] = trace if trace is not None else {}
    env.update({name: np.asarray(v) for name, v in feeds.items()})
    for op in fn.operations:
        t = op.op_type
        if t == "const":
            env[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            continue
        a = {k: _val(env, v) for k, v in op.inputs.items()}
        x = a.get("x")
        if t == "quantize":
            s = _quant_shape(a["scale"], a["input"], a.get("axis"))
            zp = _quant_shape(a.get("zero_point", 0), a["input"], a.get("axis")).astype(np.float32)
            lo, hi = (-128, 127) if str(a["output_dtype"]) == "int8" else (0, 255)
            out = np.clip(np.round(a["input"].astype(np.float32) / s) + zp, lo, hi)
            out = out.astype(np.int8 if lo < 0 else np.uint8)
        elif t == "dequantize":
            s = _quant_shape(a["scale"], a["input"], a.get("axis"))
            zp = _quant_shape(a.get("zero_point", 0), a["input"], a.get("axis")).astype(np.float32)
            out = ((a["input"].astype(np.float32) - zp) * s).astype(s.dtype)
        elif t == "constexpr_affine_dequantize":
            q = a["quantized_data"]
            s = _quant_shape(a["scale"], q, a["axis"])
            zp = _quant_shape(a["zero_point"], q, a["axis"]).astype(np.float32)
            out = ((q.astype(np.float32) - zp) * s).astype(s.dtype)
        elif t == "constexpr_blockwise_shift_scale":
            d, s = a["data"], a["scale"]
            off = a.get("offset", np.zeros_like(s))
            reps = [d.shape[i] // s.shape[i] for i in range(d.ndim)]
            s_full = s
            off_full = off
            for i, r in enumerate(reps):
                s_full = np.repeat(s_full, r, axis=i)
                off_full = np.repeat(off_full, r, axis=i)
            out = ((d.astype(np.float32) - off_full.astype(np.float32)) * s_full).astype(s.dtype)
        elif t in ("conv", "conv_transpose"):
            w = torch.from_numpy(np.asarray(a["weight"], np.float32))
            xt = torch.from_numpy(np.asarray(x, np.float32))
            strides = [int(v) for v in a.get("strides", [1] * (xt.ndim - 2))]
            dil = [int(v) for v in a.get("dilations", [1] * (xt.ndim - 2))]
            groups = int(a.get("groups", 1))
            bias = torch.from_numpy(np.asarray(a["bias"], np.float32)) if "bias" in a else None
            if t == "conv":
                pad = _pad_nchw(x, a, list(w.shape[2:]), strides, dil)
                xt = F.pad(xt, pad)
                out = (F.conv2d if xt.ndim == 4 else F.conv1d)(xt, w, bias, strides, 0, dil, groups).numpy()
            else:
                pad = [int(p) for p in a["pad"]] if str(a.get("pad_type", "valid")) == "custom" else [0, 0, 0, 0]
                out = F.conv_transpose2d(xt, w, bias, strides, (pad[0], pad[2]), 0, groups, dil).numpy()
        elif t == "linear":
            out = x @ np.asarray(a["weight"]).T + (a["bias"] if "bias" in a else 0)
        elif t == "matmul":
            xx, yy = a["x"], a["y"]
            if bool(a.get("transpose_x", False)):
                xx = np.swapaxes(xx, -1, -2)
            if bool(a.get("transpose_y", False)):
                yy = np.swapaxes(yy, -1, -2)
            out = np.matmul(xx, yy)
        elif t in _ELEMENTWISE:
            out = _ELEMENTWISE[t](a)
        elif t in ("reduce_mean", "reduce_max", "reduce_sum", "reduce_prod"):
            f = {"reduce_mean": np.mean, "reduce_max": np.max, "reduce_sum": np.sum, "reduce_prod": np.prod}[t]
            axes = tuple(int(v) for v in a["axes"]) if "axes" in a else None
            out = f(x, axis=axes, keepdims=bool(a.get("keep_dims", False)))
        elif t in ("max_pool", "avg_pool"):
            k = [int(v) for v in a["kernel_sizes"]]
            strides = [int(v) for v in a["strides"]]
            pad = _pad_nchw(x, a, k, strides, [1] * len(k))
            xt = torch.from_numpy(np.asarray(x, np.float32))
            if t == "max_pool":
                xt = F.pad(xt, pad, value=-np.inf)
                out = F.max_pool2d(xt, k, strides, 0, ceil_mode=bool(a.get("ceil_mode", False))).numpy()
            else:
                exclude = bool(a.get("exclude_padding_from_average", False))
                if exclude and any(pad):
                    ones = F.pad(torch.ones_like(xt), pad)
                    xt = F.pad(xt, pad)
                    out = (F.avg_pool2d(xt, k, strides) / F.avg_pool2d(ones, k, strides)).numpy()
                else:
                    out = F.avg_pool2d(F.pad(xt, pad), k, strides, ceil_mode=bool(a.get("ceil_mode", False))).numpy()
        elif t == "concat":
            out = np.concatenate(a["values"], axis=int(a["axis"]))
        elif t == "reshape":
            out = np.reshape(x, [int(v) for v in a["shape"]])
        elif t == "transpose":
            out = np.transpose(x, [int(v) for v in a["perm"]])
        elif t == "squeeze":
            out = np.squeeze(x, axis=tuple(int(v) for v in a["axes"])) if "axes" in a else np.squeeze(x)
        elif t == "expand_dims":
            out = np.expand_dims(x, tuple(int(v) for v in a["axes"]))
        elif t == "cast":
            out = x.astype({"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "int16": np.int16,
                            "uint16": np.uint16, "bool": bool, "int8": np.int8}[str(a["dtype"])])
        elif t == "gather":
            out = np.take(x, a["indices"].astype(np.int64), axis=int(a.get("axis", 0)))
        elif t == "slice_by_index":
            index: list = []
            for i in range(x.ndim):
                bm = bool(a["begin_mask"][i]) if "begin_mask" in a else False
                em = bool(a["end_mask"][i]) if "end_mask" in a else False
                st = int(a["stride"][i]) if "stride" in a else 1
                if "squeeze_mask" in a and bool(a["squeeze_mask"][i]):
                    index.append(int(a["begin"][i]))  # one element, its axis dropped
                    continue
                index.append(slice(None if bm else int(a["begin"][i]), None if em else int(a["end"][i]), st))
            out = x[tuple(index)]
        elif t == "select":
            out = np.where(a["cond"], a["a"], a["b"])
        elif t == "shape":
            out = np.array(x.shape, np.int32)
        elif t == "range_1d":
            out = np.arange(a["start"], a["end"], a["step"])
        elif t == "gather_nd":
            idx = np.asarray(a["indices"]).astype(np.int64)
            if int(a.get("batch_dims", 0)):
                raise NotImplementedError("gather_nd with batch_dims")
            out = x[tuple(np.moveaxis(idx, -1, 0))]
        elif t == "fill":
            out = np.full([int(v) for v in a["shape"]], a.get("value", 0))
        elif t == "fill_like":
            out = np.full(a["ref_tensor"].shape, a.get("value", 0))
        elif t == "softmax":
            axis = int(a.get("axis", -1))
            e = np.exp(x - x.max(axis=axis, keepdims=True))
            out = e / e.sum(axis=axis, keepdims=True)
        elif t == "layer_norm":
            axes = tuple(int(v) for v in a["axes"])
            mean = x.mean(axis=axes, keepdims=True)
            var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
            out = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
            out = out * a.get("gamma", 1.0) + a.get("beta", 0.0)
        elif t == "gelu":
            xt = torch.from_numpy(np.asarray(x, np.float32))
            out = F.gelu(xt, approximate="none" if str(a.get("mode", "EXACT")) == "EXACT" else "tanh").numpy()
        elif t == "tile":
            out = np.tile(x, [int(v) for v in a["reps"]])
        elif t == "pad":
            p = [int(v) for v in a["pad"]]
            n = len(p) // 2
            widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
            mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[str(a.get("mode", "constant"))]
            out = np.pad(x, widths, mode=mode, **({"constant_values": float(a.get("constant_val", 0))}
                                                  if mode == "constant" else {}))
        elif t == "upsample_nearest_neighbor":
            sh, sw = int(a.get("scale_factor_height", 1)), int(a.get("scale_factor_width", 1))
            out = np.repeat(np.repeat(x, sh, axis=-2), sw, axis=-1)
        elif t == "upsample_bilinear":
            align, half = bool(a.get("align_corners", False)), bool(a.get("half_pixel_centers", True))
            if not align and not half:
                raise NotImplementedError("asymmetric bilinear upsampling")
            size = (int(x.shape[-2] * float(a["scale_factor_height"])), int(x.shape[-1] * float(a["scale_factor_width"])))
            out = F.interpolate(torch.from_numpy(np.asarray(x, np.float32)), size=size, mode="bilinear",
                                align_corners=align).numpy()
        else:
            raise NotImplementedError(f"reference has no MIL op '{t}' ({op.name})")
        name = op.outputs[0].name
        env[name] = np.asarray(out)
        if substitute is not None and name in substitute:
            computed[name] = env[name]
            env[name] = np.asarray(substitute[name]).astype(env[name].dtype)
    outputs = [env[v.name] for v in fn.outputs]
    env.update(computed)
    return outputs


def _binary(f):
    return lambda a: f(a["x"], a["y"])


_ELEMENTWISE = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "floor_div": _binary(np.floor_divide), "pow": _binary(np.power),
    "maximum": _binary(np.maximum), "minimum": _binary(np.minimum), "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal), "less": _binary(np.less), "less_equal": _binary(np.less_equal),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal), "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "relu": lambda a: np.maximum(a["x"], 0), "relu6": lambda a: np.clip(a["x"], 0, 6),
    "clip": lambda a: np.clip(a["x"], a["alpha"], a["beta"]),
    "sigmoid": lambda a: 1 / (1 + np.exp(-a["x"])), "tanh": lambda a: np.tanh(a["x"]),
    "sigmoid_hard": lambda a: np.clip(a["alpha"] * a["x"] + a["beta"], 0, 1),
    "identity": lambda a: a["x"], "sqrt": lambda a: np.sqrt(a["x"]), "exp": lambda a: np.exp(a["x"]),
    "erf": lambda a: _torch().special.erf(_torch().from_numpy(np.asarray(a["x"], np.float32))).numpy(),
    "leaky_relu": lambda a: np.where(a["x"] >= 0, a["x"], a["alpha"] * a["x"]),
    "abs": lambda a: np.abs(a["x"]), "log": lambda a: np.log(a["x"]), "floor": lambda a: np.floor(a["x"]),
    "ceil": lambda a: np.ceil(a["x"]), "inverse": lambda a: 1 / a["x"], "sin": lambda a: np.sin(a["x"]),
    "cos": lambda a: np.cos(a["x"]),
}
