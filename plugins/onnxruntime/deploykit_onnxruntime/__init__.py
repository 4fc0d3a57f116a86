"""onnxruntime backend: the canonical model, made fast for onnxruntime on x86, run on CPU.

Two lossless rewrites, both inside this backend (the canonical model is never changed):

1. Output Q/DQ: onnxruntime only turns ``DQ -> Conv -> Q`` into an integer QLinearConv when a
   Q follows the op directly. Where the canonical model has ``Conv -> Relu/Clip -> Q(s)``, a
   Q/DQ pair with the same scale ``s`` is inserted on the Conv output. Relu and Clip commute
   with rounding to a grid of step ``s``, so the values are unchanged, and the Conv (or the
   residual Add, or Gemm/MatMul) runs in int8.
2. Activation zero points int8 z -> uint8 z + 128 (scales untouched): bit-exact in both
   activation profiles, and on x86 onnxruntime's integer kernels want uint8 activations
   (symmetric CNN, batch 1, docs/toolchain-facts.md: 1.30 ms -> 0.55 ms).
3. ``DQ(s) -> Relu/Clip -> Q(s)`` becomes one integer Clip on the quantized tensor (Relu:
   ``max(q, zero_point)``), exact for the same reason as 1, instead of three float passes. A
   clip whose integer bounds are the whole type range (a ReLU6 over an asymmetric [0, 6]
   range) clips nothing and is dropped: this is where the asymmetric profile gets its speed,
   as onnxruntime then fuses the convolution and the requantization into one kernel.
4. Weights int8 -> uint8 with zero point 128 (``weights = "uint8"``, chosen automatically on x86
   CPUs without VNNI): bit-exact, and it moves onnxruntime from its u8 x s8 kernels, whose
   ``vpmaddubsw`` saturates int16 pair sums on those CPUs (measured: 18% relative L2 on a small
   ResNet), to u8 x u8 kernels that widen first and are exact. See :mod:`deploykit.cpu`.
Otherwise weights stay int8 per-channel.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import AbstractSet, Any, Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

import deploykit
from deploykit import ortsession
from deploykit.backend import (
    Artifact,
    Availability,
    Backend,
    CanonicalModel,
    Capability,
    CheckResult,
    Option,
    Runner,
    Target,
    require,
)
from deploykit.canonical import QdqGraph, model_float_layers, model_profile
from deploykit.cpu import cpu_name, u8s8_saturates
from deploykit.errors import ConfigError, LoweringError
from deploykit.fileio import atomic_output

_LEVELS = ("disable", "basic", "extended", "all")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = "onnxruntime CPU: canonical QDQ model with uint8 activations (x86 fast path)"
    install_hint = "pip install onnxruntime"
    capabilities = frozenset({Capability.FP32_RUNNER, Capability.LAYER_RUNNER})
    artifact_suffix = ".onnx"
    activation_profiles = ("symmetric", "asymmetric")
    options = {
        "threads": Option(int, 0, "intra-op threads (0: OMP_NUM_THREADS when set, else onnxruntime's default, "
                                  "one per core)"),
        "graph_optimization_level": Option(str, "all", "onnxruntime graph optimisation level", _LEVELS),
        "activations": Option(str, "uint8", "activation type in the lowered model: uint8 (x86 fast path, "
                              "bit-exact) or int8 (the canonical model unchanged)", ("uint8", "int8")),
        "execution_provider": Option(str, "CPUExecutionProvider", "onnxruntime execution provider"),
        "weights": Option(str, "auto", "weight type in the lowered model: int8, uint8 (zero point 128, bit-exact; "
                          "exact u8 x u8 kernels on x86 without VNNI, where u8 x s8 saturates), or auto "
                          "(uint8 exactly when this CPU lacks VNNI)", ("auto", "int8", "uint8")),
    }

    def probe(self, target: Target) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability.missing(f"onnxruntime is not importable ({exc})", self.install_hint)
        provider = target.options.get("execution_provider", "CPUExecutionProvider")
        if provider not in ort.get_all_providers():  # a typo, not a missing install: no silent "ok"
            raise ConfigError(f"target '{target.name}': execution_provider '{provider}' is not an onnxruntime "
                              f"provider (known: {', '.join(ort.get_all_providers())})")
        if provider not in ort.get_available_providers():
            return Availability(True, False, f"execution provider {provider} is not available "
                                f"(available: {', '.join(ort.get_available_providers())})", self.install_hint)
        return Availability.ready(onnxruntime=ort.__version__)

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        model = onnx.ModelProto()
        model.CopyFrom(canonical.model)
        fused = add_output_qdq(model)
        rewritten = to_uint8_activations(model) if target.options["activations"] == "uint8" else 0
        folded, dropped = integer_activations(model)
        weights = resolve_weight_type(target.options.get("weights", "auto"))
        shifted = to_uint8_weights(model) if weights == "uint8" else 0
        with atomic_output(dest) as tmp:
            onnx.save(model, str(tmp))
        check = verify_scales(canonical.model, model, set(folded))
        floats = model_float_layers(canonical.model)
        return Artifact(self.name, dest, (dest,), {"activation_type": target.options["activations"],
                                                    "activation_profile": model_profile(canonical.model),
                                                    "weight_type": weights, "uint8_weight_tensors": shifted,
                                                    "rewritten_qdq_nodes": rewritten,
                                                    "int8_input_qdq_nodes": (len(input_quantizers(canonical.model))
                                                                             if rewritten else 0),
                                                    "output_qdq_added": fused,
                                                    "integer_relu_clip": len(folded) // 2 - len(dropped),
                                                    "noop_clips_dropped": dropped,
                                                    "float_layers": floats},
                        (check, float_layer_audit(floats)) if floats else (check,))

    def load(self, artifact: Artifact, target: Target) -> "OrtRunner":
        return OrtRunner(artifact.path, target.options, require("onnxruntime", self.install_hint))

    def fp32_runner(self, canonical: CanonicalModel, target: Target, workdir: Path) -> "OrtRunner":
        """The FP32 model in a session with the target's own options (threads, optimisation level,
        provider): the INT8 artifact's fair baseline, timed beside it."""
        return OrtRunner(Path(canonical.fp32_path), target.options, require("onnxruntime", self.install_hint))

    def layer_runner(self, artifact: Artifact, canonical: CanonicalModel, target: Target, cut: Any) -> Any:
        """The artifact itself, cut at every quantized tensor, in a session with the target's own
        options (integer kernels included): what this runtime computes for each layer."""
        from deploykit.layers import OnnxLayerRunner, onnxruntime_runner

        ort = require("onnxruntime", self.install_hint)
        provider = target.options.get("execution_provider", "CPUExecutionProvider")
        return OnnxLayerRunner(onnx.load(str(artifact.path)), cut,
                               lambda model: onnxruntime_runner(model, session_options(target.options, ort), [provider]))

    def device_info(self, target: Target) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                "cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}


