"""Check jobs: one target's on-target checks as a plain value that can run anywhere.

A :class:`CheckJob` holds everything the checks need and nothing of the build's process: a
reference to the lowered artifact, the evaluation inputs (and labels), the reference outputs
(FP32 and canonical QDQ, both from onnxruntime) and the :class:`CheckSettings`. It is saved as
a folder (``job.json`` + ``arrays.npz``, read back with ``allow_pickle=False``: loading a job
never runs code) and pickles as it is (Ray). An :class:`Executor` runs it and returns a
:class:`deploykit.results.JobResult`; the build uses :class:`LocalExecutor`, this process.

    job.save("job-dir")                       # or CheckJob.load("job-dir")
    deploykit run-job job-dir                 # same checks, another process or machine

``CheckSettings.rounds`` > 0 times the artifact and the backend's FP32 model in alternating
rounds (:mod:`deploykit.timing`), as a benchmark matrix does; 0 (the build) times them one
after the other.

docs/check-jobs.md describes the format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import onnx

from deploykit import checks, layers, timing
from deploykit.backend import Backend, Capability, Runner
from deploykit.canonical import CalibrationTable, CanonicalModel
from deploykit.errors import ConfigError
from deploykit.fileio import atomic_output
from deploykit.plugins import Registry, load_registry
from deploykit.progress import bar, step
from deploykit.results import (
    SCHEMA_VERSION,
    Artifact,
    Availability,
    CheckResult,
    JobResult,
    LatencyResult,
    jsonable,
)
from deploykit.targets import Device, Target

log = logging.getLogger("deploykit")

JOB_FILE = "job.json"
ARRAYS_FILE = "arrays.npz"
RESULT_FILE = "result.json"
#: Metrics that exist only for a classifier.
CLASSIFICATION_METRICS = ("top1_agreement", "top5_agreement", "accuracy", "accuracy_drop")


@dataclass(frozen=True)
class CheckSettings:
    """How to judge the artifact (the thresholds, batch sizes and runs are the target's)."""

    classification: bool  # top-k agreement and accuracy on the first output
    fp32_accuracy: float | None = None  # FP32 task accuracy on the same labelled samples
    #: FP32 onnxruntime p50 per batch size: the speed-up reference when the backend has no FP32 runner
    baseline_fp32_ms: Mapping[int, float] = field(default_factory=dict)
    #: > 0: time the artifact and the backend's FP32 runner in this many alternating rounds of about
    #: ``min_round_ms`` each (deploykit.timing; p50 = median of round medians, speed-up per round);
    #: 0: ``target.runs`` calls of each, one after the other
    rounds: int = 0
    min_round_ms: float = 60.0
    layers: bool = True  # the per-layer comparison (layer_within_one_step)
    #: also judge the backend's FP32 runner (accuracy vs FP32 onnxruntime, task accuracy, memory)
    #: into ``JobResult.fp32_checks``: a benchmark matrix's FP32 cells
    fp32_checks: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"classification": self.classification, "fp32_accuracy": self.fp32_accuracy,
                "baseline_fp32_ms": {str(k): v for k, v in self.baseline_fp32_ms.items()},
                "rounds": self.rounds, "min_round_ms": self.min_round_ms, "layers": self.layers,
                "fp32_checks": self.fp32_checks}

    @classmethod
    def from_json(cls, s: Mapping[str, Any]) -> CheckSettings:
        return cls(bool(s["classification"]), s.get("fp32_accuracy"),
                   {int(k): float(v) for k, v in s.get("baseline_fp32_ms", {}).items()},
                   int(s.get("rounds", 0)), float(s.get("min_round_ms", 60.0)), bool(s.get("layers", True)),
                   bool(s.get("fp32_checks", False)))


