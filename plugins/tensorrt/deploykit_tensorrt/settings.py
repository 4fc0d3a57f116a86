"""Build settings from a target's options, and the equivalent ``trtexec`` command.

Pure Python: runs without TensorRT, so pre-flight can print the exact command a Jetson user
would run and the Python build uses the very same values.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import onnx

from deploykit.backend import input_names
from deploykit.errors import LoweringError

if TYPE_CHECKING:  # pragma: no cover
    from deploykit.targets import Target

#: option value -> trtexec's spelling (sampleOptions.cpp: none | ampere+ | sameComputeCapability)
HARDWARE_LEVELS = {"none": "none", "ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}
PROFILE_KEYS = ("min", "opt", "max")


@dataclass(frozen=True)
class Profile:
    """An optimisation profile of one input: the shapes TensorRT tunes for and accepts."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildSettings:
    workspace_mib: int
    profiles: tuple[Profile, ...]  # one per dynamic input, in model input order
    builder_optimization_level: int
    hardware_compatibility_level: str
    dla_core: int  # -1: no DLA
    gpu_fallback: bool
    timing_cache: bool
    strongly_typed: bool


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Graph input name -> shape with -1 for every dynamic dimension."""
    names = set(input_names(model))
    shapes = {}
    for value in model.graph.input:
        if value.name not in names:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
    return shapes


def _where(target: "Target", key: str | None = None) -> str:
    loc = f"targets.toml [targets.{target.name}.options]"
    return f"{loc} key '{key}'" if key else loc


def _suggest(shape: tuple[int, ...], batch_sizes: tuple[int, ...]) -> dict[str, list]:
    """A profile to paste: the batch dimension from the target's batch_sizes, other unknowns as N."""
    def fill(batch: int) -> list:
        return [(batch if i == 0 else "N") if d < 0 else d for i, d in enumerate(shape)]
    return {"min": fill(min(batch_sizes)), "opt": fill(min(batch_sizes)), "max": fill(max(batch_sizes))}


def _toml(profile: Mapping[str, list]) -> str:
    return ", ".join(f"{k} = [{', '.join(map(str, v))}]" for k, v in profile.items())


