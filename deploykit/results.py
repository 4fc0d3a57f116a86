"""Every result type deploykit produces, defined once: the metrics (name, unit, better
direction, formatting), a check's result, latency figures, a lowered artifact, what a host can
do with a backend, and one target's whole result. Thresholds, checks, the manifest and every
renderer read these; adding a metric means adding one :class:`Metric` to :data:`METRICS`.

``SCHEMA_VERSION`` is written into every manifest and check job; bump it when a field's
meaning changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from deploykit.fileio import sha256
from deploykit.targets import Target

SCHEMA_VERSION = 1

#: pass/fail: judged against a threshold; info: measured, no threshold; not_run: with the reason.
CheckStatus = Literal["pass", "fail", "info", "not_run"]
#: ok: checked and passed; failed: a check failed; skipped: backend unavailable; error: lowering or a
#: check raised; lowered: lowered and verified here, on-target checks not run (off macOS, remote).
TargetStatus = Literal["ok", "failed", "skipped", "error", "lowered"]


@dataclass(frozen=True)
class Metric:
    """A measured quantity: thresholds are ``min_<name>`` / ``max_<name>``."""

    name: str
    unit: str  # "" for a ratio or a count
    better: Literal["higher", "lower", ""]  # "": neither (an error magnitude judged either way)
    description: str
    digits: int = 4
    percent: bool = False  # shown x100 with a % sign

    def format(self, value: float | None) -> str:
        if value is None:
            return "not run"
        v = value * 100 if self.percent else value
        return f"{v:.{self.digits}f}" + ("%" if self.percent else "")


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


#: The metrics every target reports (a backend adds its own names in ``Backend.metrics``).
METRICS: dict[str, Metric] = _metrics(
    Metric("top1_agreement", "", "higher", "share of samples whose top-1 class equals FP32's", 2, True),
    Metric("top5_agreement", "", "higher", "share of samples whose FP32 top-1 is in the target's top 5", 2, True),
    Metric("cosine", "", "higher", "cosine similarity of all outputs with FP32", 5),
    Metric("rel_l2", "", "lower", "relative L2 error of all outputs against FP32"),
    Metric("max_abs_error", "", "lower", "largest absolute output difference from FP32"),
    Metric("accuracy", "", "higher", "task accuracy on the labelled evaluation samples", 2, True),
    Metric("accuracy_drop", "", "lower", "FP32 accuracy minus the target's accuracy", 2, True),
    Metric("fidelity_cosine", "", "higher", "cosine similarity with the canonical QDQ model in onnxruntime", 5),
    Metric("fidelity_rel_l2", "", "lower", "relative L2 error against the canonical QDQ model"),
    Metric("fidelity_max_abs", "", "lower", "largest absolute difference from the canonical QDQ model"),
    Metric("layer_within_one_step", "", "higher", "the worst layer's share of values within one int8 step of the "
                                                   "canonical model, each layer fed the canonical inputs", 2, True),
    Metric("latency_p50_ms", "ms", "lower", "median latency at the first batch size", 3),
    Metric("latency_p90_ms", "ms", "lower", "90th percentile latency at the first batch size", 3),
    Metric("latency_p99_ms", "ms", "lower", "99th percentile latency at the first batch size", 3),
    Metric("throughput", "samples/s", "higher", "samples per second at the median latency", 1),
    Metric("memory_mb", "MiB", "lower", "resident memory added by loading and running the artifact", 1),
    Metric("speedup", "x", "higher", "FP32 median latency over INT8 median latency", 2),
)
#: Metrics some backends report (named in their ``Backend.metrics``), formatted the same way everywhere.
BACKEND_METRICS: dict[str, Metric] = _metrics(
    Metric("int8_fraction", "", "higher", "share of compute layers that run in int8", 0, True),
)


def metric(name: str) -> Metric:
    """The definition of ``name``; an unknown name (a backend's own check) gets a plain one."""
    return METRICS.get(name) or BACKEND_METRICS.get(name) or Metric(name, "", "", name)


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
    def ready(cls, **versions: str) -> Availability:
        return cls(True, True, versions=dict(versions))

    @classmethod
    def missing(cls, reason: str, install_hint: str = "") -> Availability:
        return cls(False, False, reason, install_hint)

    def to_json(self) -> dict[str, Any]:
        return {"can_lower": self.can_lower, "can_run": self.can_run, "reason": self.reason,
                "install_hint": self.install_hint, "versions": dict(self.versions)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Availability:
        return cls(bool(raw["can_lower"]), bool(raw["can_run"]), str(raw.get("reason", "")),
                   str(raw.get("install_hint", "")), dict(raw.get("versions", {})))


@dataclass(frozen=True)
class CheckResult:
    """One measured fact about an artifact, optionally judged against a threshold.

    status: "pass", "fail", "info" (measured, no threshold), or "not_run" (with ``message``
    saying why, e.g. "needs macOS"). ``value`` is a number, or None when not run.
    """

    name: str
    status: str  # a CheckStatus
    value: float | None = None
    threshold: float | None = None
    bound: str | None = None  # "min" or "max"
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CheckResult:
        value, threshold = raw.get("value"), raw.get("threshold")
        return cls(str(raw["name"]), str(raw["status"]), None if value is None else float(value),
                   None if threshold is None else float(threshold), raw.get("bound"), str(raw.get("message", "")),
                   dict(raw.get("details", {})))


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
class LatencyStats:
    """``runs`` timed calls at one batch size, after warm-up."""

    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyResult:
    """A target's latency at one batch size, with the FP32 baseline it is compared with."""

    stats: LatencyStats
    gpu_compute_ms: float | None = None  # the device's own timing (Capability.GPU_TIME)
    fp32_p50_ms: float | None = None
    speedup: float | None = None  # fp32 p50 / p50; with rounds: the median of the per-round ratios
    speedup_vs: str | None = None  # "<backend> fp32" or "onnxruntime fp32"
    # interleaved timing (CheckSettings.rounds > 0): each round's median, INT8 and the FP32 it
    # alternated with, so a reader can judge the noise (deploykit compare does)
    rounds_ms: tuple[float, ...] = ()
    fp32_rounds_ms: tuple[float, ...] = ()
    calls_per_round: int = 0
    fp32_calls_per_round: int = 0
    fp32_stats: LatencyStats | None = None  # the FP32 runner's own figures from the same rounds
    #: this process's CPU time per call, each round (all its threads; immune to other processes' load)
    cpu_rounds_ms: tuple[float, ...] = ()
    fp32_cpu_rounds_ms: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = self.stats.to_json()
        if self.gpu_compute_ms is not None:
            out["gpu_compute_ms"] = self.gpu_compute_ms
        if self.speedup is not None:
            out.update(fp32_p50_ms=self.fp32_p50_ms, speedup=self.speedup, speedup_vs=self.speedup_vs)
        if self.rounds_ms:
            out.update(rounds_ms=list(self.rounds_ms), fp32_rounds_ms=list(self.fp32_rounds_ms),
                       calls_per_round=self.calls_per_round, fp32_calls_per_round=self.fp32_calls_per_round,
                       cpu_rounds_ms=list(self.cpu_rounds_ms), fp32_cpu_rounds_ms=list(self.fp32_cpu_rounds_ms))
        if self.fp32_stats is not None:
            out["fp32_stats"] = self.fp32_stats.to_json()
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LatencyResult:
        names = [f.name for f in dataclasses.fields(LatencyStats)]
        fp32 = raw.get("fp32_stats")
        return cls(LatencyStats(**{k: raw[k] for k in names}), raw.get("gpu_compute_ms"), raw.get("fp32_p50_ms"),
                   raw.get("speedup"), raw.get("speedup_vs"),
                   tuple(float(x) for x in raw.get("rounds_ms", ())),
                   tuple(float(x) for x in raw.get("fp32_rounds_ms", ())),
                   int(raw.get("calls_per_round", 0)), int(raw.get("fp32_calls_per_round", 0)),
                   LatencyStats(**{k: fp32[k] for k in names}) if fp32 else None,
                   tuple(float(x) for x in raw.get("cpu_rounds_ms", ())),
                   tuple(float(x) for x in raw.get("fp32_cpu_rounds_ms", ())))


@dataclass
class JobResult:
    """What a check job measured (:mod:`deploykit.jobs`), wherever it ran."""

    checks: list[CheckResult] = field(default_factory=list)
    latency: list[LatencyResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, accuracy, latency
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. fp32_baseline_error, for the manifest
    #: the backend's own FP32 runner judged like the artifact (CheckSettings.fp32_checks): accuracy
    #: vs FP32 in onnxruntime, task accuracy, memory; a benchmark matrix's FP32 cells
    fp32_checks: list[CheckResult] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "checks": [c.to_json() for c in self.checks],
                "latency": [entry.to_json() for entry in self.latency],
                "seconds": dict(self.seconds), "notes": jsonable(self.notes),
                "fp32_checks": [c.to_json() for c in self.fp32_checks]}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> JobResult:
        return cls([CheckResult.from_json(c) for c in raw["checks"]],
                   [LatencyResult.from_json(entry) for entry in raw["latency"]],
                   {k: float(v) for k, v in raw.get("seconds", {}).items()}, dict(raw.get("notes", {})),
                   [CheckResult.from_json(c) for c in raw.get("fp32_checks", [])],
                   int(raw.get("schema_version", SCHEMA_VERSION)))


@dataclass
class TargetResult:
    """Everything the build learnt about one target (one entry of the manifest's ``targets``)."""

    target: Target
    status: str = "ok"  # a TargetStatus
    reason: str = ""
    availability: Availability | None = None
    artifact: Artifact | None = None
    checks: list[CheckResult] = field(default_factory=list)
    latency: list[LatencyResult] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    device_info: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stored: dict[str, Any] | None = None  # kept from an interrupted build: its manifest entry as written then

    def to_json(self, out_dir: Path, prefix: str = "") -> dict[str, Any]:
        """The manifest entry; paths relative to ``out_dir``, under ``prefix`` when given."""
        if self.stored is not None:
            return dict(self.stored)
        art = None

        def pre(path: str) -> str:
            return f"{prefix}/{path}" if prefix else path

        if self.artifact is not None:
            art = {"path": pre(rel(self.artifact.path, out_dir)), "sha256": sha256(self.artifact.path),
                   "files": {pre(rel(f, out_dir)): sha256(f) for f in self.artifact.files if f.exists()},
                   "metadata": jsonable(self.artifact.metadata)}
        t = self.target
        return {
            "name": t.name, "backend": t.backend, "device": {"name": t.device.name, "kind": t.device.kind,
                                                             "address": t.device.address},
            "options": jsonable(t.options), "thresholds": dict(t.thresholds), "batch_sizes": list(t.batch_sizes),
            "status": self.status, "reason": self.reason,
            "availability": None if self.availability is None else self.availability.to_json(),
            "artifact": art, "checks": [c.to_json() for c in self.checks],
            "latency": [entry.to_json() for entry in self.latency],
            "preflight": jsonable(self.metadata), "device_info": jsonable(self.device_info),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def relocate(self, out_dir: Path) -> None:
        """Point the artifact at its published place, ``out_dir/<target>/`` (it was built in staging)."""
        if self.artifact is None:
            return
        base, folder = self.artifact.path.parent, out_dir / self.target.name
        self.artifact = dataclasses.replace(self.artifact, path=folder / self.artifact.path.name,
                                            files=tuple(folder / Path(f).relative_to(base) for f in self.artifact.files))


def rel(path: Path | str, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (anything else as its str)."""
    return json.loads(json.dumps(value, default=str))