@dataclass(frozen=True)
class CheckJob:
    """One target's checks: a plain value (no open handles, no callables)."""

    target: Target
    artifact: Artifact
    canonical_path: Path  # the canonical .qdq.onnx (the backend's FP32 runner is built from its FP32 model)
    fp32_path: Path
    inputs: tuple[Mapping[str, np.ndarray], ...]  # evaluation batches, keyed by input name
    labels: np.ndarray | None
    reference_fp32: tuple[np.ndarray, ...]  # each output over all batches, FP32 in onnxruntime
    reference_canonical: tuple[np.ndarray, ...]  # the same from the canonical QDQ model
    settings: CheckSettings
    schema_version: int = SCHEMA_VERSION

    # -- on disk -------------------------------------------------------------------------
    def save(self, folder: Path | str) -> Path:
        """Write ``job.json`` and ``arrays.npz`` into ``folder`` (atomically, each).

        Paths inside ``folder`` are stored relative to it, so the folder can move together with
        the artifact; other paths are stored absolute."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for i, batch in enumerate(self.inputs):
            for name, value in batch.items():
                arrays[f"inputs/{i}/{name}"] = np.asarray(value)
        for i, value in enumerate(self.reference_fp32):
            arrays[f"reference_fp32/{i}"] = np.asarray(value)
        for i, value in enumerate(self.reference_canonical):
            arrays[f"reference_canonical/{i}"] = np.asarray(value)
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels)
        with atomic_output(folder / ARRAYS_FILE) as tmp:
            _write_npz(tmp, arrays)
        with atomic_output(folder / JOB_FILE) as tmp:
            tmp.write_text(json.dumps(self.to_json(folder), indent=2), encoding="utf-8")
        return folder

    def to_json(self, folder: Path | None = None) -> dict[str, Any]:
        """Everything but the arrays (``arrays.npz``), paths relative to ``folder`` where inside it."""
        t, a = self.target, self.artifact
        return {
            "schema_version": self.schema_version,
            "kind": "deploykit.check_job",
            "target": target_to_json(t),
            "artifact": {"backend": a.backend, "path": _store(a.path, folder),
                         "files": [_store(f, folder) for f in a.files], "metadata": jsonable(dict(a.metadata)),
                         "checks": [c.to_json() for c in a.checks]},
            "canonical_path": _store(self.canonical_path, folder),
            "fp32_path": _store(self.fp32_path, folder),
            "batches": len(self.inputs),
            "outputs": len(self.reference_fp32),
            "settings": self.settings.to_json(),
        }

    @classmethod
    def load(cls, folder: Path | str) -> CheckJob:
        """Read a job written by :meth:`save`; a folder that is not one is a one-line ConfigError."""
        folder = Path(folder)
        job_file, arrays_file = folder / JOB_FILE, folder / ARRAYS_FILE
        if not job_file.is_file():
            raise ConfigError(f"{folder}: not a check job (no {JOB_FILE}); write one with CheckJob.save()")
        try:
            raw = json.loads(job_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{job_file}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("kind") != "deploykit.check_job":
            raise ConfigError(f"{job_file}: not a deploykit check job")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{job_file}: schema version {raw.get('schema_version')} but this deploykit reads "
                              f"{SCHEMA_VERSION}; write the job again with this version")
        if not arrays_file.is_file():
            raise ConfigError(f"{folder}: {ARRAYS_FILE} is missing; the job is incomplete")
        try:
            with np.load(arrays_file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{arrays_file}: unreadable ({exc})") from None
        try:
            return cls._from_json(raw, arrays, folder)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{job_file}: malformed check job ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_json(cls, raw: Mapping[str, Any], arrays: Mapping[str, np.ndarray], folder: Path) -> CheckJob:
        t, a, s = raw["target"], raw["artifact"], raw["settings"]
        target = target_from_json(t)
        artifact = Artifact(a["backend"], _load(a["path"], folder), tuple(_load(f, folder) for f in a["files"]),
                            dict(a["metadata"]), tuple(CheckResult.from_json(c) for c in a["checks"]))
        inputs: list[dict[str, np.ndarray]] = [{} for _ in range(int(raw["batches"]))]
        for key, value in arrays.items():
            if key.startswith("inputs/"):
                _, index, name = key.split("/", 2)
                inputs[int(index)][name] = value
        outputs = int(raw["outputs"])
        settings = CheckSettings.from_json(s)
        return cls(target, artifact, _load(raw["canonical_path"], folder), _load(raw["fp32_path"], folder),
                   tuple(inputs), arrays.get("labels"),
                   tuple(arrays[f"reference_fp32/{i}"] for i in range(outputs)),
                   tuple(arrays[f"reference_canonical/{i}"] for i in range(outputs)), settings)


def target_to_json(t: Target) -> dict[str, Any]:
    """A resolved target as JSON (its options as validated, its device with it)."""
    return {"name": t.name, "backend": t.backend, "description": t.description,
            "device": dataclasses.asdict(t.device), "options": jsonable(dict(t.options)),
            "thresholds": dict(t.thresholds), "batch_sizes": list(t.batch_sizes), "warmup": t.warmup, "runs": t.runs}


def target_from_json(t: Mapping[str, Any]) -> Target:
    return Target(t["name"], t["backend"], Device(**t["device"]), dict(t["options"]), dict(t["thresholds"]),
                  tuple(t["batch_sizes"]), int(t["warmup"]), int(t["runs"]), t.get("description", ""))


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``numpy.savez`` without its time stamps: the same arrays give the same bytes, so a job's
    arrays shipped to a device agent are content-addressed like any file (sent once)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)


def _store(path: Path, folder: Path | None) -> str:
    if folder is not None:
        try:
            return str(Path(path).resolve().relative_to(folder.resolve()))
        except ValueError:
            pass
    return str(Path(path).resolve())


def _load(text: str, folder: Path) -> Path:
    path = Path(text)
    return path if path.is_absolute() else folder / path


# ---------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs check jobs somewhere: this process, a device agent, a Ray worker.

    The build and ``deploykit matrix`` ask :meth:`accepts` for each target before they make its
    job, and call :meth:`run` only when it says ``""``."""

    def accepts(self, target: Target, availability: Availability) -> str:
        """``""`` when this executor can run ``target``'s checks; otherwise why not (one line).
        ``availability`` is the backend's probe on this machine."""
        ...

    def run(self, job: CheckJob) -> JobResult: ...