def resolve_profiles(model: onnx.ModelProto, target: "Target") -> tuple[Profile, ...]:
    """Check the ``profiles`` option against the model's dynamic inputs (LoweringError if not usable)."""
    raw = target.options.get("profiles") or {}
    shapes = input_shapes(model)
    unknown = sorted(set(raw) - set(shapes))
    if unknown:
        raise LoweringError(f"{_where(target, 'profiles')}: no model input named {', '.join(map(repr, unknown))} "
                            f"(inputs: {', '.join(shapes)})")
    profiles = []
    for name, shape in shapes.items():
        dynamic = [i for i, d in enumerate(shape) if d < 0]
        if name not in raw:
            if dynamic == [0]:
                # only the batch is dynamic: the target's batch_sizes say what the engine must take
                fill = lambda b: (b, *shape[1:])  # noqa: E731
                profiles.append(Profile(name, fill(min(target.batch_sizes)), fill(target.batch_sizes[0]),
                                        fill(max(target.batch_sizes))))
                continue
            if dynamic:
                hint = _toml(_suggest(shape, target.batch_sizes))
                raise LoweringError(
                    f"input '{name}' has dynamic dimension(s) {dynamic} and no optimisation profile: set "
                    f"profiles.{name}.min, profiles.{name}.opt and profiles.{name}.max in {_where(target)}, e.g. "
                    f"profiles = {{ {name} = {{ {hint} }} }}")
            continue
        entry = raw[name]
        if not isinstance(entry, Mapping) or set(entry) != set(PROFILE_KEYS):
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise LoweringError(f"{_where(target, f'profiles.{name}')} must be a table with exactly min, opt, max "
                                f"(got {got})")
        dims = {}
        for key in PROFILE_KEYS:
            value = entry[key]
            if (not isinstance(value, list) or len(value) != len(shape)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise LoweringError(f"{_where(target, f'profiles.{name}.{key}')} must list {len(shape)} positive "
                                    f"integers (input shape {list(shape)}), got {value!r}")
            fixed = [i for i, d in enumerate(shape) if d > 0 and value[i] != d]
            if fixed:
                raise LoweringError(f"{_where(target, f'profiles.{name}.{key}')} = {value} changes static "
                                    f"dimension(s) {fixed} of input shape {list(shape)}")
            dims[key] = tuple(value)
        if not all(a <= b <= c for a, b, c in zip(dims["min"], dims["opt"], dims["max"])):
            raise LoweringError(f"{_where(target, f'profiles.{name}')}: need min <= opt <= max in every dimension, "
                                f"got min={list(dims['min'])} opt={list(dims['opt'])} max={list(dims['max'])}")
        if dynamic and dynamic[0] == 0:
            outside = [b for b in target.batch_sizes if not dims["min"][0] <= b <= dims["max"][0]]
            if outside:
                raise LoweringError(f"{_where(target, f'profiles.{name}')}: batch sizes {outside} of the target lie "
                                    f"outside the profile's batch range [{dims['min'][0]}, {dims['max'][0]}]")
        profiles.append(Profile(name, dims["min"], dims["opt"], dims["max"]))
    return tuple(profiles)


def build_settings(model: onnx.ModelProto, target: "Target") -> BuildSettings:
    opts: Mapping[str, Any] = target.options
    workspace = int(opts.get("workspace_mib", 1024))
    if workspace <= 0:
        raise LoweringError(f"{_where(target, 'workspace_mib')} must be a positive number of MiB, got {workspace}")
    level = int(opts.get("builder_optimization_level", 3))
    if not 0 <= level <= 5:
        raise LoweringError(f"{_where(target, 'builder_optimization_level')} must be 0-5, got {level}")
    dla_core = int(opts.get("dla_core", -1))
    if dla_core < -1:
        raise LoweringError(f"{_where(target, 'dla_core')} must be -1 (no DLA) or a DLA core index, got {dla_core}")
    hardware = opts.get("hardware_compatibility_level", "none")
    if hardware not in HARDWARE_LEVELS:
        raise LoweringError(f"{_where(target, 'hardware_compatibility_level')}: {hardware!r} is not one of "
                            f"{', '.join(HARDWARE_LEVELS)}")
    return BuildSettings(workspace, resolve_profiles(model, target), level, hardware, dla_core,
                         bool(opts.get("gpu_fallback", True)), bool(opts.get("timing_cache", True)),
                         bool(opts.get("strongly_typed", True)))


def _shape_spec(profiles: tuple[Profile, ...], which: str) -> str:
    return ",".join(f"{p.input}:{'x'.join(map(str, getattr(p, which)))}" for p in profiles)


def trtexec_command(canonical_path: Path | str, engine_path: Path | str, settings: BuildSettings,
                    timing_cache_file: Path | str | None) -> str:
    """The trtexec invocation that builds the same engine as :func:`lowering.build_engine`."""
    args = ["trtexec", f"--onnx={canonical_path}", f"--saveEngine={engine_path}"]
    # A strongly typed network takes its int8 from the Q/DQ nodes; the legacy path needs --int8.
    args.append("--stronglyTyped" if settings.strongly_typed else "--int8")
    if settings.profiles:
        for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            args.append(f"{flag}={_shape_spec(settings.profiles, which)}")
    args += [f"--memPoolSize=workspace:{settings.workspace_mib}M",
             f"--builderOptimizationLevel={settings.builder_optimization_level}",
             f"--hardwareCompatibilityLevel={HARDWARE_LEVELS[settings.hardware_compatibility_level]}",
             "--profilingVerbosity=detailed"]  # the Python build keeps layer details for the int8 audit
    if settings.dla_core >= 0:
        args.append(f"--useDLACore={settings.dla_core}")
        if settings.gpu_fallback:
            args.append("--allowGPUFallback")
    if settings.timing_cache and timing_cache_file is not None:
        args.append(f"--timingCacheFile={timing_cache_file}")
    return " ".join(shlex.quote(a) for a in args)
