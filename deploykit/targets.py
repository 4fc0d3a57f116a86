"""targets.toml: devices, targets (backend + device + options + thresholds), calibration and
preprocessing defaults. Every key is validated here, at the config boundary; errors name the
file, the table and the key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from deploykit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from deploykit.plugins import Registry

#: Metrics every target reports; thresholds are ``min_<metric>`` / ``max_<metric>``.
CORE_METRICS = (
    "top1_agreement", "top5_agreement", "cosine", "rel_l2", "max_abs_error",
    "accuracy", "accuracy_drop",
    "fidelity_cosine", "fidelity_rel_l2", "fidelity_max_abs",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput", "memory_mb", "speedup",
)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")

_DEVICE_KEYS = {"kind": str, "description": str, "address": str}
_TARGET_KEYS = {"backend": str, "device": str, "description": str, "batch_sizes": list,
                "warmup": int, "runs": int, "options": dict, "thresholds": dict}
_CALIB_KEYS = {"method": str, "samples": int, "percentile": float, "data": str, "eval": str,
               "batch_size": int, "seed": int, "recipe": str}
_PREPROCESS_KEYS = {"resize": int, "crop": int, "mean": list, "std": list, "layout": str,
                    "scale": float, "color": str}
_QUANT_KEYS = {"activations": str, "keep_float": list}
ACTIVATION_PROFILES = ("symmetric", "asymmetric")
_TOP_KEYS = {"devices", "targets", "calibration", "quantization", "preprocess", "defaults"}
_DEFAULT_KEYS = {"warmup": int, "runs": int, "batch_sizes": list}


@dataclass(frozen=True)
class Device:
    name: str
    kind: str = "cpu"
    description: str = ""
    address: str = ""  # a remote deploykit agent; empty means this machine


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: Device
    options: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int = 100
    description: str = ""


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize shorter side, centre crop, /scale, (x-mean)/std, layout."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 255.0
    layout: str = "NCHW"
    color: str = "RGB"  # RGB or L (grayscale)


@dataclass(frozen=True)
class Calibration:
    method: str = "minmax"  # best of the four on every real network measured (docs/accuracy.md)
    samples: int = 512
    percentile: float = 99.99
    data: str | None = None
    eval: str | None = None
    batch_size: int = 8
    seed: int = 0
    #: accuracy-recovering recipe (deploykit/quantize/recipes.py); auto: measured best per network kind
    recipe: str = "auto"


@dataclass(frozen=True)
class Quantization:
    """``[quantization]``: the activation profile (None: chosen from the targets) and the
    float islands (node names, op types or globs)."""

    activations: str | None = None
    keep_float: tuple[str, ...] = ()


@dataclass
class TargetsFile:
    path: Path | None
    devices: dict[str, Device]
    raw_targets: dict[str, dict[str, Any]]
    calibration: Calibration = field(default_factory=Calibration)
    quantization: Quantization = field(default_factory=Quantization)
    preprocess: Preprocess | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def where(self, table: str, key: str | None = None) -> str:
        loc = f"{self.path or 'targets.toml'} [{table}]"
        return f"{loc} key '{key}'" if key else loc

    def resolve(self, names: list[str], registry: "Registry") -> list[Target]:
        """Turn command-line target names into validated targets.

        A name is an entry of ``[targets]``; a bare backend name works when no entry has it.
        """
        out = []
        for name in names:
            if name in self.raw_targets:
                out.append(self._target(name, self.raw_targets[name], registry))
            elif name in registry.backends:
                out.append(self._target(name, {"backend": name}, registry))
            else:
                entries = ", ".join(sorted(self.raw_targets)) or "none"
                backends = ", ".join(registry.names()) or "none"
                raise ConfigError(
                    f"unknown target '{name}': not an entry of {self.path or 'targets.toml'} "
                    f"(entries: {entries}) nor a backend (backends: {backends})"
                )
        return out

    def all_targets(self, registry: "Registry") -> list[Target]:
        return [self._target(n, raw, registry) for n, raw in self.raw_targets.items()]

    def _target(self, name: str, raw: dict[str, Any], registry: "Registry") -> Target:
        table = f"targets.{name}"
        _check_keys(raw, _TARGET_KEYS, self.where(table))
        backend_name = raw.get("backend")
        if not backend_name:
            raise ConfigError(f"{self.where(table, 'backend')} is missing: name one of {', '.join(registry.names())}")
        if backend_name not in registry.backends:
            raise ConfigError(
                f"{self.where(table, 'backend')}: unknown backend '{backend_name}' "
                f"(registered: {', '.join(registry.names()) or 'none'}); see 'deploykit backends'"
            )
        backend = registry.backends[backend_name]
        device_name = raw.get("device", "local")
        if device_name in self.devices:
            device = self.devices[device_name]
        elif device_name == "local" or "device" not in raw:
            device = Device("local", "cpu", "this machine")
        else:
            raise ConfigError(
                f"{self.where(table, 'device')}: unknown device '{device_name}'; define "
                f"[devices.{device_name}] (known: {', '.join(sorted(self.devices)) or 'none'})"
            )
        options = _validate_options(raw.get("options", {}), backend.options, self.where(f"{table}.options"))
        thresholds = _validate_thresholds(raw.get("thresholds", {}), CORE_METRICS + tuple(backend.metrics),
                                          self.where(f"{table}.thresholds"))
        batch_sizes = raw.get("batch_sizes", self.defaults.get("batch_sizes", [1]))
        if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
            raise ConfigError(f"{self.where(table, 'batch_sizes')} must be a non-empty list of positive integers")
        warmup = raw.get("warmup", self.defaults.get("warmup", 10))
        runs = raw.get("runs", self.defaults.get("runs", 100))
        if warmup < 0:
            raise ConfigError(f"{self.where(table, 'warmup')} must be >= 0")
        if runs < 1:
            raise ConfigError(f"{self.where(table, 'runs')} must be >= 1")
        return Target(name, backend_name, device, options, thresholds, tuple(batch_sizes), warmup, runs,
                      raw.get("description", ""))


def load_targets(path: Path | str | None) -> TargetsFile:
    """Read and validate a targets.toml (``None``: an empty configuration)."""
    if path is None:
        return TargetsFile(None, {}, {})
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: targets file not found; pass --targets-file or create targets.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    tf = TargetsFile(path, {}, {})
    _check_keys(data, {k: dict for k in _TOP_KEYS}, f"{path} (top level)")
    for name, raw in data.get("devices", {}).items():
        where = tf.where(f"devices.{name}")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        _check_keys(raw, _DEVICE_KEYS, where)
        tf.devices[name] = Device(name, raw.get("kind", "cpu"), raw.get("description", ""), raw.get("address", ""))
    for name, raw in data.get("targets", {}).items():
        if not isinstance(raw, dict):
            raise ConfigError(f"{tf.where(f'targets.{name}')} must be a table")
        tf.raw_targets[name] = raw
    if "defaults" in data:
        _check_keys(data["defaults"], _DEFAULT_KEYS, tf.where("defaults"))
        tf.defaults = dict(data["defaults"])
    if "calibration" in data:
        raw = data["calibration"]
        _check_keys(raw, _CALIB_KEYS, tf.where("calibration"))
        if raw.get("method", "minmax") not in CALIBRATION_METHODS:
            raise ConfigError(f"{tf.where('calibration', 'method')}: '{raw['method']}' is not one of {', '.join(CALIBRATION_METHODS)}")
        if not 0 < raw.get("percentile", 99.99) <= 100:
            raise ConfigError(f"{tf.where('calibration', 'percentile')} must be in (0, 100]")
        for key in ("samples", "batch_size"):
            if raw.get(key, 1) < 1:
                raise ConfigError(f"{tf.where('calibration', key)} must be >= 1")
        tf.calibration = Calibration(**raw)
    if "quantization" in data:
        raw = data["quantization"]
        _check_keys(raw, _QUANT_KEYS, tf.where("quantization"))
        profile = raw.get("activations")
        if profile is not None and profile not in ACTIVATION_PROFILES:
            raise ConfigError(f"{tf.where('quantization', 'activations')}: '{profile}' is not one of "
                              f"{', '.join(ACTIVATION_PROFILES)}")
        keep = raw.get("keep_float", [])
        if not all(isinstance(k, str) and k.strip() for k in keep):
            raise ConfigError(f"{tf.where('quantization', 'keep_float')} must be a list of node names, op types "
                              f"or globs (non-empty strings)")
        tf.quantization = Quantization(profile, tuple(keep))
    if "preprocess" in data:
        tf.preprocess = parse_preprocess(data["preprocess"], tf.where("preprocess"))
    return tf


def parse_preprocess(raw: Mapping[str, Any], where: str) -> Preprocess:
    _check_keys(raw, _PREPROCESS_KEYS, where)
    layout = raw.get("layout", "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"{where} key 'layout': '{layout}' is not NCHW or NHWC")
    color = raw.get("color", "RGB")
    if color not in ("RGB", "L"):
        raise ConfigError(f"{where} key 'color': '{color}' is not RGB or L")
    for key in ("resize", "crop"):
        if key in raw and raw[key] <= 0:
            raise ConfigError(f"{where} key '{key}' must be a positive integer")
    std = tuple(float(s) for s in raw.get("std", [1.0]))
    if any(s == 0 for s in std):
        raise ConfigError(f"{where} key 'std' must not contain 0")
    return Preprocess(raw.get("resize"), raw.get("crop"), tuple(float(m) for m in raw.get("mean", [0.0])), std,
                      float(raw.get("scale", 255.0)), layout, color)


def _check_keys(raw: Mapping[str, Any], allowed: Mapping[str, type], where: str) -> None:
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
        expected = allowed[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else (
            isinstance(value, expected) and not (expected is int and isinstance(value, bool)))
        if not ok:
            raise ConfigError(f"{where} key '{key}': expected {expected.__name__}, got {type(value).__name__} {value!r}")


def _validate_options(raw: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    out = {name: opt.default for name, opt in schema.items()}
    for key, value in raw.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise ConfigError(f"{where}: unknown key '{key}' (this backend accepts: {allowed})")
        opt = schema[key]
        types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where} key '{key}': expected {names}, got {value!r}")
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{where} key '{key}': {value!r} is not one of {', '.join(map(str, opt.choices))}")
        out[key] = value
    return out


def _validate_thresholds(raw: Mapping[str, Any], metrics: tuple[str, ...], where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    out = {}
    for key, value in raw.items():
        bound, _, metric = key.partition("_")
        if bound not in ("min", "max") or metric not in metrics:
            known = ", ".join(f"min_/max_{m}" for m in metrics)
            raise ConfigError(f"{where}: unknown key '{key}' (thresholds are {known})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} key '{key}': expected a number, got {value!r}")
        out[key] = float(value)
    return out
