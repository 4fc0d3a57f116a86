"""Lowering with TensorRT's Python API (10.x and 11.x): ONNX parser -> strongly typed network ->
builder config -> serialized engine. Imported only when TensorRT is installed.

TensorRT 11 removed implicit INT8 (calibrators, the INT8 builder flag) and made every network
strongly typed; the canonical model's Q/DQ nodes are exactly what that path needs, so the
model is parsed as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from deploykit.errors import LoweringError
from deploykit.fileio import atomic_output
from deploykit_tensorrt.settings import BuildSettings

_HARDWARE_ENUM = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


@dataclass(frozen=True)
class BuiltEngine:
    engine: bytes
    build_seconds: float
    timing_cache: Path | None  # where the timing cache was read from and written back
    timing_cache_loaded: bool  # a cache from an earlier build was used
    engine_information: str  # engine inspector JSON (ProfilingVerbosity.DETAILED)
    warnings: tuple[str, ...]


def _trt():
    import tensorrt as trt  # noqa: PLC0415 - vendor SDK, lazily

    return trt


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _logger(trt):
    class CollectingLogger(trt.ILogger):
        """Keeps TensorRT's errors and warnings so a failure can say what TensorRT said."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif int(severity) == int(trt.ILogger.Severity.WARNING):
                self.warnings.append(str(msg))

    return CollectingLogger()


def _parser_error(parser) -> str:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return "TensorRT's ONNX parser failed without saying why"
    first = errors[0]
    node = getattr(first, "node_name", lambda: "")() or f"#{first.node()}"
    op = getattr(first, "node_operator", lambda: "")() or "?"
    more = f" (+{len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"TensorRT's ONNX parser rejected node '{node}' ({op}): {first.desc()}{more}; run the TensorRT "
            f"pre-flight (deploykit inspect --lint) and fix the canonical model")


def create_network(trt, builder, strongly_typed: bool):
    flags = 0
    if strongly_typed and _major(trt) < 11:  # TensorRT 11: always strongly typed, the flag is deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if not strongly_typed and _major(trt) >= 11:
        raise LoweringError(f"strongly_typed = false is impossible with TensorRT {trt.__version__}: TensorRT 11 "
                            "removed weakly typed networks and implicit INT8; remove the option")
    return builder.create_network(flags)


def parser_supports(model_path: Path, op_types: list[str]) -> dict[str, bool] | None:
    """Ask the installed parser about every op type; None when TensorRT cannot start a builder here."""
    try:
        trt = _trt()
        logger = _logger(trt)
        builder = trt.Builder(logger)
        network = create_network(trt, builder, True)
        parser = trt.OnnxParser(network, logger)
        return {op: bool(parser.supports_operator(op)) for op in op_types if "::" not in op}
    except Exception:  # no CUDA device, or a broken install: the data table stays the answer
        return None


def _configure(trt, builder, settings: BuildSettings):
    config = builder.create_builder_config()
    if not settings.strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # TensorRT 10's weakly typed path needs it for Q/DQ layers
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_optimization_level
    level = getattr(trt.HardwareCompatibilityLevel, _HARDWARE_ENUM[settings.hardware_compatibility_level], None)
    if level is None:  # SAME_COMPUTE_CAPABILITY arrived in TensorRT 10.9
        raise LoweringError(f"hardware_compatibility_level = \"{settings.hardware_compatibility_level}\" is not "
                            f"available in TensorRT {trt.__version__}; use \"none\" or \"ampere_plus\", or upgrade")
    config.hardware_compatibility_level = level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it for the int8 audit
    if settings.profiles:
        profile = builder.create_optimization_profile()
        for p in settings.profiles:
            profile.set_shape(p.input, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    if settings.dla_core >= 0:
        cores = int(getattr(builder, "num_DLA_cores", 0))
        if settings.dla_core >= cores:
            raise LoweringError(f"dla_core = {settings.dla_core} but this device has {cores} DLA core(s); "
                                "set dla_core = -1 off Jetson/DRIVE, or a core index below the count")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
        if settings.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def build_engine(model_path: Path, settings: BuildSettings, timing_cache: Path | None) -> BuiltEngine:
    """Parse, configure and build; the timing cache (if any) is loaded first and saved after."""
    trt = _trt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = create_network(trt, builder, settings.strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        raise LoweringError(_parser_error(parser))
    config = _configure(trt, builder, settings)

    loaded = False
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        loaded = bool(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        said = "; ".join(logger.errors[-3:]) or "no error message"
        raise LoweringError(f"TensorRT could not build an engine from {model_path.name}: {said}")
    engine = bytes(memoryview(serialized))

    if timing_cache is not None:
        with atomic_output(timing_cache) as tmp:  # concurrent builds each replace the whole file
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))

    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(engine)
    if cuda_engine is None:
        raise LoweringError(f"TensorRT built an engine it cannot load: {'; '.join(logger.errors[-3:])}")
    info = cuda_engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return BuiltEngine(engine, seconds, timing_cache, loaded, info, tuple(logger.warnings[-20:]))