class DevicePlacing:
    """Base of executors that put each job on its target's device themselves (a device's agent,
    Ray with ``device:NAME`` resources): the build hands them remote targets' jobs as they are,
    where any other executor gets only this machine's (docs/agent.md)."""

    def accepts(self, target: Target, availability: Availability) -> str:
        """A remote device's target always (its agent says what it can run); one of this machine's
        when its backend can run here."""
        if target.device.address or availability.can_run:
            return ""
        return availability.reason or f"backend {target.backend} cannot run here"


class LocalExecutor:
    """Runs a job in this process, with this registry's backends."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry

    def accepts(self, target: Target, availability: Availability) -> str:
        """This machine's targets only: not one whose backend cannot run here or whose device
        has an ``address`` (it runs through that device's agent)."""
        if not availability.can_run:
            return availability.reason or f"backend {target.backend} cannot run here"
        if target.device.address:
            return (f"device '{target.device.name}' is remote ({target.device.address}); the local executor runs "
                    f"checks on this machine only")
        return ""

    def run(self, job: CheckJob) -> JobResult:
        if self.registry is None:
            self.registry = load_registry()
        return run_job(job, self.registry)


def run_job(job: CheckJob, registry: Registry | None = None) -> JobResult:
    """Load the artifact with its backend and run every check of ``job``.

    Accuracy against FP32, fidelity against the canonical model, task accuracy (with labels),
    resident memory, latency at each batch size and the speed-up against FP32 on the same
    runtime (``Capability.FP32_RUNNER``) or onnxruntime. Runners are closed, also on error."""
    registry = registry or load_registry()
    backend = registry.get(job.target.backend)
    target, th = job.target, job.target.thresholds
    result = JobResult()
    rss0 = timing.rss_mb()
    t0 = time.monotonic()
    with backend.load(job.artifact, target) as runner:
        result.seconds["load"] = time.monotonic() - t0
        t0 = time.monotonic()
        got = _outputs(runner, job.inputs, f"{target.name}: accuracy")
        result.seconds["accuracy"] = time.monotonic() - t0
        result.checks.extend(_accuracy_checks(job, got))
        if job.settings.layers:
            t0 = time.monotonic()
            result.checks.append(_layer_check(backend, job))
            result.seconds["layers"] = time.monotonic() - t0
        memory_mb = max(0.0, timing.rss_mb() - rss0)  # before a baseline runner adds its own
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="deploykit-fp32-") as scratch:
            fp32 = None
            if Capability.FP32_RUNNER in backend.capabilities:  # e.g. float TFLite: a conversion, seconds
                with step(f"{target.name}: FP32 baseline model", total=1, unit="model") as prepared:
                    rss1 = timing.rss_mb()
                    fp32 = _fp32_runner(backend, job, Path(scratch), result)
                    if fp32 is not None and job.settings.fp32_checks:
                        result.fp32_checks.extend(_fp32_checks(job, fp32, rss1))
                    prepared.update()
            elif job.settings.fp32_checks:
                result.notes["fp32_runner"] = f"backend {target.backend} has no FP32 runner"
            try:
                if job.settings.rounds > 0:
                    _interleaved_latency(job, runner, fp32, result)
                else:
                    _latency(job, backend, runner, fp32, result)
            finally:
                if fp32 is not None:
                    fp32.close()
        result.seconds["latency"] = time.monotonic() - t0
    result.checks.append(checks.judge("memory_mb", memory_mb, th,
                                      "resident memory added by loading and running the artifact"))
    return result


