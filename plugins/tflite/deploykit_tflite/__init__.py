"""TFLite backend: the canonical QDQ model rebuilt in TensorFlow with its scales as fake-quant
ranges, converted to a full-integer .tflite, verified tensor by tensor, run with LiteRT.

No public converter keeps QDQ scales (docs/toolchain-facts.md); this one does, and checks it did: every
int8 tensor of the flatbuffer is compared with the canonical model after every build.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import deploykit
from deploykit.backend import Artifact, Availability, Backend, CanonicalModel, Capability, CheckResult, Option, Target
from deploykit.errors import BackendUnavailable, LoweringError
from deploykit.fileio import atomic_output

INSTALL_HINT = "pip install 'deploykit[tflite]'"


def _version(module: str, dist: str) -> str | None:
    """The installed version of a module without importing it (TensorFlow takes seconds to
    import), or None when it is missing. A module set to None in sys.modules counts as missing."""
    if module in sys.modules and sys.modules[module] is None:
        return None
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def tensorflow_version() -> str | None:
    return _version("tensorflow", "tensorflow")


def litert_version() -> str | None:
    return _version("ai_edge_litert", "ai-edge-litert")


def example_shapes(canonical: CanonicalModel) -> dict[str, list[int]] | None:
    """Input shapes of the evaluation data, when the build supplies them (dynamic sequence dims)."""
    shapes = getattr(canonical, "example_shapes", None)
    return dict(shapes) if shapes else None


class TFLiteBackend(Backend):
    name = "tflite"
    description = "TFLite full-integer INT8 (canonical scales kept), run with the LiteRT interpreter"
    install_hint = INSTALL_HINT
    artifact_suffix = ".tflite"
    metrics = ("int8_fraction",)
    capabilities = frozenset({Capability.FP32_RUNNER, Capability.LAYER_RUNNER})
    #: zero points become the flatbuffer's zero points (plugins/tflite/tests/test_tflite_profiles.py)
    activation_profiles = ("symmetric", "asymmetric")
    options = {
        "input_type": Option(str, "int8", "type of the model's input tensors", ("int8", "float32")),
        "output_type": Option(str, "int8", "type of the model's output tensors", ("int8", "float32")),
        "allow_float_fallback": Option(bool, False, "let ops without an int8 TFLite kernel run in float "
                                       "(listed in the report); false makes them a lowering error"),
        "threads": Option(int, 0, "LiteRT interpreter threads (0: the runtime's default)"),
        "input_shapes": Option(dict, {}, "fixed NCHW shape per input for dynamic dims, e.g. "
                               "{ x = [1, 3, 224, 224] }; default: batch 1, other dims as in the model"),
    }

    def probe(self, target: Target) -> Availability:
        tf_version, litert = tensorflow_version(), litert_version()
        versions = {k: v for k, v in (("tensorflow", tf_version), ("ai_edge_litert", litert)) if v}
        missing = [name for name, v in (("tensorflow (needed to lower)", tf_version),
                                        ("ai_edge_litert (needed to run)", litert)) if v is None]
        if not missing:
            return Availability(True, True, versions=versions)
        return Availability(tf_version is not None, litert is not None,
                            f"{' and '.join(missing)} not installed", INSTALL_HINT, versions)

    def preflight(self, canonical: CanonicalModel, target: Target) -> tuple[list[CheckResult], dict[str, Any]]:
        from deploykit_tflite.float_ops import FLOAT_GRAPH_OPS, needs_islands
        from deploykit_tflite.lowering import fixed_input_shapes
        from deploykit_tflite.ops import FLOAT_OPS, OPS

        # Q/DQ become parameters; shape arithmetic is evaluated at the fixed input shapes
        skip = {"QuantizeLinear", "DequantizeLinear", "Shape", "Constant", "ConstantOfShape", "Range"}
        known = set(OPS) | set(FLOAT_OPS) | (set(FLOAT_GRAPH_OPS) if needs_islands(canonical.model) else set())
        unsupported = sorted({f"{n.name} ({n.op_type})" for n in canonical.model.graph.node
                              if n.op_type not in skip and n.op_type not in known})
        float_only = sorted({f"{n.name} ({n.op_type})" for n in canonical.model.graph.node if n.op_type in FLOAT_OPS})
        checks = []
        if unsupported:
            checks.append(CheckResult("tflite_op_support", "fail", float(len(unsupported)),
                                      message="no TFLite lowering for " + ", ".join(unsupported[:8]),
                                      details={"unsupported": unsupported}))
        meta: dict[str, Any] = {"float_only_ops": float_only}
        try:
            meta["input_shapes"] = fixed_input_shapes(canonical.model, target.options.get("input_shapes") or {},
                                                      target.name, example_shapes(canonical))
        except LoweringError as exc:
            checks.append(CheckResult("tflite_input_shapes", "fail", message=str(exc)))
        return checks, meta

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        if tensorflow_version() is None:
            raise BackendUnavailable(f"target '{target.name}': tensorflow is not importable; it is needed to "
                                     f"lower to TFLite: {INSTALL_HINT}")
        from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph, shapes_source
        from deploykit_tflite.patch import patch

        opts = target.options
        fallback = bool(opts.get("allow_float_fallback", False))
        example = example_shapes(canonical)
        shapes = fixed_input_shapes(canonical.model, opts.get("input_shapes") or {}, target.name, example)
        started = time.monotonic()
        lowered = lower_graph(canonical, shapes, fallback, target.name)
        traced = time.monotonic()
        flatbuffer = convert(lowered, opts.get("input_type", "int8"), opts.get("output_type", "int8"))
        flatbuffer, patched = patch(flatbuffer, lowered)
        converted = time.monotonic()
        with atomic_output(dest) as tmp:
            tmp.write_bytes(flatbuffer)
        checks: list[CheckResult] = []
        metadata: dict[str, Any] = {
            "input_shapes": shapes, "inputs": lowered.inputs, "outputs": lowered.outputs,
            "input_type": opts.get("input_type", "int8"), "output_type": opts.get("output_type", "int8"),
            "lowered_float_ops": lowered.float_ops, "bytes": len(flatbuffer),
            "seconds": {"trace": round(traced - started, 3), "convert": round(converted - traced, 3)},
        }
        checks.append(CheckResult("input_shapes", "info", message=f"compiled for {shapes}, from "
                                  f"{shapes_source(canonical.model, opts.get('input_shapes') or {}, example)}",
                                  details={"shapes": shapes}))
        if litert_version() is None:
            checks.append(CheckResult("scales_match", "not_run", message=f"ai_edge_litert is not importable, the "
                                      f"flatbuffer cannot be read back: {INSTALL_HINT}"))
        else:
            from deploykit_tflite.verify import verify

            found, facts = verify(flatbuffer, lowered, fallback, patched)
            checks += found
            metadata.update(facts)
        metadata["patched"] = patched.as_dict()
        metadata["seconds"]["verify"] = round(time.monotonic() - converted, 3)
        return Artifact(self.name, dest, (dest,), metadata, tuple(checks))

    def load(self, artifact: Artifact, target: Target):
        from deploykit_tflite.runner import LiteRTRunner, interpreter_class

        interpreter_class()  # BackendUnavailable with the install hint when LiteRT is missing
        meta = artifact.metadata or {}
        inputs = [i["name"] for i in meta.get("inputs", [])]
        outputs = [o["name"] for o in meta.get("outputs", [])]
        nhwc = all(i.get("nhwc", True) for i in meta.get("inputs", []) if len(i.get("shape", [])) == 4) and \
            all(o.get("nhwc", True) for o in meta.get("outputs", []) if len(o.get("shape", [])) == 4)
        return LiteRTRunner(Path(artifact.path), inputs, outputs, int(target.options.get("threads") or 0), nhwc)

    def layer_runner(self, artifact: Artifact, canonical: CanonicalModel, target: Target, cut: Any) -> Any:
        """The .tflite cut at every canonical quantized tensor it carries (metadata tensor_map),
        run by LiteRT with each layer fed the canonical model's own inputs."""
        from deploykit.layers import tensor_shapes
        from deploykit_tflite.float_ops import needs_islands
        from deploykit_tflite.layers import TFLiteLayerRunner

        meta = artifact.metadata or {}
        tensor_map = meta.get("tensor_map")
        if not tensor_map:
            raise BackendUnavailable(f"{Path(artifact.path).name} has no tensor_map in its metadata (lowered "
                                     "without LiteRT installed, or by an older deploykit): lower it again")
        nhwc = not needs_islands(canonical.model)  # the lowering's own choice of layout
        return TFLiteLayerRunner(Path(artifact.path), tensor_map, cut, tensor_shapes(canonical.model),
                                 [i["name"] for i in meta.get("inputs", [])], nhwc,
                                 int(target.options.get("threads") or 0))

    def fp32_runner(self, canonical: CanonicalModel, target: Target, workdir: Path):
        """The same NHWC graph without fake-quant, converted to a float TFLite model."""
        from deploykit_tflite.float_ops import needs_islands
        from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph
        from deploykit_tflite.runner import LiteRTRunner

        shapes = fixed_input_shapes(canonical.model, target.options.get("input_shapes") or {}, target.name,
                                    example_shapes(canonical))
        graph = lower_graph(canonical, shapes, True, target.name, fake_quant=False)
        path = Path(workdir) / f"{target.name}.float.tflite"
        with atomic_output(path) as tmp:
            tmp.write_bytes(convert(graph, quantize=False))
        return LiteRTRunner(path, [i["name"] for i in graph.inputs], [o["name"] for o in graph.outputs],
                            int(target.options.get("threads") or 0), not needs_islands(canonical.model))

    def device_info(self, target: Target) -> dict[str, Any]:
        return {"tensorflow": tensorflow_version(), "ai_edge_litert": litert_version(),
                "threads": target.options.get("threads") or "default", "cores": os.cpu_count(),
                "machine": platform.machine(), "device": target.device.description or target.device.name}


@deploykit.hookimpl
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    register(TFLiteBackend)
