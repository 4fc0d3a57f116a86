"""onnxruntime backend: the canonical model, made fast for onnxruntime on x86, run on CPU.

Lowering rewrites activation zero points int8 0 -> uint8 128 (scales untouched). That is
bit-exact, and on x86 it lets onnxruntime fuse the QDQ groups into integer kernels instead of
running DQ -> float -> Q (FINDINGS.md: 1.30 ms -> 0.55 ms on a ResNet-like CNN). Weights stay
int8 per-channel. The canonical model itself is never changed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

import deploykit
from deploykit.backend import Artifact, Availability, Backend, CanonicalModel, CheckResult, Option
from deploykit.errors import BackendUnavailable, LoweringError
from deploykit.fileio import atomic_output
from deploykit.quantize.canonical import QdqGraph

_LEVELS = ("disable", "basic", "extended", "all")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = "onnxruntime CPU: canonical QDQ model with uint8 activations (x86 fast path)"
    install_hint = "pip install onnxruntime"
    artifact_suffix = ".onnx"
    options = {
        "threads": Option(int, 0, "intra-op threads (0: onnxruntime's default, one per core)"),
        "graph_optimization_level": Option(str, "all", "onnxruntime graph optimisation level", _LEVELS),
        "activations": Option(str, "uint8", "activation type in the lowered model: uint8 (x86 fast path, "
                              "bit-exact) or int8 (the canonical model unchanged)", ("uint8", "int8")),
        "execution_provider": Option(str, "CPUExecutionProvider", "onnxruntime execution provider"),
    }

    def probe(self, target) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability.missing(f"onnxruntime is not importable ({exc})", self.install_hint)
        provider = target.options.get("execution_provider", "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            return Availability(True, False, f"execution provider {provider} is not available "
                                f"(available: {', '.join(ort.get_available_providers())})", self.install_hint)
        return Availability.ready(onnxruntime=ort.__version__)

    def lower(self, canonical: CanonicalModel, target, dest: Path) -> Artifact:
        model = onnx.ModelProto()
        model.CopyFrom(canonical.model)
        rewritten = to_uint8_activations(model) if target.options["activations"] == "uint8" else 0
        with atomic_output(dest) as tmp:
            onnx.save(model, str(tmp))
        check = verify_scales(canonical.model, model)
        return Artifact(self.name, dest, (dest,), {"activation_type": target.options["activations"],
                                                    "rewritten_qdq_pairs": rewritten}, (check,))

    def load(self, artifact: Artifact, target) -> "OrtRunner":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"target '{target.name}': onnxruntime is not importable ({exc}); {self.install_hint}") from None
        return OrtRunner(artifact.path, target.options, ort)

    def device_info(self, target) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                "cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}


class OrtRunner:
    def __init__(self, path: Path, options: Mapping[str, Any], ort: Any) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.get("graph_optimization_level", "all")]
        if options.get("threads"):
            opts.intra_op_num_threads = int(options["threads"])
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[options.get("execution_provider", "CPUExecutionProvider")])
        except Exception as exc:
            raise LoweringError(f"{path}: onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: feeds[k] for k in self.input_names})


def to_uint8_activations(model: onnx.ModelProto) -> int:
    """Rewrite activation Q/DQ pairs from int8 zero point 0 to uint8 zero point 128, in place.

    Bit-exact: clip(round(x/s), -128, 127) + 128 == clip(round(x/s) + 128, 0, 255).
    Returns the number of Q/DQ nodes rewritten.
    """
    g = QdqGraph(model)
    zp_u8 = "deploykit_ort_zero_point_uint8"
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or g.is_weight_dq(node):
            continue
        params = g.params(node)
        if params.axis is not None or np.any(params.zero_point != 0):
            raise LoweringError(f"node '{node.name}': activation Q/DQ is not per-tensor with zero point 0; "
                                f"run 'deploykit inspect --lint' on the canonical model")
        if len(node.input) < 3:
            node.input.append(zp_u8)
        else:
            node.input[2] = zp_u8
        count += 1
    if count:
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp_u8))
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def verify_scales(canonical: onnx.ModelProto, lowered: onnx.ModelProto) -> CheckResult:
    """Every Q/DQ node of the lowered model carries the canonical scale of the same node."""
    want, got = QdqGraph(canonical), QdqGraph(lowered)
    by_name = {n.name: n for n in lowered.graph.node}
    mismatches = []
    compared = 0
    for node in canonical.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        other = by_name.get(node.name)
        if other is None:
            mismatches.append(f"{node.name}: missing")
            continue
        a, b = want.params(node), got.params(other)
        compared += 1
        if not np.array_equal(a.scale, b.scale):
            mismatches.append(f"{node.name}: scale differs")
        if got.is_weight_dq(other) and not np.array_equal(want.const(node.input[0]), got.const(other.input[0])):
            mismatches.append(f"{node.name}: int8 weights differ")
    status = "fail" if mismatches or compared == 0 else "pass"
    msg = f"{compared} Q/DQ scales compared, {len(mismatches)} mismatches"
    return CheckResult("scales_match", status, float(len(mismatches)), message=msg,
                       details={"compared": compared, "mismatches": mismatches[:50]})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@deploykit.hookimpl
def deploykit_register_backends(register) -> None:
    register(OnnxRuntimeBackend)
