"""The OpenVINO backend: lowering to IR, the runner, probe and device facts."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

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
    check_feeds,
    precision_audit,
    require,
)
from deploykit.canonical import model_float_layers, model_profile
from deploykit.cpu import u8s8_saturates
from deploykit.errors import BackendUnavailable, ConfigError, LoweringError
from deploykit.fileio import atomic_output, remove
from deploykit.quantize import saturation
from deploykit_openvino.attention import uint8_operands
from deploykit_openvino.overflow import MODES, THRESHOLD, check_split, merge_halves, select, split_layers

INSTALL_HINT = "pip install 'deploykit[openvino]'"
#: Virtual devices that name real ones after a colon ("AUTO:GPU,CPU").
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")
#: Compiled shapes kept per runner; each batch size compiles once.
MAX_COMPILED_SHAPES = 8


def _ov():
    return require("openvino", INSTALL_HINT)


def device_name(target: Target) -> str:
    """The OpenVINO device string: option ``device_name``, else the device kind upper-cased ("cpu" -> "CPU")."""
    return target.options.get("device_name") or target.device.kind.upper()


def missing_devices(device: str, available: list[str]) -> list[str]:
    """Real devices named by ``device`` that OpenVINO does not list ("GPU" matches "GPU.0";
    "AUTO:GPU,CPU" and "BATCH:GPU(4)" name the devices after the colon)."""
    base, _, rest = device.partition(":")
    names = [d.split("(")[0] for d in rest.split(",") if d] if base in VIRTUAL_DEVICES else [device]
    listed = set(available) | {d.split(".")[0] for d in available}
    return [d for d in names if d not in listed]


def overflow_mode(target: Target, record: Mapping[str, float] | None = None) -> str:
    """The target's ``overflow_fix``, with ``auto`` resolved for a CPU device when this machine's
    CPU saturates u8 x s8 pair sums (no VNNI; a remote device's CPU is not known here: set the
    option for it): saturating when the canonical model carries the calibration's saturation
    ``record`` (:func:`deploykit.quantize.saturation.recorded`), else first_layer; none elsewhere."""
    mode = str(target.options.get("overflow_fix", "auto"))
    if mode != "auto":
        return mode
    local_cpu = device_name(target).startswith("CPU") and not target.device.address
    if not (local_cpu and u8s8_saturates()):
        return "none"
    return "saturating" if record is not None else "first_layer"


def _with_split_check(scales: CheckResult, problems: list[str]) -> CheckResult:
    """scales_match of the IR against the split model, plus the split against the canonical one."""
    import dataclasses

    if not problems:
        return scales
    details = dict(scales.details)
    details["mismatches"] = list(details.get("mismatches", [])) + problems
    return dataclasses.replace(scales, status="fail", value=float(len(details["mismatches"])),
                               message=f"{scales.message}; split convolutions: {'; '.join(problems[:3])}",
                               details=details)


def _saturation_check(record: Mapping[str, float] | None, mode: str, split: list[str]) -> CheckResult:
    """Info: this CPU saturates int16 pair sums; what the split covers and what the canonical
    model's saturation ``record`` says is left (the largest recorded error among the layers not split)."""
    errors = record or {}
    left = {name: e for name, e in errors.items() if name not in split and e > 0}
    worst = max(left, key=lambda n: left[n]) if left else ""
    message = ("this CPU has no VNNI: OpenVINO's u8 x s8 kernels add pairs of products in a saturating int16, so "
               f"outputs can depart from the canonical model (see the fidelity checks); overflow_fix {mode} split "
               f"{len(split)} layer(s)")
    if errors:
        message += (f"; of the rest, the largest recorded saturation error is {left[worst]:.2%} ({worst})" if worst
                    else "; no other layer saturates on the calibration data")
    return CheckResult("int8_saturation", "info", 1.0, message=message + "; a CPU with VNNI computes them exactly",
                       details={"split": list(split), "unsplit_errors": left})