def session_options(options: Mapping[str, Any], ort: Any) -> Any:
    """The target's onnxruntime session options (optimisation level, threads; threads 0: as
    deploykit's own sessions, :func:`deploykit.ortsession.session_options`)."""
    opts = ortsession.session_options()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.get("graph_optimization_level", "all")]
    if options.get("threads"):
        opts.intra_op_num_threads = int(options["threads"])
    return opts


class OrtRunner(Runner):
    def __init__(self, path: Path, options: Mapping[str, Any], ort: Any) -> None:
        opts = session_options(options, ort)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[options.get("execution_provider", "CPUExecutionProvider")])
        except Exception as exc:
            raise LoweringError(f"{path}: onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: feeds[k] for k in self.input_names})

    def close(self) -> None:
        self.session = None  # onnxruntime frees the session's arena with the last reference


_FUSABLE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})
_COMMUTES_WITH_ROUNDING = frozenset({"Relu", "Clip"})


def add_output_qdq(model: onnx.ModelProto) -> int:
    """Insert ``Q/DQ(s)`` between a quantized op and a Relu/Clip whose output only feeds Q(s).

    Lossless: Q(relu(DQ(Q(x)))) == Q(relu(x)) for the same scale, as relu and clip are monotone
    and keep the integer grid. Returns the number of pairs inserted. Edits ``model`` in place.
    """
    g = QdqGraph(model)
    graph_outputs = {o.name for o in model.graph.output}
    inserted: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in _FUSABLE or not all(g.dq_feeding(i) for i in node.input[:2] if i):
            continue
        out = node.output[0]
        users = g.consumers.get(out, [])
        if out in graph_outputs or len(users) != 1 or users[0].op_type not in _COMMUTES_WITH_ROUNDING:
            continue
        act = users[0]
        quants = g.consumers.get(act.output[0], [])
        if not quants or act.output[0] in graph_outputs or any(q.op_type != "QuantizeLinear" for q in quants):
            continue
        first = quants[0]
        if any(list(q.input[1:]) != list(first.input[1:]) for q in quants):
            continue
        q = onnx.helper.make_node("QuantizeLinear", [out, *first.input[1:]], [f"{out}_ort_q"], name=f"{node.name}_ort_Q")
        dq = onnx.helper.make_node("DequantizeLinear", [f"{out}_ort_q", *first.input[1:]], [f"{out}_ort_dq"],
                                   name=f"{node.name}_ort_DQ")
        act.input[0] = dq.output[0]
        inserted[node.name] = [q, dq]
    if inserted:
        nodes = []
        for node in model.graph.node:
            nodes.append(node)
            nodes.extend(inserted.get(node.name, []))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(inserted)


