"""``deploykit build``: FP32 model -> canonical QDQ model -> one artifact per target -> checks.

One failing target never loses the others: each target runs in its own try block and the
manifest and report are written for all of them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from deploykit import checks, data
from deploykit import model as modelmod
from deploykit._version import __version__
from deploykit.canonical import CanonicalModel
from deploykit.errors import ConfigError, DeploykitError, OutputDirError
from deploykit.fileio import atomic_output, sha256
from deploykit.jobs import (
    CheckJob,
    CheckSettings,
    Executor,
    LocalExecutor,
    latency_feeds,
)
from deploykit.plugins import Registry, load_registry
from deploykit.progress import bar, step
from deploykit.quantize import QuantizeResult, quantize, write_canonical
from deploykit.reference import canonical_runner, fp32_runner
from deploykit.results import (
    SCHEMA_VERSION,
    Artifact,
    Availability,
    CheckResult,
    TargetResult,
    rel,
)
from deploykit.targets import Calibration, Preprocess, Target, load_targets

log = logging.getLogger("deploykit")
T = TypeVar("T")
MANIFEST = "manifest.json"
REPORT = "report.md"
#: Target statuses that do not fail a build: checked and passed, lowered and verified where the
#: checks cannot run here (Core ML off macOS, a remote device without an agent), or skipped
#: because the backend is not installed (said with the install hint).
SUCCESS = ("ok", "lowered", "skipped")
RANDOM_WARNING = ("calibrated on random data: no --calib data was given, so the scales are NOT meaningful; "
                  "pass --calib with real samples before shipping")


@dataclass
class BuildOptions:
    targets: list[str]
    out_dir: Path = Path("deploykit-out")
    targets_file: Path | None = None
    calib: Any = None  # path, module:function, or a callable
    eval: Any = None
    method: str | None = None
    percentile: float | None = None
    samples: int | None = None  # calibration samples
    eval_samples: int = 1000
    batch_size: int | None = None  # calibration batch size
    preprocess: Preprocess | None = None
    baseline: bool = True  # measure FP32 onnxruntime latency as the reference row
    example_inputs: tuple[Any, ...] | None = None  # with a torch.nn.Module: inputs for the dynamo export
    input_names: list[str] | None = None  # with a torch.nn.Module: ONNX input names
    task: str = "auto"  # classification (top-k, accuracy), other (cosine/L2 only), auto: from the output shape
    on_event: Callable[[str], None] = field(default=lambda msg: None)


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    targets: list[TargetResult]
    canonical: CanonicalModel

    @property
    def ok(self) -> bool:
        return all(t.status in SUCCESS for t in self.targets)


def build(model: Any, options: BuildOptions, registry: Registry | None = None,
          executor: Executor | None = None) -> BuildResult:
    """Build every target of ``options`` from an .onnx path, or a torch.nn.Module plus
    ``options.example_inputs`` (exported with the dynamo exporter at opset 18, dynamic batch).

    Each target's checks run as a :class:`deploykit.jobs.CheckJob` on ``executor`` (default:
    :class:`deploykit.jobs.LocalExecutor`, this process)."""
    registry = registry or load_registry()
    executor = executor or LocalExecutor(registry)
    out_dir = Path(options.out_dir)
    tf = load_targets(options.targets_file)
    targets = registry.resolve(tf, options.targets)  # fail fast on an unknown target, before any work
    if options.task not in checks.TASKS:
        raise ConfigError(f"task '{options.task}' is not one of {', '.join(checks.TASKS)}")
    calib_cfg = _calibration(tf.calibration, options)
    preprocess = options.preprocess or tf.preprocess
    owned = claim_out_dir(out_dir)  # files earlier builds wrote here: ours to overwrite, and to keep listing
    events = options.on_event

    if not isinstance(model, (str, os.PathLike)):
        if options.example_inputs is None:
            raise DeploykitError("building from a torch module needs BuildOptions.example_inputs (a tuple of tensors)")
        model = modelmod.export_torch(model, options.example_inputs, out_dir / "source.onnx", options.input_names)
    model = Path(model)
    started = time.monotonic()
    stages: dict[str, float] = {}
    raw = modelmod.load_onnx(model)
    fp32 = modelmod.normalise(raw, str(model))
    specs = modelmod.input_specs(fp32)
    source_hash = sha256(model)
    stages["load_and_normalise"] = time.monotonic() - started
    log.debug("normalised %s: opset 18, constants and BatchNorm folded, %d nodes; inputs %s", model,
              len(fp32.graph.node), ", ".join(f"{k} {d} {s}" for k, (s, d) in specs.items()))

    calib_src = data.open_source(calib_cfg.data, specs, preprocess, calib_cfg.samples)
    if calib_src is None:
        warnings.warn(RANDOM_WARNING, stacklevel=2)
        events("WARNING: " + RANDOM_WARNING)
        calib_src = data.RandomSource(specs, min(calib_cfg.samples, 64), calib_cfg.seed)
    eval_spec = options.eval if options.eval is not None else calib_cfg.eval
    eval_src = data.open_source(eval_spec, specs, preprocess, options.eval_samples) if eval_spec is not None else None
    eval_note = "" if eval_src is not None else (
        "evaluated on the calibration data (no --eval given)" if not calib_src.is_random else "evaluated on random data")
    if eval_src is None:
        eval_src = calib_src

    events(f"calibrating ({calib_cfg.method}) on {calib_src.description}")
    log.debug("calibrate: %s on up to %s samples of %s, batch %s; every activation and weight gets one scale "
              "in the canonical model", calib_cfg.method, calib_cfg.samples, calib_src.description, calib_cfg.batch_size)
    t0 = time.monotonic()
    result = quantize(fp32, calib_src, calib_cfg.method, calib_cfg.percentile, calib_cfg.batch_size, source_hash)
    canonical = write_canonical(result, fp32, out_dir)
    # a build that stops after this point must still be able to reuse its own folder
    owned |= {rel(p, out_dir) for p in out_dir.iterdir() if p.is_file()}
    _write_json(out_dir / MANIFEST, {"deploykit": __version__, "status": "incomplete", "files": sorted(owned)})
    calibrate_s = stages["calibrate"] = time.monotonic() - t0
    events(f"canonical model: {canonical.path} ({result.samples} samples, {calib_cfg.method})")

    fixed_batch = modelmod.fixed_batch(specs)
    if fixed_batch:
        targets = [_at_batch(t, fixed_batch, events) for t in targets]
    eval_batch = fixed_batch or (max(t.batch_sizes[0] for t in targets) if targets else 1)
    t0 = time.monotonic()
    eval_batches, labels = _eval_batches(eval_src, eval_batch)
    if eval_batches:
        canonical = dataclasses.replace(canonical, example_shapes={
            name: (1, *array.shape[1:]) for name, array in eval_batches[0].items()})
    log.debug("reference outputs: FP32 (accuracy reference) and canonical QDQ (fidelity reference) in onnxruntime "
              "on %d evaluation batches of %d", len(eval_batches), eval_batch)
    reference = _reference_outputs(canonical, eval_batches)
    classification = checks.classifies(options.task, reference["fp32"][0])
    fp32_acc = checks.task_accuracy(reference["fp32"][0], labels) if labels is not None and classification else None
    stages["reference_outputs"] = time.monotonic() - t0
    t0 = time.monotonic()
    baseline = _baseline_latency(canonical, targets, eval_batches) if options.baseline and targets else []
    if baseline:
        stages["baseline_latency"] = time.monotonic() - t0

    settings = CheckSettings(classification, fp32_acc, {entry["batch_size"]: entry["p50_ms"] for entry in baseline})

    def job_for(target: Target, artifact: Artifact) -> CheckJob:
        return CheckJob(target, artifact, canonical.path, canonical.fp32_path, tuple(eval_batches), labels,
                        tuple(reference["fp32"]), tuple(reference["canonical"]), settings)

    results = []
    t0 = time.monotonic()
    for target in targets:
        events(f"target {target.name} ({target.backend})")
        log.debug("%s: %s on device %s (%s), batch sizes %s, options %s, thresholds %s", target.name, target.backend,
                  target.device.name, target.device.kind, list(target.batch_sizes), dict(target.options) or "default",
                  dict(target.thresholds) or "none")
        results.append(_build_target(target, registry, executor, canonical, out_dir, job_for))
        r = results[-1]
        log.debug("%s: %s%s in %.1f s", target.name, r.status, f" ({r.reason})" if r.reason else "",
                  r.seconds.get("total", 0.0))
    stages["targets"] = time.monotonic() - t0
    stages["total"] = time.monotonic() - started

    manifest = _manifest(model, source_hash, canonical, result, calib_src, eval_src, eval_note, classification, fp32_acc,
                         baseline, results, out_dir, calibrate_s, time.monotonic() - started)
    manifest["stages"] = {k: round(v, 3) for k, v in stages.items()}
    # artifacts of earlier builds into this folder stay deploykit's (listed, never foreign)
    manifest["files"] = sorted(set(manifest["files"]) | {f for f in owned if (out_dir / f).is_file()})
    _write_json(out_dir / MANIFEST, manifest)
    from deploykit.report import markdown_report

    with atomic_output(out_dir / REPORT) as tmp:
        tmp.write_text(markdown_report(manifest), encoding="utf-8")
    return BuildResult(out_dir, manifest, results, canonical)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


def _calibration(cfg: Calibration, o: BuildOptions) -> Calibration:
    from dataclasses import replace

    changes = {k: v for k, v in {"method": o.method, "percentile": o.percentile, "samples": o.samples,
                                 "data": o.calib, "batch_size": o.batch_size}.items() if v is not None}
    return replace(cfg, **changes)


def claim_out_dir(out_dir: Path) -> set[str]:
    """Refuse an output folder with files deploykit did not write (never delete those).

    Returns the files earlier deploykit builds wrote there (from their manifest)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"{out_dir}: exists and is not a folder; choose another --out")
    if not out_dir.exists():
        return set()  # created by the first atomic write, so a failed build leaves no empty folder
    ours = {MANIFEST, REPORT}
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
            ours |= set(previous.get("files", []))
        except (ValueError, OSError):
            raise OutputDirError(f"{manifest}: not a deploykit manifest; choose an empty --out folder") from None
    foreign = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                     if p.is_file() and str(p.relative_to(out_dir)) not in ours)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputDirError(f"{out_dir}: holds files deploykit did not write ({foreign[0]}{more}); "
                             f"choose an empty or new --out folder")
    return ours - {MANIFEST, REPORT}


