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

import enum
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

import numpy as np
import onnx

from deploykit.canonical import CalibrationTable, CanonicalModel
from deploykit.errors import BackendUnavailable
from deploykit.results import Artifact, Availability, CheckResult
from deploykit.targets import Target

# Plugins import the contract's types from here: the canonical model and the result types
# live in deploykit.canonical and deploykit.results, and are re-exported under these names.
__all__ = [
    "Artifact", "Availability", "Backend", "CalibrationTable", "Capability", "CanonicalModel", "CheckResult", "Option", "Runner",
    "Target", "check_feeds", "input_names", "output_names", "precision_audit", "require",
]


@dataclass(frozen=True)
class Option:
    """A backend option accepted in a targets.toml ``[targets.X.options]`` table."""

    type: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None


_R = TypeVar("_R", bound="Runner")


class Runner:
    """Runs an artifact. Feeds are NCHW numpy arrays keyed by the canonical model's input
    names, exactly as for onnxruntime; outputs come back in the canonical output order.
    A backend with another layout (TFLite's NHWC) converts inside its runner.

    A runner is a context manager and is always closed (``with backend.load(...) as runner``),
    also when a check raises: ``close()`` frees what it holds (a CUDA context, an interpreter).
    """

    #: Device time of the last ``run`` in ms, for a backend that declares ``Capability.GPU_TIME``.
    last_gpu_ms: float | None = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime's resources; called exactly once, idempotent is kind."""

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Capability(str, enum.Enum):
    """Optional features a backend declares in :attr:`Backend.capabilities` (never probed)."""

    #: ``Backend.fp32_runner`` returns the FP32 model on the same runtime (speed-up vs itself).
    FP32_RUNNER = "fp32_runner"
    #: The runner sets ``last_gpu_ms``, the device's own timing of the last run.
    GPU_TIME = "gpu_time"
    #: ``Backend.layer_runner(artifact, canonical, target, cut)`` computes every quantized tensor
    #: from the canonical model's own inputs (deploykit.layers, layer-by-layer fidelity).
    LAYER_RUNNER = "layer_runner"


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
    #: Optional features this backend implements (:class:`Capability`).
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: Activation profiles of the canonical model this backend lowers exactly ("symmetric",
    #: "asymmetric"; see deploykit/canonical.py). ``deploykit build`` picks asymmetric
    #: only when every target lists it, so a plugin opts in to zero points explicitly.
    activation_profiles: ClassVar[tuple[str, ...]] = ("symmetric",)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        """Check option values together, at load time (types, choices and defaults are already
        applied from :attr:`options`). Raise ``ValueError`` with one line saying what is wrong
        and what to write instead; the registry prefixes the file and table."""

    def probe(self, target: Target) -> Availability:
        """Say whether this host can lower and run ``target``. Never raises for a missing SDK."""
        raise NotImplementedError

    def preflight(self, canonical: CanonicalModel, target: Target) -> tuple[list[CheckResult], dict[str, Any]]:
        """Checks and notes that need no SDK (lint rules, equivalent build commands).

        Runs even when the backend is unavailable, so the report still says what would happen.
        Returns (checks, metadata for the manifest/report).
        """
        return [], {}

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        """Lower the canonical model to ``dest`` (final path, ``artifact_suffix`` applied).

        Write through :func:`deploykit.fileio.atomic_output` so a failure leaves nothing behind.
        Put verification of stored scales into ``Artifact.checks``.
        """
        raise NotImplementedError

    def load(self, artifact: Artifact, target: Target) -> Runner:
        """Return a runner for the artifact on ``target.device`` (the caller closes it)."""
        raise NotImplementedError

    def device_info(self, target: Target) -> dict[str, Any]:
        """Facts about the device for the manifest (versions, full name, capabilities)."""
        return {}

    def fp32_runner(self, canonical: CanonicalModel, target: Target, workdir: Path) -> Runner | None:
        """The FP32 model on this same runtime and device, for the INT8 speed-up; declare
        ``Capability.FP32_RUNNER`` when you implement it (the registry refuses it undeclared).

        ``None``: the report compares with FP32 onnxruntime instead. Must be real FP32 (no
        bf16/fp16 defaults), or the speed-up means nothing. ``workdir`` is a scratch folder
        that lives as long as the runner.
        """
        return None

    def layer_runner(self, artifact: Artifact, canonical: CanonicalModel, target: Target, cut: Any) -> Any:
        """A :class:`deploykit.layers.LayerRunner` computing every tensor of ``cut`` as the
        artifact does, from the canonical model's own inputs (layer-by-layer fidelity); declare
        ``Capability.LAYER_RUNNER`` when you implement it. Raise BackendUnavailable with the
        reason when it cannot run here."""
        raise BackendUnavailable(f"backend '{self.name}' has no per-layer runner")


_import_lock = threading.Lock()


def require(module: str, install_hint: str, hide: Sequence[str] = ()) -> Any:
    """Import a vendor SDK lazily, or raise BackendUnavailable saying how to install it.

    ``hide``: packages the SDK imports at start-up for features the backend does not use
    (coremltools imports TensorFlow, torch, torchao... for its converter front ends; TensorFlow
    imports Keras). Each one not imported yet is made unimportable while the SDK loads
    (``sys.modules[name] = None``: ``import name`` raises ImportError, which these SDKs take as
    "not installed") and importable again right after, so the process can still import it
    itself. An SDK already imported is returned as it is.
    """
    import importlib

    if module in sys.modules and sys.modules[module] is not None:
        return sys.modules[module]
    with _import_lock:
        hidden = [name for name in hide if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise BackendUnavailable(f"{module} is not importable ({exc}); install it: {install_hint}") from None
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def input_names(model: onnx.ModelProto) -> list[str]:
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
