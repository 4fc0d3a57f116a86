"""The Core ML backend: canonical QDQ ONNX -> ML program (.mlpackage) built with the MIL builder.

Lowering and the scale verification work on any OS; prediction needs macOS.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

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
)
from deploykit.errors import BackendUnavailable, ConfigError, LoweringError
from deploykit.fileio import atomic_output, remove
from deploykit_coreml import sdk
from deploykit_coreml.lowering import (
    DEPLOYMENT_TARGETS,
    REMOVED_PASSES,
    check_deployment_target,
    check_shapes,
    unsupported_nodes,
)
from deploykit_coreml.runner import MACOS_ONLY, META_INPUTS, CoreMLRunner
from deploykit_coreml.sdk import INSTALL_HINT

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def _ct():
    return sdk.coremltools()


def max_batch(target) -> int:
    """Upper bound of the batch range: the option, else the largest batch the target measures."""
    configured = int(target.options.get("max_batch", 0) or 0)
    return max(configured or max(target.batch_sizes or (1,)), int(target.options.get("batch_size", 1)))


def _check_options(options) -> None:
    check_deployment_target(options["minimum_deployment_target"])
    for key, allowed in (("compute_precision", ("fp16", "fp32")), ("compute_units", COMPUTE_UNITS),
                         ("batch", ("range", "fixed"))):
        if options[key] not in allowed:
            raise ConfigError(f"coreml option {key} = {options[key]!r}: use one of {', '.join(allowed)}")
    if int(options["batch_size"]) < 1:
        raise ConfigError(f"coreml option batch_size = {options['batch_size']!r} must be >= 1")
    check_shapes(options)


class CoreMLBackend(Backend):
    name = "coreml"
    description = "Core ML ML program (.mlpackage) built with coremltools' MIL builder; runs on macOS"
    install_hint = INSTALL_HINT
    artifact_suffix = ".mlpackage"
    capabilities = frozenset({Capability.LAYER_RUNNER})  # declared; off macOS it says why it cannot run
    #: zero points are stored on quantize/dequantize as they are (tests/test_coreml_profiles.py)
    activation_profiles = ("symmetric", "asymmetric")
    metrics = ("int8_fraction",)
    options = {
        "minimum_deployment_target": Option(
            str, "iOS17", "iOS17, macOS14, iOS18 or macOS15 (int8 activation quantize/dequantize needs "
                          "iOS17/macOS14; iOS18/macOS15 store weights with constexpr_blockwise_shift_scale)"),
        "compute_precision": Option(str, "fp16", "float ops in fp16 (scales stored as fp16; needed for the "
                                                 "Neural Engine) or fp32 (scales stored exactly)", ("fp16", "fp32")),
        "compute_units": Option(str, "ALL", "Core ML compute units used when the package is loaded", COMPUTE_UNITS),
        "batch": Option(str, "range", "dynamic batch as a Core ML RangeDim [1, max_batch], or a fixed batch_size",
                        ("range", "fixed")),
        "batch_size": Option(int, 1, "the fixed batch, or the default shape of the batch range"),
        "max_batch": Option(int, 0, "upper bound of the batch range; 0: the largest of the target's batch_sizes"),
        "shapes": Option(str, "range", "dynamic non-batch dimensions (a token sequence): a RangeDim [1, max_dim], or "
                                       "'enumerated' shapes of dim_sizes (iOS18/macOS15 only)", ("range", "enumerated")),
        "max_dim": Option(int, 512, "upper bound of each dynamic non-batch dimension (shapes = 'range')"),
        "dim_sizes": Option((list, tuple), (), "sizes of the dynamic dimensions: the enumerated shapes, or (first "
                                               "one) the range's default; e.g. [16, 32, 64, 128]"),
    }

    def probe(self, target: Target) -> Availability:
        # found, not imported: importing coremltools takes seconds (see deploykit_coreml.sdk)
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            return Availability.missing("coremltools is not installed", INSTALL_HINT)
        version = importlib.metadata.version("coremltools")
        versions = {"coremltools": version}
        package = Path(next(iter(spec.submodule_search_locations)))
        # saving weights and reading them back both need coremltools' native blob storage
        if not any(package.glob("libmilstoragepython*")):
            return Availability(False, False, f"coremltools {version} has no native blob storage library "
                                              f"(libmilstoragepython) on this platform; use a macOS or Linux "
                                              f"x86_64/arm64 wheel", INSTALL_HINT, versions)
        if sys.platform != "darwin":
            return Availability(True, False, MACOS_ONLY, versions=versions)
        return Availability.ready(**versions, macos=platform.mac_ver()[0])

    def preflight(self, canonical: CanonicalModel, target: Target) -> tuple[list[CheckResult], dict[str, Any]]:
        """Option and op-coverage checks that need no coremltools."""
        checks = []
        try:
            _check_options(target.options)
            checks.append(CheckResult("coreml_options", "pass", message="options are valid"))
        except ConfigError as exc:
            checks.append(CheckResult("coreml_options", "fail", message=str(exc)))
        fixed = int(target.options.get("batch_size", 1))
        if target.options.get("batch") == "fixed" and any(b != fixed for b in target.batch_sizes):
            checks.append(CheckResult(
                "coreml_batch", "fail", message=f"batch = \"fixed\" with batch_size {fixed}, but the target measures "
                                                f"batch sizes {list(target.batch_sizes)}: use batch = \"range\""))
        configured_max = int(target.options.get("max_batch", 0) or 0)
        ranged = target.options.get("batch", "range") == "range"
        if ranged and configured_max and max(target.batch_sizes) > configured_max:
            checks.append(CheckResult(
                "coreml_batch", "fail", message=f"max_batch {configured_max} is below the target's batch sizes "
                                                f"{list(target.batch_sizes)}: raise max_batch or set it to 0"))
        missing: dict[str, list[str]] = {}
        for node in unsupported_nodes(canonical.model):
            missing.setdefault(f"{node.domain + '::' if node.domain else ''}{node.op_type}", []).append(node.name)
        ops = sorted({n.op_type for n in canonical.model.graph.node})
        listed = ", ".join(f"{op} ({len(names)} node{'s' if len(names) > 1 else ''}, e.g. '{names[0]}')"
                           for op, names in sorted(missing.items()))
        checks.append(CheckResult(
            "coreml_op_coverage", "fail" if missing else "pass", float(sum(map(len, missing.values()))),
            message=f"ops with no Core ML lowering: {listed}" if missing
            else f"all {len(ops)} op types have a Core ML lowering",
            details={"unsupported": {op: names for op, names in sorted(missing.items())}, "op_types": ops}))
        metadata = {"lowering": "MIL builder (coremltools.converters.mil), ct.convert(convert_to='mlprogram')",
                    "minimum_deployment_target": target.options.get("minimum_deployment_target"),
                    "removed_passes": list(REMOVED_PASSES)}
        return checks, metadata

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        from deploykit_coreml import lowering, verify

        ct = _ct()
        options = {k: target.options.get(k, o.default) for k, o in self.options.items()}
        _check_options(options)
        upper = max_batch(target)
        start = time.perf_counter()
        lowered = lowering.build_program(canonical.model, options["minimum_deployment_target"], options["batch"],
                                         int(options["batch_size"]), options["compute_precision"] == "fp16")
        try:
            mlmodel = lowering.convert(lowered, options, upper)
        except LoweringError:
            raise
        except Exception as exc:  # coremltools' own checks: one line, with what to do
            raise LoweringError(f"coremltools could not convert the lowered program of {canonical.path.name}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        mlmodel.user_defined_metadata[META_INPUTS] = json.dumps(
            [[i.coreml_name, i.onnx_name, i.dtype] for i in lowered.inputs])
        mlmodel.user_defined_metadata["deploykit.canonical_model"] = canonical.path.name
        qdq_ops = {q.onnx_node: q.mil_op for q in lowered.qdq_names}
        # recorded in the package so it can be verified later against the canonical model alone
        mlmodel.user_defined_metadata[verify.META_QDQ_OPS] = json.dumps(qdq_ops)
        mlmodel.user_defined_metadata[verify.META_PRECISION] = options["compute_precision"]
        mlmodel.short_description = f"deploykit lowering of {canonical.path.name} (canonical QDQ INT8 scales kept)"
        dest = Path(dest)
        with atomic_output(dest) as tmp:
            # MLModel.save insists on the .mlpackage extension: save beside tmp, then move it in
            staging = tmp.with_name(tmp.name + ".mlpackage")
            try:
                mlmodel.save(str(staging))
                os.replace(staging, tmp)
            finally:
                remove(staging)
        seconds = time.perf_counter() - start

        checks = (verify.verify_package(canonical.model, dest), verify.quantized_compute(verify.read_package(dest)))
        files = tuple(sorted(p for p in dest.rglob("*") if p.is_file()))
        metadata = {
            "coremltools": ct.__version__,
            "minimum_deployment_target": options["minimum_deployment_target"],
            "compute_precision": options["compute_precision"],
            "compute_units": options["compute_units"],
            "inputs": {i.onnx_name: {"coreml_name": i.coreml_name, "dtype": i.dtype,
                                     "shape": ["batch" if d is None else d for d in i.shape]} for i in lowered.inputs},
            "batch": ({"range": [1, upper], "default": min(int(options["batch_size"]), upper)}
                      if options["batch"] == "range" else {"fixed": int(options["batch_size"])}),
            "dynamic_dims": ({name: ({"enumerated": lowering.dim_sizes(options)} if options["shapes"] == "enumerated"
                                     else {"range": [1, int(options["max_dim"])]})
                              for name in lowering.dynamic_dims(lowered.inputs)}),
            "onnx_ops": lowered.op_counts,
            "removed_passes": list(REMOVED_PASSES),
            "lowering_seconds": round(seconds, 3),
        }
        return Artifact(self.name, dest, files, metadata, checks)

    def load(self, artifact: Artifact, target: Target) -> Runner:
        if sys.platform != "darwin":
            raise BackendUnavailable(f"cannot run {artifact.path.name}: {MACOS_ONLY}")
        return CoreMLRunner(artifact.path, target.options.get("compute_units", "ALL"))

    def layer_runner(self, artifact: Artifact, canonical: CanonicalModel, target: Target, cut: Any) -> Runner:
        """Per-layer comparison needs Core ML's runtime (macOS), and on a Mac a package cut at every
        quantized tensor, which is not built yet: always unavailable, with the reason."""
        if sys.platform != "darwin":
            raise BackendUnavailable(MACOS_ONLY)
        raise BackendUnavailable("the Core ML per-layer runner is not built yet (the lowering is checked layer "
                                 "by layer in the test MIL interpreter)")

    def device_info(self, target: Target) -> dict[str, Any]:
        info: dict[str, Any] = {"platform": sys.platform, "machine": platform.machine(),
                                "compute_units": target.options.get("compute_units", "ALL")}
        try:
            info["coremltools"] = _ct().__version__
        except BackendUnavailable as exc:
            info["coremltools"] = f"missing ({exc})"
        if sys.platform == "darwin":
            info["macos"] = platform.mac_ver()[0]
        else:
            info["runtime"] = MACOS_ONLY
        return info


__all__ = ["CoreMLBackend", "DEPLOYMENT_TARGETS"]