def compile_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """OpenVINO properties from the target's options."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": options.get("performance_hint", "latency").upper()}
    if options.get("num_threads"):
        config["INFERENCE_NUM_THREADS"] = int(options["num_threads"])
    if options.get("num_streams"):
        config["NUM_STREAMS"] = int(options["num_streams"])
    precision = options.get("inference_precision", "f32")
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    if options.get("snippets", "default") == "disable":
        config["SNIPPETS_MODE"] = "DISABLE"
    return config


def _supported_config(core, device: str, config: dict[str, Any]) -> dict[str, Any]:
    """Drop nothing silently: a property the device does not take is a config error."""
    if device.partition(":")[0] in VIRTUAL_DEVICES:
        return config
    supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    if device.partition(".")[0] == "CPU":  # the CPU plugin takes it, but does not list it (ov::intel_cpu)
        supported.add("SNIPPETS_MODE")
    unsupported = [k for k in config if k not in supported]
    if unsupported:
        raise ConfigError(f"OpenVINO device '{device}' does not accept {', '.join(unsupported)}; "
                          "remove the matching options from targets.toml")
    return config


class OpenVINOBackend(Backend):
    name = "openvino"
    description = "OpenVINO IR (.xml + .bin) on OpenVINO CPU / GPU / NPU"
    install_hint = INSTALL_HINT
    artifact_suffix = ".xml"
    activation_profiles = ("symmetric", "asymmetric")  # zero points become FakeQuantize ranges, exactly
    metrics = ("int8_fraction",)
    capabilities = frozenset({Capability.FP32_RUNNER, Capability.LAYER_RUNNER})
    options = {
        "device_name": Option(str, "", "OpenVINO device name (CPU, GPU, GPU.1, NPU, AUTO:GPU,CPU); "
                                  "empty: the targets.toml device kind upper-cased"),
        "performance_hint": Option(str, "latency", "OpenVINO PERFORMANCE_HINT", ("latency", "throughput")),
        "num_threads": Option(int, 0, "INFERENCE_NUM_THREADS; 0 lets OpenVINO choose"),
        "num_streams": Option(int, 0, "NUM_STREAMS; 0 lets the performance hint choose"),
        # f32: the parts the canonical model leaves float run in real FP32, so only the int8
        # parts are int8 and the accuracy checks measure quantization, not bf16 rounding.
        "inference_precision": Option(str, "f32", "INFERENCE_PRECISION_HINT for the float parts; "
                                                  "'default' keeps the device's (bf16 on AVX512-BF16 CPUs)",
                                      ("f32", "bf16", "f16", "default")),
        "overflow_fix": Option(str, "auto", "split convolutions' int8 weights into two halves that cannot saturate "
                                            "the int16 pair sums of CPUs without VNNI (exact, same scales; twice "
                                            "those layers' int8 compute): saturating (the convs whose pair sums "
                                            "saturate on the calibration data, recorded in the canonical model), "
                                            "first_layer (convs reading the model input), all (every "
                                            "non-depthwise conv), none; auto: on a CPU device of a local CPU "
                                            "without VNNI saturating (first_layer for a model without the record), "
                                            "else none",
                               MODES),
        # OpenVINO 2026.4's CPU plugin, on an AVX-512 Xeon with AMX, computed a small int8 encoder's
        # attention wrong at batch 1 only in its fused subgraphs (snippets); batches 2 and up, and
        # the same model with snippets off, were exact (docs/backends/openvino.md)
        "snippets": Option(str, "default", "the CPU plugin's fused subgraphs (SNIPPETS_MODE): default, or disable "
                                           "to run each op alone (a workaround when the fidelity check finds an "
                                           "OpenVINO-fused attention departing from the canonical model)",
                           ("default", "disable")),
        "overflow_threshold": Option((float, int), THRESHOLD, "overflow_fix saturating: split a conv whose recorded "
                                                       "saturation error (relative to its output, on the "
                                                       "calibration data) is above this"),
    }

    # -- availability --------------------------------------------------------------------
    def probe(self, target: Target) -> Availability:
        try:
            ov = _ov()
            core = ov.Core()
            available = list(core.available_devices)
        except BackendUnavailable as exc:
            return Availability.missing(str(exc), INSTALL_HINT)
        versions = {"openvino": ov.get_version()}
        device = device_name(target)
        missing = missing_devices(device, available)
        if missing:
            return Availability(True, False, f"OpenVINO device '{', '.join(missing)}' is not present; "
                                             f"available devices: {', '.join(available) or 'none'}",
                                versions=versions)
        return Availability.ready(**versions)

    def preflight(self, canonical: CanonicalModel, target: Target) -> tuple[list[CheckResult], dict[str, Any]]:
        return [], {"equivalent_command": f"ovc {canonical.path} --output_model <dest>.xml --compress_to_fp16=False",
                    "device": device_name(target), "config": compile_config(target.options)}

    def device_info(self, target: Target) -> dict[str, Any]:
        ov = _ov()
        core = ov.Core()
        device = device_name(target)
        info: dict[str, Any] = {"openvino": ov.get_version(), "device": device,
                                "available_devices": list(core.available_devices)}
        if missing_devices(device, info["available_devices"]):
            return info
        for key in ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES", "INFERENCE_PRECISION_HINT"):
            try:
                value = core.get_property(device, key)
            except RuntimeError:  # not every device (or AUTO) reports every property
                continue
            info[key.lower()] = [str(v) for v in value] if isinstance(value, (list, tuple)) else _text(value)
        if "inference_precision_hint" in info:  # the device default, which deploykit overrides
            info["default_inference_precision"] = info.pop("inference_precision_hint")
        return info

    # -- lowering ------------------------------------------------------------------------
    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        ov = _ov()
        core = ov.Core()
        dest = Path(dest)
        record = saturation.recorded(canonical.model)
        mode = overflow_mode(target, record)
        split = select(canonical.model, mode, record, float(target.options.get("overflow_threshold", THRESHOLD)))
        lowered = split_layers(canonical.model, split) if split else canonical.model
        read, recoded = uint8_operands(lowered)  # the IR reads this; checks compare with ``lowered`` (same grid)
        bin_dest = dest.with_suffix(".bin")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.stem}."))
        try:
            if split or recoded:
                import onnx

                onnx.save(read, str(stage / "lowered.onnx"))
                model = read_onnx(core, stage / "lowered.onnx", read)
            else:
                model = read_onnx(core, canonical.path, canonical.model)
            # FP32 weights stay FP32 (save_model compresses to fp16 by default); int8 weights stay int8.
            ov.save_model(model, stage / "model.xml", compress_to_fp16=False)
            saved = core.read_model(stage / "model.xml")
            from deploykit_openvino.verify import verify_scales

            checks = [_with_split_check(verify_scales(saved, lowered), check_split(canonical.model, lowered, split))
                      if split else verify_scales(saved, canonical.model)]
            audit, audit_meta = self._audit(core, saved, canonical, target, lowered)
            checks.append(audit)
            if device_name(target).startswith("CPU") and u8s8_saturates():
                checks.append(_saturation_check(record, mode, split))
            # the .bin first, the .xml last: a complete .xml means a complete pair
            remove(dest)
            with atomic_output(bin_dest) as tmp:
                os.replace(stage / "model.bin", tmp)
            with atomic_output(dest) as tmp:
                os.replace(stage / "model.xml", tmp)
        except BaseException:
            if not dest.exists():
                remove(bin_dest)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        metadata = {"openvino": ov.get_version(), "device": device_name(target),
                    "config": compile_config(target.options), "compress_to_fp16": False,
                    "fake_quantize": sum(op.get_type_name() == "FakeQuantize" for op in saved.get_ordered_ops()),
                    "overflow_fix": mode, "split_layers": split, "uint8_operands": recoded,
                    **audit_meta}
        return Artifact(self.name, dest, (dest, bin_dest), metadata, tuple(checks))

    def _audit(self, core, model, canonical: CanonicalModel, target,
               lowered: Any = None) -> tuple[CheckResult, dict[str, Any]]:
        """Compile once on the target device and read the precision each compute layer runs in
        (read against ``lowered``, the ONNX model read, when it is not the canonical one; a split
        convolution is one row, int8 when both halves are)."""
        from deploykit_openvino.verify import runtime_layers

        device = device_name(target)
        missing = missing_devices(device, list(core.available_devices))
        if missing:
            return CheckResult("int8_fraction", "not_run",
                               message=f"OpenVINO device '{device}' not present here: the audit needs to compile on it"), {}
        config = _supported_config(core, device, compile_config(target.options))
        try:
            compiled = core.compile_model(_static_batch(model, 1), device, config)
        except RuntimeError as exc:  # read fine, but the device plugin rejects a layer
            detail = next((l.strip() for l in reversed(str(exc).splitlines()) if l.strip()), str(exc))
            raise LoweringError(f"OpenVINO cannot compile {canonical.path} for {device}: {detail}") from None
        layers = runtime_layers(compiled.get_runtime_model(), canonical.model if lowered is None else lowered)
        if lowered is not None:
            layers = merge_halves(layers)
        try:
            precision = _text(compiled.get_property("INFERENCE_PRECISION_HINT"))
        except RuntimeError:  # AUTO and some plugins do not report it
            precision = ""
        floats = model_float_layers(canonical.model)
        return precision_audit(layers, floats), {"compiled_inference_precision": precision,
                                                 "activation_profile": model_profile(canonical.model),
                                                 "float_layers": floats}

    # -- running -------------------------------------------------------------------------
    def load(self, artifact: Artifact, target: Target) -> Runner:
        ov = _ov()
        core = ov.Core()
        device = device_name(target)
        missing = missing_devices(device, list(core.available_devices))
        if missing:
            raise BackendUnavailable(f"target '{target.name}': OpenVINO device '{', '.join(missing)}' is not present; "
                                     f"available devices: {', '.join(core.available_devices) or 'none'}")
        config = _supported_config(core, device, compile_config(target.options))
        return OpenVINORunner(core, core.read_model(artifact.path), device, config)

    def fp32_runner(self, canonical: CanonicalModel, target: Target, workdir: Path | None = None) -> "OpenVINORunner":
        """The FP32 model on the same device and options, in real FP32 (INFERENCE_PRECISION_HINT=f32,
        not the CPU's bf16 default): the fair baseline for an OpenVINO speed-up."""
        ov = _ov()
        core = ov.Core()
        device = device_name(target)
        config = _supported_config(core, device, compile_config({**target.options, "inference_precision": "f32"}))
        return OpenVINORunner(core, read_onnx(core, Path(canonical.fp32_path)), device, config)


    def layer_runner(self, artifact: Artifact, canonical: CanonicalModel, target: Target, cut: Any) -> Any:
        """The saved IR itself cut at every canonical int8 tensor (deploykit_openvino.layers),
        compiled with the target's configuration: what the artifact computes for each layer
        from the canonical inputs."""
        from deploykit_openvino.layers import IrLayerRunner

        ov = _ov()
        core = ov.Core()
        device = device_name(target)
        missing = missing_devices(device, list(core.available_devices))
        if missing:
            raise BackendUnavailable(f"target '{target.name}': OpenVINO device '{', '.join(missing)}' is not present")
        config = _supported_config(core, device, compile_config(target.options))
        return IrLayerRunner(core, core.read_model(artifact.path), cut, device, config)


def _text(value: Any) -> str:
    """ov.Type prints as "<Type: 'bfloat16'>"; its short name is "bf16"."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def read_onnx(core, path: Path, model_proto=None):
    """Read an ONNX model; an op OpenVINO cannot convert becomes a LoweringError naming its nodes."""
    try:
        return core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError or OpConversionFailure
        text = str(exc)
        if model_proto is None:
            import onnx

            model_proto = onnx.load(str(path), load_external_data=False)
        nodes = _failed_nodes(text, model_proto)
        if nodes:
            where = ", ".join(f"node '{n}' (op {op})" for n, op in nodes[:5])
            more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
            raise LoweringError(f"OpenVINO cannot read {where}{more} in {path}: replace the op or "
                                "decompose it into standard ONNX ops before quantizing") from None
        summary = " ".join(line.strip() for line in text.splitlines() if line.strip().startswith("--")) or text.splitlines()[-1]
        raise LoweringError(f"OpenVINO cannot read {path}: {summary}") from None


def _failed_nodes(text: str, model_proto) -> list[tuple[str, str]]:
    """Nodes whose op the OpenVINO error names ("com.example.FancyOp", "Conv ... failed")."""
    mentioned = set(re.findall(r"[A-Za-z_][\w.]*", " ".join(line for line in text.splitlines() if "--" in line)))
    out = []
    for node in model_proto.graph.node:
        qualified = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        if qualified in mentioned:
            out.append((node.name or node.output[0], qualified))
    return out


def _static_batch(model, batch: int):
    """A copy with every dynamic batch dimension fixed (CPU kernels are fastest on static shapes)."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_dynamic:
            shapes[port.any_name] = [batch] + [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
    if not shapes:
        return model
    clone = model.clone()
    clone.reshape(shapes)
    return clone


class OpenVINORunner(Runner):
    """Runs an IR; compiles once per input-shape signature so any batch size works at full speed."""

    def __init__(self, core, model, device: str, config: Mapping[str, Any]) -> None:
        self.core = core
        self.model = model
        self.device = device
        self.config = dict(config)
        self.input_names = [p.any_name for p in model.inputs]
        self._requests: dict[tuple, Any] = {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.input_names, feeds)
        arrays = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        key = tuple((n, a.shape, a.dtype.str) for n, a in arrays.items())
        request = self._requests.get(key) or self._compile(key, arrays)
        results = request.infer(arrays)
        return [np.array(results[port]) for port in request.model_outputs]

    def close(self) -> None:
        self._requests.clear()  # the compiled models and their device memory go with the requests

    def compiled_models(self) -> list:
        """The compiled models so far, one per input shape (for audits and properties)."""
        return [request.get_compiled_model() for request in self._requests.values()]

    def _compile(self, key: tuple, arrays: Mapping[str, np.ndarray]):
        shapes = {}
        for port in self.model.inputs:
            name = port.any_name
            want = port.get_partial_shape()
            got = arrays[name].shape
            if want.rank.is_static and (want.rank.get_length() != len(got) or any(
                    d.is_static and d.get_length() != g for d, g in zip(want, got))):
                raise ValueError(f"input '{name}' has shape {list(got)}; the model expects {want}")
            shapes[name] = list(got)
        model = self.model.clone()
        model.reshape(shapes)
        compiled = self.core.compile_model(model, self.device, self.config)
        request = compiled.create_infer_request()
        if len(self._requests) >= MAX_COMPILED_SHAPES:
            self._requests.pop(next(iter(self._requests)))
        self._requests[key] = request
        return request
