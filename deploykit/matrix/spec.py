"""matrix.toml: the models (each with its calibration and evaluation data) and the axes of a
benchmark matrix. Every key is validated here; errors name the file, the table and the key.

::

    [[models]]
    name = "resnet"                 # optional, default: the file's stem
    path = "resnet.onnx"            # relative to the spec file
    calib = "resnet_calib.npz"      # .npy/.npz or an image folder (module:function needs --allow-code)
    eval = "resnet_eval.npz"        # optional, default: the calibration data
    task = "auto"                   # optional: classification | other | auto

    [matrix]
    targets = ["onnxruntime", "openvino", "tflite"]   # entries of targets.toml, or backend names
    batch_sizes = [1, 8]
    precisions = ["fp32", "int8"]   # fp32 | fp16 | int8
    targets_file = "targets.toml"   # optional, relative to the spec; default ./targets.toml if present
    # calibration: by default exactly what `deploykit build` does with the same targets file
    # ([calibration] method, samples, recipe; the activation profile chosen from the targets)
    method = "minmax"               # optional: minmax | percentile | entropy | mse
    recipe = "auto"                 # optional: an accuracy-recovering recipe (docs/recipes.md)
    activations = "symmetric"       # optional: symmetric | asymmetric
    calib_samples = 512             # optional: calibration samples
    eval_samples = 500              # evaluation samples (accuracy)
    rounds = 5                      # interleaved timing rounds
    warmup = 5                      # calls before the first round
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from deploykit.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
METHODS = ("minmax", "percentile", "entropy", "mse")
TASKS = ("auto", "classification", "other")
_MODEL_KEYS: dict[str, type] = {"name": str, "path": str, "calib": str, "eval": str, "task": str}
_MATRIX_KEYS: dict[str, type] = {"targets": list, "batch_sizes": list, "precisions": list, "targets_file": str, "method": str,
                "recipe": str, "activations": str, "calib_samples": int, "eval_samples": int, "rounds": int, "warmup": int, "min_round_ms": float}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    calib: str | None  # a path (resolved against the spec's folder) or module:function
    eval: str | None
    task: str = "auto"


@dataclass(frozen=True)
class MatrixSpec:
    path: Path | None
    models: tuple[ModelSpec, ...]
    targets: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (1,)
    precisions: tuple[str, ...] = ("fp32", "int8")
    targets_file: Path | None = None
    method: str | None = None  # None: the targets file's [calibration] method, as the build
    recipe: str | None = None  # None: the targets file's [calibration] recipe (default auto)
    activations: str | None = None  # None: [quantization] activations, else chosen from the targets
    calib_samples: int | None = None  # None: the targets file's [calibration] samples
    eval_samples: int = 500
    rounds: int = 5
    warmup: int = 5
    min_round_ms: float = 60.0  # each precision's share of a round lasts at least this long
    extra: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, targets: list[str] | None = None, batch_sizes: list[int] | None = None,
                       precisions: list[str] | None = None, rounds: int | None = None) -> MatrixSpec:
        """The command-line flags that override the spec's axes (validated like the file's)."""
        where = "command line"
        new = self
        if targets:
            new = replace(new, targets=_names(targets, f"{where} --targets"))
        if batch_sizes:
            new = replace(new, batch_sizes=_batch_sizes(batch_sizes, f"{where} --batch-sizes"))
        if precisions:
            new = replace(new, precisions=_precisions(precisions, f"{where} --precisions"))
        if rounds is not None:
            new = replace(new, rounds=_positive(rounds, f"{where} --rounds", lo=1))
        return new

    def fingerprint(self) -> str:
        """What makes two runs the same matrix (the resume key)."""
        raw = asdict(self)
        raw.pop("path")
        return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_spec(path: Path | str, allow_code: bool = False) -> MatrixSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: matrix spec not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_spec(raw, path, allow_code)


def parse_spec(raw: dict[str, Any], path: Path | None = None, allow_code: bool = False) -> MatrixSpec:
    where = str(path or "matrix.toml")
    base = path.parent if path is not None else Path(".")
    unknown = set(raw) - {"models", "matrix"}
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}; expected [[models]] and [matrix]")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{where}: needs at least one [[models]] entry with a 'path'")
    models = []
    for i, m in enumerate(models_raw):
        loc = f"{where} [[models]] #{i + 1}"
        if not isinstance(m, dict):
            raise ConfigError(f"{loc}: must be a table")
        _check_keys(m, _MODEL_KEYS, loc)
        if "path" not in m:
            raise ConfigError(f"{loc}: missing key 'path' (the .onnx model)")
        model_path = (base / m["path"]).resolve() if not Path(m["path"]).is_absolute() else Path(m["path"])
        name = m.get("name") or Path(m["path"]).name.removesuffix(".onnx")
        _safe_name(name, f"{loc} key 'name'")
        task = m.get("task", "auto")
        if task not in TASKS:
            raise ConfigError(f"{loc} key 'task': '{task}' is not one of {', '.join(TASKS)}")
        models.append(ModelSpec(name, model_path, _data(m.get("calib"), base, f"{loc} key 'calib'", allow_code),
                                _data(m.get("eval"), base, f"{loc} key 'eval'", allow_code), task))
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where} [[models]]: name {dup[0]!r} given twice; set 'name' to tell them apart")
    mx = raw.get("matrix", {})
    if not isinstance(mx, dict):
        raise ConfigError(f"{where} [matrix]: must be a table")
    loc = f"{where} [matrix]"
    _check_keys(mx, _MATRIX_KEYS, loc)
    if "targets" not in mx:
        raise ConfigError(f"{loc}: missing key 'targets' (e.g. targets = [\"onnxruntime\", \"openvino\"])")
    method = mx.get("method")
    if method is not None and method not in METHODS:
        raise ConfigError(f"{loc} key 'method': '{method}' is not one of {', '.join(METHODS)}")
    activations = mx.get("activations")
    if activations is not None and activations not in ("symmetric", "asymmetric"):
        raise ConfigError(f"{loc} key 'activations': '{activations}' is not symmetric or asymmetric")
    samples = mx.get("calib_samples")
    tfile = mx.get("targets_file")
    return MatrixSpec(
        path=path, models=tuple(models), targets=_names(mx["targets"], f"{loc} key 'targets'"),
        batch_sizes=_batch_sizes(mx.get("batch_sizes", [1]), f"{loc} key 'batch_sizes'"),
        precisions=_precisions(mx.get("precisions", ["fp32", "int8"]), f"{loc} key 'precisions'"),
        targets_file=(base / tfile) if tfile else None, method=method, recipe=mx.get("recipe"),
        activations=activations,
        calib_samples=_positive(samples, f"{loc} key 'calib_samples'", lo=1) if samples is not None else None,
        eval_samples=_positive(mx.get("eval_samples", 500), f"{loc} key 'eval_samples'", lo=1),
        rounds=_positive(mx.get("rounds", 5), f"{loc} key 'rounds'", lo=1, hi=1000),
        warmup=_positive(mx.get("warmup", 5), f"{loc} key 'warmup'", lo=0, hi=100000),
        min_round_ms=float(_positive(mx.get("min_round_ms", 60.0), f"{loc} key 'min_round_ms'", lo=0, hi=600000)),
    )


def _check_keys(raw: dict[str, Any], allowed: dict[str, type], where: str) -> None:
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
        want = allowed[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where} key '{key}': expected {want.__name__}, got {type(value).__name__}")


def _safe_name(name: Any, where: str) -> str:
    """Names become folder and file names: a safe character set only."""
    if not isinstance(name, str) or not name or len(name) > 64 or name in (".", "..") or \
            any(not (c.isalnum() or c in "-_.") for c in name):
        raise ConfigError(f"{where}: {name!r} must be 1-64 characters of letters, digits, '-', '_' or '.'")
    return name


def _names(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}: give a non-empty list of names")
    out: list[str] = []
    for v in values:
        name = _safe_name(v.strip() if isinstance(v, str) else v, where)
        if name not in out:  # a name given twice is measured once
            out.append(name)
    return tuple(out)


def _batch_sizes(values: Any, where: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}: give a non-empty list of batch sizes")
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
            raise ConfigError(f"{where}: batch size {v!r} must be an integer from 1 to 4096")
        if v not in out:
            out.append(v)
    return tuple(out)


def _precisions(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}: give a non-empty list of precisions ({', '.join(PRECISIONS)})")
    out: list[str] = []
    for v in values:
        if v not in PRECISIONS:
            raise ConfigError(f"{where}: precision {v!r} is not one of {', '.join(PRECISIONS)}")
        if v not in out:
            out.append(v)
    return tuple(sorted(out, key=PRECISIONS.index))


def _positive(value: Any, where: str, lo: float, hi: float = 10_000_000) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {value!r} must be a number from {lo:g} to {hi:g}")
    return value


def _data(value: str | None, base: Path, where: str, allow_code: bool) -> str | None:
    if value is None:
        return None
    candidate = Path(value) if Path(value).is_absolute() else base / value
    if candidate.exists():
        return str(candidate)
    if ":" in value and not value.startswith((".", "/")) and Path(value).suffix not in (".npz", ".npy"):
        if not allow_code:
            raise ConfigError(f"{where}: '{value}' names Python code; a spec file runs no code unless you "
                              f"pass --allow-code")
        return value
    raise ConfigError(f"{where}: {candidate} not found")
