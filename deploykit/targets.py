"""targets.toml: devices, targets (backend + device + options + thresholds), calibration and
preprocessing defaults. A pure parser: every key's type and range is checked here, at the
config boundary, with errors naming the file, the table and the key. Which backend a target
names, and whether its options and thresholds suit that backend, is the registry's job
(:meth:`deploykit.plugins.Registry.resolve`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomllib

from deploykit.errors import ConfigError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")

_DEVICE_KEYS = {"kind": str, "description": str, "address": str, "token_env": str, "timeout": float}
#: where a remote device's agent token comes from when ``token_env`` is not given
DEFAULT_TOKEN_ENV = "DEPLOYKIT_AGENT_TOKEN"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    address: str = ""  # a remote deploykit agent (http[s]://host:port); empty means this machine
    #: the environment variable holding the agent's token (never the token itself: docs/agent.md)
    token_env: str = ""
    timeout: float = 1800.0  # seconds one check job may take on the device before its target fails


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

    def target(self, name: str, raw: Mapping[str, Any] | None = None) -> Target:
        """The ``[targets.<name>]`` entry (or ``raw``, e.g. ``{"backend": name}`` for a bare
        backend name) parsed, its device resolved; ``options`` and ``thresholds`` come back as
        written, for the registry to check against the backend."""
        raw = self.raw_targets[name] if raw is None else raw
        table = f"targets.{name}"
        _check_keys(raw, _TARGET_KEYS, self.where(table))
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
        batch_sizes = raw.get("batch_sizes", self.defaults.get("batch_sizes", [1]))
        if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
            raise ConfigError(f"{self.where(table, 'batch_sizes')} must be a non-empty list of positive integers")
        warmup = raw.get("warmup", self.defaults.get("warmup", 10))
        runs = raw.get("runs", self.defaults.get("runs", 100))
        if warmup < 0:
            raise ConfigError(f"{self.where(table, 'warmup')} must be >= 0")
        if runs < 1:
            raise ConfigError(f"{self.where(table, 'runs')} must be >= 1")
        return Target(name, raw.get("backend", ""), device, dict(raw.get("options", {})),
                      dict(raw.get("thresholds", {})), tuple(batch_sizes), warmup, runs, raw.get("description", ""))


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
        tf.devices[name] = _device(name, raw, where)
    for name, raw in data.get("targets", {}).items():
        from deploykit.outdir import check_name  # a target name becomes a folder name in --out

        check_name(name, f"{path} [targets.{name!r}]: target")
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
        percentile = raw.get("percentile", 99.99)
        if not (math.isfinite(percentile) and 0 < percentile <= 100):
            raise ConfigError(f"{tf.where('calibration', 'percentile')} must be in (0, 100], got {percentile}")
        for key in ("samples", "batch_size"):
            if raw.get(key, 1) < 1:
                raise ConfigError(f"{tf.where('calibration', key)} must be >= 1")
        if not 0 <= raw.get("seed", 0) < 2**32:
            raise ConfigError(f"{tf.where('calibration', 'seed')} must be in [0, 2**32)")
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


def _device(name: str, raw: Mapping[str, Any], where: str) -> Device:
    if "token" in raw:  # a secret in a file that gets committed and copied around: refused, not read
        raise ConfigError(f"{where} key 'token': never write the agent token into targets.toml; put it in an "
                          f"environment variable and name that variable with token_env = \"{DEFAULT_TOKEN_ENV}\"")
    _check_keys(raw, _DEVICE_KEYS, where)
    address = normalise_address(raw.get("address", ""), f"{where} key 'address'")
    token_env = raw.get("token_env", DEFAULT_TOKEN_ENV if address else "")
    if token_env and not _ENV_NAME.fullmatch(token_env):
        raise ConfigError(f"{where} key 'token_env': {token_env!r} is not an environment variable name "
                          f"(e.g. {DEFAULT_TOKEN_ENV}); it names where the token is, it is not the token")
    timeout = float(raw.get("timeout", Device.timeout))
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"{where} key 'timeout' must be a positive number of seconds")
    return Device(name, raw.get("kind", "cpu"), raw.get("description", ""), address, token_env, timeout)


def normalise_address(address: str, where: str) -> str:
    """A device agent's base URL: ``http(s)://host:port`` (a bare ``host:port`` means http)."""
    if not address:
        return ""
    from urllib.parse import urlsplit

    url = address if "://" in address else f"http://{address}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {address!r} is not an agent address ({exc}); write http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: {address!r} is not an agent address; write http://HOST:PORT or "
                          f"https://HOST:PORT (no path, no user:password)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


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
    for key in ("mean", "std"):
        values = raw.get(key, [0.0])
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                 for v in values):
            raise ConfigError(f"{where} key '{key}' must be a non-empty list of finite numbers, got {values!r}")
    std = tuple(float(s) for s in raw.get("std", [1.0]))
    if any(s == 0 for s in std):
        raise ConfigError(f"{where} key 'std' must not contain 0")
    if "scale" in raw and not (math.isfinite(raw["scale"]) and raw["scale"] > 0):
        raise ConfigError(f"{where} key 'scale' must be a positive number")
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
