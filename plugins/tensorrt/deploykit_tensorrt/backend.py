"""The TensorRT backend: the canonical Q/DQ model, parsed as it is into a strongly typed network
and built into a serialized engine (.engine) with a sidecar JSON of the facts it is tied to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.backend import (
    Artifact,
    Availability,
    Backend,
    CanonicalModel,
    Capability,
    CheckResult,
    Option,
    Runner,
    input_names,
    output_names,
)
from deploykit.canonical import ASYMMETRIC, lint, model_float_layers, model_profile
from deploykit.errors import BackendUnavailable, LoweringError
from deploykit.fileio import atomic_output
from deploykit_tensorrt import operators
from deploykit_tensorrt.device import (
    INSTALL_HINT,
    EngineFacts,
    GpuInfo,
    check_sidecar,
    cuda_driver_present,
    module_present,
    nvidia_smi,
    query_gpu,
    sidecar_path,
    tensorrt_version,
    timing_cache_path,
)
from deploykit_tensorrt.settings import HARDWARE_LEVELS, build_settings, trtexec_command

if TYPE_CHECKING:  # pragma: no cover
    from deploykit.targets import Target


class TensorRTBackend(Backend):
    name = "tensorrt"
    description = "NVIDIA TensorRT engine built from the canonical Q/DQ model (explicit INT8, strongly typed)"
    install_hint = INSTALL_HINT
    artifact_suffix = ".engine"
    activation_profiles = ("symmetric",)  # the ONNX parser rejects non-zero zero points
    metrics = ("int8_fraction",)
    capabilities = frozenset({Capability.GPU_TIME})
    options = {
        "workspace_mib": Option(int, 1024, "builder workspace memory pool limit, MiB"),
        "profiles": Option(dict, {}, "optimisation profile per dynamic input: { x = { min = [..], opt = [..], "
                                     "max = [..] } }"),
        "builder_optimization_level": Option(int, 3, "0 (fast build) to 5 (slowest build, best tactics)",
                                             choices=(0, 1, 2, 3, 4, 5)),
        "hardware_compatibility_level": Option(str, "none", "which GPUs besides the builder's may run the engine",
                                               choices=tuple(HARDWARE_LEVELS)),
        "dla_core": Option(int, -1, "DLA core to run on (Jetson/DRIVE); -1 for the GPU"),
        "gpu_fallback": Option(bool, True, "with dla_core: let layers the DLA cannot run fall back to the GPU"),
        "timing_cache": Option(bool, True, "keep tactic timings in deploykit's cache folder for faster rebuilds"),
        "strongly_typed": Option(bool, True, "strongly typed network (the only INT8 path in TensorRT 11)"),
    }

    # -- availability ---------------------------------------------------------------------------
    def probe(self, target: "Target") -> Availability:
        version, why = tensorrt_version()
        missing = [why] if version is None else []
        gpu = None
        if not cuda_driver_present():
            smi = "" if nvidia_smi() else ", no nvidia-smi"
            missing.append(f"a CUDA driver (libcuda.so.1 not found{smi})")
            missing.append("an NVIDIA GPU (no CUDA driver to find one)")
        else:
            gpu = query_gpu()
            if gpu is None:
                missing.append("an NVIDIA GPU (the CUDA driver reports no usable device)")
        if missing:
            return Availability(False, False, "missing: " + "; ".join(missing), INSTALL_HINT)
        versions = _versions(version, gpu)
        if not module_present("polygraphy"):
            return Availability(True, False, "missing: polygraphy (the runner deserializes engines with it)",
                                "pip install polygraphy", versions)
        return Availability(True, True, versions=versions)

    def device_info(self, target: "Target") -> dict[str, Any]:
        version, _ = tensorrt_version()
        gpu = query_gpu() if cuda_driver_present() else None
        info: dict[str, Any] = {"tensorrt_version": version, "gpu_name": gpu.name if gpu else None,
                                "compute_capability": gpu.compute_capability if gpu else None,
                                "driver": gpu.driver if gpu else None, "cuda_driver": gpu.cuda_driver if gpu else None}
        if version is None or gpu is None:
            info["missing"] = self.probe(target).reason
        return info

    # -- pre-flight -----------------------------------------------------------------------------
    def preflight(self, canonical: CanonicalModel, target: "Target") -> tuple[list[CheckResult], dict[str, Any]]:
        if model_profile(canonical.model) == ASYMMETRIC:
            return [CheckResult("tensorrt_lint", "fail", 1.0, message=refusal(target))], {}
        model = canonical.model
        counts = operators.op_counts(model)
        problems = operators.unsupported_nodes(model)
        version, _ = tensorrt_version()
        parser_answer = None
        if version is not None:
            from deploykit_tensorrt.lowering import parser_supports

            parser_answer = parser_supports(Path(canonical.path), list(counts))
            if parser_answer:
                known = {(p.node, p.op_type) for p in problems}
                for i, node in enumerate(model.graph.node):
                    if parser_answer.get(node.op_type) is False and (node.name, node.op_type) not in known:
                        problems.append(operators.OpProblem(node.name or f"#{i}", node.op_type,
                                                            f"TensorRT {version}'s parser does not support it"))
        violations = lint(model, tensorrt_only=True)
        found = [str(v) for v in violations] + [str(p) for p in problems]
        if found:
            message = f"{len(found)} problem(s) TensorRT would reject: " + "; ".join(found[:6])
            message += f"; ... {len(found) - 6} more" if len(found) > 6 else ""
        else:
            message = (f"meets TensorRT's Q/DQ rules; all {sum(counts.values())} nodes "
                       f"({len(counts)} op types) are in the ONNX parser's support table")
        checks = [CheckResult("tensorrt_lint", "fail" if found else "pass", float(len(found)), message=message,
                              details={"violations": [str(v) for v in violations],
                                       "unsupported_nodes": [str(p) for p in problems]})]
        unsupported_ops = {p.op_type for p in problems}
        metadata: dict[str, Any] = {
            "onnx_ops": [{"op": op, "count": n, "supported": op not in unsupported_ops} for op, n in counts.items()],
            "op_table": operators.SOURCE,
            "parser_checked": parser_answer is not None,
        }
        try:
            settings = build_settings(model, target)
        except LoweringError as exc:
            checks.append(CheckResult("tensorrt_profiles", "fail", message=str(exc)))
            metadata["trtexec"] = None
            return checks, metadata
        gpu = query_gpu() if cuda_driver_present() else None
        cache = timing_cache_path(gpu, version)
        metadata["trtexec"] = trtexec_command(canonical.path, f"{target.name}{self.artifact_suffix}", settings, cache)
        metadata["profiles"] = {p.input: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                                for p in settings.profiles}
        return checks, metadata

    # -- lowering -------------------------------------------------------------------------------
    def lower(self, canonical: CanonicalModel, target: "Target", dest: Path) -> Artifact:
        if model_profile(canonical.model) == ASYMMETRIC:
            raise LoweringError(refusal(target))
        settings = build_settings(canonical.model, target)  # config errors before any SDK is needed
        rejected = [p for p in operators.unsupported_nodes(canonical.model) if p.op_type != "opset"
                    and ("::" in p.op_type or p.op_type in operators.UNSUPPORTED)]
        if rejected:
            raise LoweringError(f"TensorRT cannot lower {rejected[0]}; remove or replace that op before quantizing"
                                + (f" (+{len(rejected) - 1} more)" if len(rejected) > 1 else ""))
        version, why = tensorrt_version()
        if version is None:
            raise BackendUnavailable(f"{why}; {INSTALL_HINT}")
        gpu = query_gpu() if cuda_driver_present() else None
        if gpu is None:
            raise BackendUnavailable("no NVIDIA GPU: TensorRT builds an engine on the GPU that will run it; build on "
                                     "the target (or run the trtexec command from the pre-flight there)")
        from deploykit_tensorrt.audit import int8_audit
        from deploykit_tensorrt.lowering import build_engine

        cache = timing_cache_path(gpu, version) if settings.timing_cache else None
        built = build_engine(Path(canonical.path), settings, cache)
        dest = Path(dest)
        facts = EngineFacts(version, gpu.name, gpu.compute_capability, gpu.driver,
                            settings.hardware_compatibility_level)
        sidecar = sidecar_path(dest)
        with atomic_output(sidecar) as tmp:  # first: an engine never exists without its facts
            tmp.write_text(facts.to_json(), encoding="utf-8")
        with atomic_output(dest) as tmp:
            tmp.write_bytes(built.engine)
        reuse = "reused" if built.timing_cache_loaded else "created"
        checks = (int8_audit(built.engine_information, model_float_layers(canonical.model)),
                  CheckResult("build_seconds", "info", built.build_seconds,
                              message=f"engine built in {built.build_seconds:.1f} s; timing cache {reuse}"
                                      + (f" at {cache}" if cache else " (disabled)")))
        metadata = {**_versions(version, gpu),
                    "trtexec": trtexec_command(canonical.path, dest.name, settings, cache),
                    "timing_cache": str(cache) if cache else None,
                    "timing_cache_reused": built.timing_cache_loaded,
                    "build_seconds": built.build_seconds,
                    "hardware_compatibility_level": settings.hardware_compatibility_level,
                    "inputs": input_names(canonical.model), "outputs": output_names(canonical.model),
                    "builder_warnings": list(built.warnings)}
        return Artifact(self.name, dest, (dest, sidecar), metadata, checks)

    # -- running --------------------------------------------------------------------------------
    def load(self, artifact: Artifact, target: "Target") -> Runner:
        version, why = tensorrt_version()
        if version is None:
            raise BackendUnavailable(f"{why}; {INSTALL_HINT}")
        gpu = query_gpu() if cuda_driver_present() else None
        if gpu is None:
            raise BackendUnavailable("no NVIDIA GPU (or CUDA driver) on this host to run the engine")
        check_sidecar(Path(artifact.path), EngineFacts(version, gpu.name, gpu.compute_capability, gpu.driver))
        from deploykit_tensorrt.runner import TensorRTRunner

        inputs, outputs = artifact.metadata.get("inputs"), artifact.metadata.get("outputs")
        if not inputs or not outputs:
            raise LoweringError(f"{artifact.path}: artifact metadata lacks the canonical input/output names; "
                                "lower it again with deploykit")
        return TensorRTRunner(Path(artifact.path).read_bytes(), inputs, outputs)


def refusal(target: "Target") -> str:
    """One line: TensorRT's ONNX parser rejects every non-zero zero point."""
    return (f"target '{target.name}': TensorRT rejects the canonical model's asymmetric activations (non-zero "
            f"zero points); rebuild with --activations symmetric (or [quantization] activations = \"symmetric\")")


def _versions(version: str | None, gpu: GpuInfo | None) -> dict[str, str]:
    if version is None or gpu is None:
        return {}
    return {"tensorrt_version": version, "gpu_name": gpu.name, "compute_capability": gpu.compute_capability,
            "driver": gpu.driver, "cuda_driver": gpu.cuda_driver}

