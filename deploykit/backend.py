"""The backend contract: what a plugin implements to lower the canonical model and run it.

A backend is a class with a ``name``, ``probe``, ``lower`` and ``load``; ``load`` returns a
:class:`Runner` whose ``run(feeds) -> outputs`` the shared checks drive. Everything a backend
needs to know about the canonical model is in :class:`CanonicalModel`; it must never
re-quantize: scales come from ``canonical.model`` (the Q/DQ nodes) and
``canonical.calibration`` (the range of every activation tensor).

Vendor SDKs are imported lazily inside the methods, so ``deploykit backends`` works on a
machine that has none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from deploykit.errors import BackendUnavailable

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from deploykit.quantize.canonical import CalibrationTable
    from deploykit.targets import Target


@dataclass(frozen=True)
class Availability:
    """What this host can do with a backend.

    ``can_lower`` without ``can_run`` is a real state: Core ML packages build on Linux but only
    run on macOS. ``reason`` says what is missing; ``install_hint`` how to get it.
    """

    can_lower: bool
    can_run: bool
    reason: str = ""
    install_hint: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def ready(cls, **versions: str) -> "Availability":
        return cls(True, True, versions=dict(versions))

    @classmethod
    def missing(cls, reason: str, install_hint: str = "") -> "Availability":
        return cls(False, False, reason, install_hint)


@dataclass(frozen=True)
class CheckResult:
    """One measured fact about an artifact, optionally judged against a threshold.

    status: "pass", "fail", "info" (measured, no threshold), or "not_run" (with ``message``
    saying why, e.g. "needs macOS"). ``value`` is a number, or None when not run.
    """

    name: str
    status: str
    value: float | None = None
    threshold: float | None = None
    bound: str | None = None  # "min" or "max"
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Artifact:
    """A lowered model on disk (a file or a directory such as an .mlpackage).

    ``files`` lists every file that belongs to it (IR .xml + .bin, ...) for hashing.
    ``metadata`` is backend-specific and goes to the manifest (build command, op list, ...).
    ``checks`` are the backend's own verification results (stored scales, precision audit).
    """

    backend: str
    path: Path
    files: tuple[Path, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    checks: tuple[CheckResult, ...] = ()


@dataclass(frozen=True)
class Option:
    """A backend option accepted in a targets.toml ``[targets.X.options]`` table."""

    type: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class CanonicalModel:
    """The one canonical QDQ model every backend lowers.

    path: the canonical ``.qdq.onnx`` on disk (passes ``deploykit inspect --lint``).
    model: the same model loaded (treat as read-only; copy before rewriting).
    calibration: calibrated range of *every* float activation tensor (scale with zero point 0),
        including tensors the canonical model leaves unwrapped; use it where a target must
        quantize more tensors than the canonical model does.
    fp32_path: the normalised FP32 model, the accuracy reference.
    """

    path: Path
    model: "onnx.ModelProto"
    calibration: "CalibrationTable"
    fp32_path: Path


@runtime_checkable
class Runner(Protocol):
    """Runs an artifact. Feeds are NCHW numpy arrays keyed by the canonical model's input
    names, exactly as for onnxruntime; outputs come back in the canonical output order.
    A backend with another layout (TFLite's NHWC) converts inside its runner."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend:
    """Base class for backends. Subclass, set the class attributes, implement the methods.

    Register it from a plugin module::

        @deploykit.hookimpl
        def deploykit_register_backends(register):
            register(MyBackend)
    """

    #: Name used in targets.toml (``backend = "..."``) and on the command line.
    name: ClassVar[str] = ""
    #: One line for ``deploykit backends``.
    description: ClassVar[str] = ""
    #: What to run when the SDK is missing, e.g. ``pip install 'deploykit[openvino]'``.
    install_hint: ClassVar[str] = ""
    #: Options this backend accepts under ``[targets.X.options]``; anything else is an error.
    options: ClassVar[Mapping[str, Option]] = {}
    #: Extra metric names this backend reports (so thresholds like ``min_int8_fraction`` validate).
    metrics: ClassVar[tuple[str, ...]] = ()
    #: Artifact file or directory suffix, e.g. ``.xml``, ``.tflite``, ``.mlpackage``, ``.engine``.
    artifact_suffix: ClassVar[str] = ""
    #: Activation profiles of the canonical model this backend lowers exactly ("symmetric",
    #: "asymmetric"; see deploykit/quantize/canonical.py). ``deploykit build`` picks asymmetric
    #: only when every target lists it, so a plugin opts in to zero points explicitly.
    activation_profiles: ClassVar[tuple[str, ...]] = ("symmetric",)

    def probe(self, target: "Target") -> Availability:
        """Say whether this host can lower and run ``target``. Never raises for a missing SDK."""
        raise NotImplementedError

    def preflight(self, canonical: CanonicalModel, target: "Target") -> tuple[list[CheckResult], dict[str, Any]]:
        """Checks and notes that need no SDK (lint rules, equivalent build commands).

        Runs even when the backend is unavailable, so the report still says what would happen.
        Returns (checks, metadata for the manifest/report).
        """
        return [], {}

    def lower(self, canonical: CanonicalModel, target: "Target", dest: Path) -> Artifact:
        """Lower the canonical model to ``dest`` (final path, ``artifact_suffix`` applied).

        Write through :func:`deploykit.fileio.atomic_output` so a failure leaves nothing behind.
        Put verification of stored scales into ``Artifact.checks``.
        """
        raise NotImplementedError

    def load(self, artifact: Artifact, target: "Target") -> Runner:
        """Return a runner for the artifact on ``target.device``."""
        raise NotImplementedError

    def device_info(self, target: "Target") -> dict[str, Any]:
        """Facts about the device for the manifest (versions, full name, capabilities)."""
        return {}

    def fp32_runner(self, canonical: CanonicalModel, target: "Target", workdir: Path) -> Runner | None:
        """The FP32 model on this same runtime and device, for the INT8 speed-up (optional).

        ``None``: the report compares with FP32 onnxruntime instead. Must be real FP32 (no
        bf16/fp16 defaults), or the speed-up means nothing. ``workdir`` is a scratch folder.
        """
        return None


def require(module: str, install_hint: str) -> Any:
    """Import a vendor SDK lazily, or raise BackendUnavailable saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} is not importable ({exc}); install it: {install_hint}") from None


def output_names(model: "onnx.ModelProto") -> list[str]:
    return [o.name for o in model.graph.output]


def input_names(model: "onnx.ModelProto") -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_feeds(names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> None:
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KeyError(f"missing inputs {missing}; expected {list(names)}")


def precision_audit(layers: Sequence[tuple[str, str, str]], declared_float: Sequence[str] = ()) -> CheckResult:
    """The one report format for "which compute layers really run in int8" (OpenVINO, TensorRT).

    ``layers``: (layer name, layer type, precision) for every compute layer (convolutions,
    fully connected, matmuls). The check is named ``int8_fraction`` so the
    ``min_int8_fraction`` threshold applies to it. ``declared_float``: the canonical model's
    float islands; they are named apart and left out of the fraction, which judges only the
    layers the canonical model quantizes.
    """
    declared = set(declared_float)
    kept_float = [{"name": n, "type": t, "precision": p} for n, t, p in layers if n in declared]
    layers = [l for l in layers if l[0] not in declared]
    int8 = [l for l in layers if l[2].lower() in ("i8", "u8", "int8", "uint8")]
    floats = [{"name": n, "type": t, "precision": p} for n, t, p in layers if (n, t, p) not in int8]
    total = len(layers)
    msg = f"{len(int8)} of {total} compute layers run in int8"
    if kept_float:
        msg += f"; {len(kept_float)} declared float: " + ", ".join(
            f"{f['name']} ({f['precision']})" for f in kept_float[:8]) + (" ..." if len(kept_float) > 8 else "")
    if floats:
        msg += "; float: " + ", ".join(f"{f['name']} ({f['type']}, {f['precision']})" for f in floats[:8])
        if len(floats) > 8:
            msg += f", ... {len(floats) - 8} more"
    return CheckResult("int8_fraction", "info", (len(int8) / total) if total else 0.0, message=msg,
                       details={"int8_layers": len(int8), "compute_layers": total, "float_layers": floats,
                                "declared_float_layers": kept_float})