def _outputs(runner: Runner, batches: Sequence[Mapping[str, np.ndarray]], desc: str) -> list[np.ndarray]:
    with bar(len(batches), desc, "batch") as b:
        outputs = []
        for feeds in batches:
            outputs.append(runner.run(feeds))
            b.update()
    return [np.concatenate([o[i] for o in outputs]) for i in range(len(outputs[0]))]


def _accuracy_checks(job: CheckJob, got: list[np.ndarray]) -> list[CheckResult]:
    th, s, labels = job.target.thresholds, job.settings, job.labels
    out = [checks.judge(name, value, th, "vs FP32 in onnxruntime")
           for name, value in checks.compare(list(job.reference_fp32), got, classification=s.classification).items()]
    for key in th:  # a threshold on a metric this task has no value for is said, not dropped
        metric = key.partition("_")[2]
        if metric in CLASSIFICATION_METRICS and not s.classification:
            out.append(checks.judge(metric, None, th, "not a classification task (--task)"))
        elif metric in ("accuracy", "accuracy_drop") and labels is None:
            out.append(checks.judge(metric, None, th, "no labels in the evaluation data"))
    out += [checks.judge(name, value, th, "vs the canonical QDQ model in onnxruntime")
            for name, value in checks.compare(list(job.reference_canonical), got, prefix="fidelity_").items()]
    if labels is not None and s.classification:
        acc = checks.task_accuracy(got[0], labels)
        out.append(checks.judge("accuracy", acc, th, f"on {len(labels)} labelled samples"))
        out.append(checks.judge("accuracy_drop", (s.fp32_accuracy or 0.0) - acc, th,
                                f"FP32 accuracy {s.fp32_accuracy or 0.0:.4f} minus target accuracy"))
    return out


def _fp32_checks(job: CheckJob, fp32: Runner, rss0: float) -> list[CheckResult]:
    """The backend's FP32 runner judged like the artifact (no thresholds: it is the reference row)."""
    got = _outputs(fp32, job.inputs, f"{job.target.name}: FP32 accuracy")
    s, labels = job.settings, job.labels
    out = [checks.judge(name, value, {}, f"{job.target.backend} FP32 vs FP32 in onnxruntime")
           for name, value in checks.compare(list(job.reference_fp32), got, classification=s.classification).items()]
    if labels is not None and s.classification:
        out.append(checks.judge("accuracy", checks.task_accuracy(got[0], labels), {},
                                f"on {len(labels)} labelled samples"))
    out.append(checks.judge("memory_mb", max(0.0, timing.rss_mb() - rss0), {},
                            "resident memory added by loading and running the FP32 model"))
    return out


def _canonical(job: CheckJob) -> CanonicalModel:
    """The canonical model as the build held it, with the evaluation data's shapes at batch 1 as
    ``example_shapes`` (a backend that fixes dynamic dims, TFLite, needs them for its FP32 model)."""
    model = onnx.load(str(job.canonical_path))
    shapes = {name: (1, *np.asarray(a).shape[1:]) for name, a in job.inputs[0].items()} if job.inputs else None
    return CanonicalModel(job.canonical_path, model, CalibrationTable.from_model(model), job.fp32_path,
                          example_shapes=shapes)


def _layer_check(backend: Backend, job: CheckJob) -> CheckResult:
    """``layer_within_one_step``: every layer of the artifact fed the canonical model's own inputs
    (deploykit.layers); "not run" with the reason where the backend cannot run layers here."""
    try:
        check, _ = layers.layer_check(backend, job.artifact, _canonical(job), job.target, job.inputs)
    except Exception as exc:  # the per-layer view is a diagnosis: never worth losing the target's checks
        return checks.judge(layers.CHECK, None, job.target.thresholds,
                            f"not run: per-layer comparison failed: {type(exc).__name__}: {exc}")
    return check


def _fp32_runner(backend: Backend, job: CheckJob, scratch: Path, result: JobResult) -> Runner | None:
    """The backend's own FP32 runner when it declares one, else None (onnxruntime's FP32 row)."""
    if Capability.FP32_RUNNER not in backend.capabilities:
        return None
    try:
        return backend.fp32_runner(_canonical(job), job.target, scratch)
    except Exception as exc:  # a baseline is worth having, never worth failing the target for
        result.notes["fp32_baseline_error"] = f"{type(exc).__name__}: {exc}"
        return None