def _at_batch(target: Target, batch: int, events: Callable[[str], None]) -> Target:
    if target.batch_sizes == (batch,):
        return target
    events(f"{target.name}: the model has a fixed batch of {batch}; latency only at that batch "
           f"(export with a dynamic batch for batch_sizes {list(target.batch_sizes)})")
    return dataclasses.replace(target, batch_sizes=(batch,))


def _eval_batches(src: data.DataSource, batch_size: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    has_labels = True
    for b in src.batches(batch_size):
        feeds.append(b.feeds)
        if b.labels is None:
            has_labels = False
        else:
            labels.append(b.labels)
    return feeds, (np.concatenate(labels) if has_labels and labels else None)


def _reference_outputs(canonical: CanonicalModel, batches: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """FP32 (accuracy reference) and canonical QDQ (fidelity reference, exact Q/DQ semantics)
    outputs, in onnxruntime."""
    with bar(2, "reference outputs", "model") as b:
        fp32 = checks.run_all(fp32_runner(canonical.fp32_path), batches)
        b.update()
        qdq = checks.run_all(canonical_runner(canonical.path), batches)
        b.update()
    return {"fp32": fp32, "canonical": qdq}


def _baseline_latency(canonical: CanonicalModel, targets: list[Target],
                      batches: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    runner = fp32_runner(canonical.fp32_path)
    sizes = sorted({b for t in targets for b in t.batch_sizes})
    warmup, runs = max(t.warmup for t in targets), max(t.runs for t in targets)
    out = []
    for b in bar_iter(sizes, "FP32 baseline latency"):
        out.append(checks.measure_latency(runner, latency_feeds(batches, b), warmup, runs).to_json())
    return out


def bar_iter(items: list[T], desc: str) -> Iterator[T]:
    with bar(len(items), desc) as b:
        for item in items:
            yield item
            b.update()


def _build_target(target: Target, registry: Registry, executor: Executor, canonical: CanonicalModel, out_dir: Path,
                  job_for: Callable[[Target, Artifact], CheckJob]) -> TargetResult:
    """Probe, preflight, lower, then run the target's check job on ``executor``."""
    res = TargetResult(target)
    started = time.monotonic()
    with step(f"target {target.name} ({target.backend})", unit="stage") as stage:
        _build_target_stages(res, stage, registry, executor, canonical, out_dir, job_for)
    res.seconds["total"] = time.monotonic() - started
    return res


def _build_target_stages(res: TargetResult, stage: Any, registry: Registry, executor: Executor,
                         canonical: CanonicalModel, out_dir: Path,
                         job_for: Callable[[Target, Artifact], CheckJob]) -> None:
    target = res.target
    try:
        t0 = time.monotonic()
        backend = registry.get(target.backend)
        res.availability = backend.probe(target)
        pre_checks, res.metadata = backend.preflight(canonical, target)
        res.seconds["preflight"] = time.monotonic() - t0
        stage.total = 2 if not res.availability.can_run else 4  # preflight, lower[, load + accuracy, latency]
        stage.update()
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in pre_checks)
        if not res.availability.can_lower:
            res.status, res.reason = "skipped", _missing(res.availability)
            log.debug("%s: skipped: %s", target.name, res.reason)
            return
        dest = out_dir / target.name / f"{target.name}{backend.artifact_suffix}"
        t0 = time.monotonic()
        with bar(1, f"{target.name}: lower", "model") as b:
            res.artifact = backend.lower(canonical, target, dest)
            b.update()
        res.seconds["lower"] = time.monotonic() - t0
        stage.update()
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in res.artifact.checks)
        log.debug("%s: lowered to %s (%.1f MB) in %.1f s; verification: %s", target.name, res.artifact.path,
                  _size_mb(res.artifact.path), res.seconds["lower"],
                  ", ".join(f"{c.name} {c.status}" for c in res.artifact.checks) or "none")
        not_here = res.availability.reason if not res.availability.can_run else (
            f"device '{target.device.name}' is remote ({target.device.address}) and this version has no remote "
            f"agent; copy {dest.name} to the device to check it there" if target.device.address else "")
        if not_here:
            res.status, res.reason = "lowered", f"lowered and verified; checks not run: {not_here}"
            for name in ("top1_agreement", "cosine", "fidelity_rel_l2", "latency_p50_ms"):
                res.checks.append(CheckResult(name, "not_run", message=not_here))
        else:
            job = job_for(target, res.artifact)
            log.debug("%s: check job: %d evaluation batches against FP32 and the canonical model, latency at batch "
                      "sizes %s (%d warm-up, %d runs each)", target.name, len(job.inputs), list(target.batch_sizes),
                      target.warmup, target.runs)
            checked = executor.run(job)
            stage.update(2)
            res.checks.extend(checked.checks)
            res.latency.extend(checked.latency)
            res.seconds.update(checked.seconds)
            res.metadata.update(checked.notes)
        try:
            res.device_info = backend.device_info(target)
        except Exception as exc:  # device facts are nice to have, never fatal
            res.device_info = {"error": f"{type(exc).__name__}: {exc}"}
    except DeploykitError as exc:
        res.status, res.reason = "error", str(exc)
        return
    except Exception as exc:  # a plugin bug must not lose the other targets
        log.debug("target %s failed", target.name, exc_info=True)
        res.status, res.reason = "error", f"{type(exc).__name__}: {exc}"
        return
    if any(c.status == "fail" for c in res.checks):
        res.status = "failed"
        failed = [c.name for c in res.checks if c.status == "fail"]
        res.reason = "failed checks: " + ", ".join(failed)


def _size_mb(path: Path) -> float:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return p.stat().st_size / 2**20 if p.exists() else 0.0


def _missing(av: Availability) -> str:
    return av.reason + (f" (install: {av.install_hint})" if av.install_hint else "")


def _versions() -> dict[str, str]:
    out = {"deploykit": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnx", "onnxruntime", "pluggy", "openvino", "tensorflow", "ai-edge-litert",
                 "coremltools", "tensorrt", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _manifest(model: Path, source_hash: str, canonical: CanonicalModel, q: QuantizeResult, calib_src: data.DataSource,
              eval_src: data.DataSource, eval_note: str, classification: bool, fp32_acc: float | None,
              baseline: list[dict[str, Any]], results: list[TargetResult], out_dir: Path, calibrate_s: float,
              total_s: float) -> dict[str, Any]:
    qdq_nodes = [n for n in canonical.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    files = [canonical.path, canonical.fp32_path, canonical.path.with_name(canonical.path.name.replace(".qdq.onnx", ".calib.json"))]
    if model.parent.resolve() == out_dir.resolve():  # exported from a torch module into the output folder
        files.append(model)
    for r in results:
        if r.artifact is not None:
            files.extend(f for f in (r.artifact.files or (r.artifact.path,)))
            files.append(r.artifact.path)
    listed: set[str] = set()
    for f in files:
        f = Path(f)
        for p in ([f] if f.is_file() else [p for p in f.rglob("*") if p.is_file()] if f.is_dir() else []):
            listed.add(rel(p, out_dir))
    return {
        "schema_version": SCHEMA_VERSION,
        "deploykit": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node()},
        "versions": _versions(),
        "model": {"path": str(model), "sha256": source_hash},
        "calibration": {"method": q.method, "samples": q.samples, "data": calib_src.description,
                        "data_sha256": q.data_hash, "random_data": q.random_data,
                        "warning": RANDOM_WARNING if q.random_data else "", "seconds": round(calibrate_s, 3)},
        "evaluation": {"data": eval_src.description, "note": eval_note, "classification": classification,
                       "fp32_accuracy": fp32_acc},
        "canonical": {"path": rel(canonical.path, out_dir), "sha256": sha256(canonical.path),
                      "fp32_path": rel(canonical.fp32_path, out_dir),
                      "calibration_table": rel(files[2], out_dir), "calibration_table_sha256": sha256(files[2]),
                      "qdq_nodes": len(qdq_nodes), "tensors_in_table": len(canonical.calibration)},
        "baseline": {"backend": "onnxruntime", "precision": "fp32", "latency": baseline},
        "targets": [r.to_json(out_dir) for r in results],
        "files": sorted(listed | {MANIFEST, REPORT}),
        "seconds": round(total_s, 3),
    }