def integer_activations(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Replace ``DQ(s, zp) -> Relu/Clip -> Q(s, zp)`` by ``Clip`` on the quantized values.

    Q(clip(DQ(q), a, b)) == clip(q, round(a/s) + zp, round(b/s) + zp) for integer q, since
    rounding is monotone. When both integer bounds are the type's own limits the clip is the
    identity and is dropped (its readers read the quantized input). Returns (names of the Q/DQ
    nodes folded away, names of the Relu/Clip nodes dropped). Edits ``model`` in place.
    """
    g = QdqGraph(model)
    graph_outputs = {o.name for o in model.graph.output}
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    replace: dict[int, onnx.NodeProto] = {}
    folded: list[str] = []
    dropped: list[str] = []
    rename: dict[str, str] = {}
    for act in model.graph.node:
        if act.op_type not in _COMMUTES_WITH_ROUNDING:
            continue
        dq = g.dq_feeding(act.input[0])
        users = g.consumers.get(act.output[0], [])
        if dq is None or g.is_weight_dq(dq) or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        if act.output[0] in graph_outputs or len(g.consumers.get(dq.output[0], [])) != 1:
            continue
        pq, pdq = g.params(q), g.params(dq)
        if pq.axis is not None or not (np.array_equal(pq.scale, pdq.scale) and np.array_equal(pq.zero_point, pdq.zero_point)
                                       and pq.zero_point.dtype == pdq.zero_point.dtype):
            continue
        scale, zp, dtype = float(pq.scale.reshape(-1)[0]), int(pq.zero_point.reshape(-1)[0]), pq.zero_point.dtype
        info = np.iinfo(dtype)
        try:
            lo, hi = (0.0, None) if act.op_type == "Relu" else _clip_bounds(g, act)
        except ValueError:  # bounds computed at run time: leave the float chain
            continue
        bound = lambda v, default: default if v is None else int(np.clip(np.round(v / scale) + zp, info.min, info.max))
        int_lo, int_hi = bound(lo, info.min), bound(hi, info.max)
        idx = {id(n): i for i, n in enumerate(model.graph.node)}
        drop.update({idx[id(dq)], idx[id(q)]})
        folded += [dq.name, q.name]
        if int_lo == info.min and int_hi == info.max and q.output[0] not in graph_outputs:  # clips nothing
            drop.add(idx[id(act)])
            dropped.append(act.name)
            rename[q.output[0]] = dq.input[0]
            continue
        lo_name, hi_name = f"{act.name}_int_lo", f"{act.name}_int_hi"
        new_inits += [numpy_helper.from_array(np.array(int_lo, dtype), lo_name),
                      numpy_helper.from_array(np.array(int_hi, dtype), hi_name)]
        replace[idx[id(act)]] = onnx.helper.make_node("Clip", [dq.input[0], lo_name, hi_name], [q.output[0]],
                                                      name=f"{act.name}_int")
    if replace or drop:
        nodes = [replace.get(i, n) for i, n in enumerate(model.graph.node) if i not in drop]
        for node in nodes:
            for k, name in enumerate(node.input):
                while name in rename:  # chains of dropped clips
                    name = rename[name]
                node.input[k] = name
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new_inits)
    return folded, dropped


def _clip_bounds(g: QdqGraph, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
    def const(i: int) -> float | None:
        if len(clip.input) <= i or not clip.input[i]:
            return None
        value = g.const(clip.input[i])
        if value is None:
            raise ValueError("dynamic clip bound")
        return float(value)

    return const(1), const(2)


def input_quantizers(model: onnx.ModelProto) -> set[str]:
    """Names of the Q/DQ nodes that quantize a graph input (and read it back).

    They stay int8: onnxruntime's uint8 integer path computes the first convolution of
    EfficientNet-Lite0 (normalised photos spanning the whole int8 range) up to 29 steps off on 3%
    of its values, with or without VNNI, while with int8 input every layer is within rounding
    (measured with deploykit compare-layers; docs/layers.md)."""
    inputs = {i.name for i in model.graph.input}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inputs]
    outputs = {n.output[0] for n in quantizers}
    readers = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in outputs]
    return {n.name for n in quantizers + readers}


def to_uint8_activations(model: onnx.ModelProto) -> int:
    """Rewrite activation Q/DQ pairs from int8 zero point z to uint8 zero point z + 128, in place,
    except those of the model's inputs (:func:`input_quantizers`).

    Bit-exact: clip(round(x/s) + z, -128, 127) + 128 == clip(round(x/s) + z + 128, 0, 255).
    Returns the number of Q/DQ nodes rewritten.
    """
    g = QdqGraph(model)
    count = 0
    used_zps: dict[int, str] = {}
    keep_int8 = input_quantizers(model)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or g.is_weight_dq(node) or node.name in keep_int8:
            continue
        params = g.params(node)
        if params.axis is not None or params.zero_point.dtype != np.int8:
            raise LoweringError(f"node '{node.name}': activation Q/DQ is not per-tensor int8; "
                                f"run 'deploykit inspect --lint' on the canonical model")
        z = int(params.zero_point.reshape(-1)[0]) + 128
        zp_u8 = used_zps.setdefault(z, f"deploykit_ort_zero_point_uint8_{z}")
        if len(node.input) < 3:
            node.input.append(zp_u8)
        else:
            node.input[2] = zp_u8
        count += 1
    for z, name in used_zps.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(z, np.uint8), name))
    if count:
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def verify_scales(canonical: onnx.ModelProto, lowered: onnx.ModelProto, folded: AbstractSet[str] = frozenset()) -> CheckResult:
    """Every canonical Q/DQ node is in the lowered model with the same scale (and the same int8
    weights), or was folded into an integer Clip (``folded``) that uses that scale."""
    want, got = QdqGraph(canonical), QdqGraph(lowered)
    by_name = {n.name: n for n in lowered.graph.node}
    mismatches = []
    compared = 0
    for node in canonical.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        other = by_name.get(node.name)
        if other is None:
            if node.name not in folded:
                mismatches.append(f"{node.name}: missing")
            continue
        a, b = want.params(node), got.params(other)
        compared += 1
        if not np.array_equal(a.scale, b.scale):
            mismatches.append(f"{node.name}: scale differs")
        if got.is_weight_dq(other) and not np.array_equal(_signed(want.constant(node.input[0])),
                                                          _signed(got.constant(other.input[0]))):
            mismatches.append(f"{node.name}: int8 weights differ")
        if got.is_weight_dq(other) and not np.array_equal(_signed(a.zero_point), _signed(b.zero_point)):
            mismatches.append(f"{node.name}: weight zero point differs")
    status = "fail" if mismatches or compared == 0 else "pass"
    msg = f"{compared} Q/DQ scales compared ({len(folded)} folded into integer Clip), {len(mismatches)} mismatches"
    return CheckResult("scales_match", status, float(len(mismatches)), message=msg,
                       details={"compared": compared, "mismatches": mismatches[:50]})


def float_layer_audit(floats: list[str]) -> CheckResult:
    """The declared float islands the artifact computes in float (named for the report)."""
    msg = f"{len(floats)} declared float layer(s)" + (": " + ", ".join(floats[:8]) if floats else "")
    if len(floats) > 8:
        msg += f", ... {len(floats) - 8} more"
    return CheckResult("float_layers", "info", float(len(floats)), message=msg, details={"float_layers": floats})


def _signed(values: np.ndarray) -> np.ndarray:
    """int8 values as stored, or uint8 values shifted back by 128 (the uint8-weights rewrite)."""
    return values.astype(np.int16) - 128 if values.dtype == np.uint8 else values.astype(np.int16)


def resolve_weight_type(option: str) -> str:
    """``auto``: uint8 where this CPU's u8 x s8 kernels saturate, else int8."""
    if option != "auto":
        return option
    return "uint8" if u8s8_saturates() else "int8"


def to_uint8_weights(model: onnx.ModelProto) -> int:
    """Rewrite every int8 weight initializer feeding a DequantizeLinear to uint8 (w + 128,
    zero point + 128). DQ gives (w + 128 - (z + 128)) * s: bit-exact. Edits in place; returns
    the number of weight tensors rewritten."""
    inits = {i.name: i for i in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        weight, zero_point = inits[node.input[0]], inits.get(node.input[2])
        if weight.data_type != onnx.TensorProto.INT8 or zero_point is None or node.input[0] in done:
            continue
        for tensor in (weight, zero_point):
            shifted = (numpy_helper.to_array(tensor).astype(np.int16) + 128).astype(np.uint8)
            tensor.CopyFrom(numpy_helper.from_array(shifted, tensor.name))
        done.add(node.input[0])
    return len(done)


@deploykit.hookimpl
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    register(OnnxRuntimeBackend)