def latency_feeds(batches: Sequence[Mapping[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` evaluation samples (repeated if there are fewer)."""
    taken, n = [], 0
    for b in batches:  # only as many batches as needed, not the whole evaluation set
        taken.append(b)
        n += len(next(iter(b.values())))
        if n >= batch_size:
            break
    reps = -(-batch_size // n)
    return {k: np.concatenate([b[k] for b in taken] * reps)[:batch_size] for k in taken[0]}


def _latency(job: CheckJob, backend: Backend, runner: Runner, fp32: Runner | None, result: JobResult) -> None:
    target, th = job.target, job.target.thresholds
    gpu_time = Capability.GPU_TIME in backend.capabilities
    with bar(len(target.batch_sizes), f"{target.name}: latency") as progress:
        for i, b in enumerate(target.batch_sizes):
            feeds = latency_feeds(job.inputs, b)
            stats = checks.measure_latency(runner, feeds, target.warmup, target.runs)
            gpu_ms = runner.last_gpu_ms if gpu_time else None
            baseline = job.settings.baseline_fp32_ms
            if fp32 is not None:  # same runtime, same device, measured right after: the fair ratio
                base = checks.measure_latency(fp32, feeds, target.warmup, target.runs)
                entry = LatencyResult(stats, gpu_ms, base.p50_ms, base.p50_ms / stats.p50_ms, f"{target.backend} fp32")
            elif b in baseline:
                entry = LatencyResult(stats, gpu_ms, baseline[b], baseline[b] / stats.p50_ms, "onnxruntime fp32")
            else:
                entry = LatencyResult(stats, gpu_ms)
            result.latency.append(entry)
            log.debug("%s: batch %d: p50 %.3f ms, p99 %.3f ms%s", target.name, b, stats.p50_ms, stats.p99_ms,
                      f"; {entry.speedup_vs} p50 {entry.fp32_p50_ms:.3f} ms -> {entry.speedup:.2f}x"
                      if entry.speedup is not None else "")
            if i == 0:  # thresholds apply to the first batch size
                result.checks.extend(_latency_checks(entry, th, f"batch {b}, {target.runs} runs after "
                                                                f"{target.warmup} warm-up"))
            progress.update()


def _latency_checks(entry: LatencyResult, th: Mapping[str, float], note: str) -> list[CheckResult]:
    """The latency thresholds, judged on one batch size's figures."""
    stats, b = entry.stats, entry.stats.batch_size
    out = [checks.judge("latency_p50_ms", stats.p50_ms, th, note),
           checks.judge("latency_p99_ms", stats.p99_ms, th, note),
           checks.judge("throughput", stats.throughput, th, f"samples/s at batch {b}")]
    if entry.speedup is not None:
        out.append(checks.judge("speedup", entry.speedup, th, f"INT8 vs {entry.speedup_vs} p50 at batch {b}"))
    return out


def _interleaved_latency(job: CheckJob, runner: Runner, fp32: Runner | None, result: JobResult) -> None:
    """Each batch size: the artifact and the backend's FP32 runner in alternating rounds
    (deploykit.timing), so a load burst hits both; the speed-up is the median per-round ratio."""
    target, th, s = job.target, job.target.thresholds, job.settings
    with bar(len(target.batch_sizes), f"{target.name}: latency ({s.rounds} interleaved rounds)") as progress:
        for i, b in enumerate(target.batch_sizes):
            feeds = latency_feeds(job.inputs, b)
            runners: dict[str, timing.Runs] = {"int8": runner}
            if fp32 is not None:
                runners["fp32"] = fp32
            timings, ratios = timing.interleaved(runners, feeds, s.rounds, target.warmup, s.min_round_ms)
            q = timings["int8"]
            stats = q.stats()
            entry = LatencyResult(stats, rounds_ms=tuple(q.round_ms), calls_per_round=q.calls_per_round,
                                  cpu_rounds_ms=tuple(q.round_cpu_ms))
            if fp32 is not None:
                f = timings["fp32"]
                speedup, _ = timing.summarise_ratio(ratios["int8"])
                entry = dataclasses.replace(entry, fp32_p50_ms=f.p50_ms, speedup=speedup,
                                            speedup_vs=f"{target.backend} fp32", fp32_rounds_ms=tuple(f.round_ms),
                                            fp32_calls_per_round=f.calls_per_round, fp32_stats=f.stats(),
                                            fp32_cpu_rounds_ms=tuple(f.round_cpu_ms))
            elif b in s.baseline_fp32_ms:
                base = s.baseline_fp32_ms[b]
                entry = dataclasses.replace(entry, fp32_p50_ms=base, speedup=base / stats.p50_ms,
                                            speedup_vs="onnxruntime fp32")
            result.latency.append(entry)
            if i == 0:  # thresholds apply to the first batch size
                result.checks.extend(_latency_checks(entry, th, f"batch {b}, median of {s.rounds} interleaved "
                                                                f"rounds of {q.calls_per_round} calls"))
            progress.update()
