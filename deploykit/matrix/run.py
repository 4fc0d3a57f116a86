"""Run a benchmark matrix: models x targets x batch sizes x precisions.

Per model: normalise, calibrate once into the canonical model (cached by content), evaluate
FP32 in onnxruntime as the accuracy reference. Per model x target (one *group*): lower the
INT8 artifact (cached by content: an unchanged cell is never rebuilt), load it and the same
runtime's FP32 model, measure accuracy per precision, then time every precision of each batch
size in interleaved rounds. Each finished cell goes to the journal and the history at once,
so an interrupted matrix resumes; an error fails its own cells only.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deploykit import checks, data, model as modelmod
from deploykit.errors import ConfigError, DeploykitError
from deploykit.fileio import sha256 as file_hash
from deploykit.history import History
from deploykit.matrix.cache import (
    Cache,
    key_of,
    load_artifact,
    save_artifact,
    toolchain_versions,
)
from deploykit.matrix.cell import Cell
from deploykit.matrix.journal import Journal
from deploykit.matrix.measure import interleaved, rss_mb, summarise_ratio
from deploykit.matrix.spec import MatrixSpec, ModelSpec
from deploykit.plugins import Registry, load_registry
from deploykit.targets import Target, TargetsFile, load_targets

log = logging.getLogger("deploykit")

#: below this FP32 p50 (ms per call) the guard blames per-call overhead
TINY_CALL_MS = 0.25


@dataclass
class MatrixOptions:
    out_dir: Path
    db: Path | None = None
    cache_dir: Path | None = None
    on_event: Callable[[str], None] = field(default=lambda msg: None)
    on_cell: Callable[[Cell, int, int], None] = field(default=lambda cell, done, total: None)


@dataclass
class MatrixResult:
    run_id: int
    resumed: bool
    cells: list[Cell]
    seconds: float
    out_dir: Path
    db: Path
    env: dict[str, Any]
    rebuilt: int = 0  # artifacts lowered in this run (0 on an unchanged rerun)

    @property
    def errors(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "error"]


def plan(spec: MatrixSpec, targets: list[Target]) -> list[tuple[ModelSpec, Target, int, str]]:
    return [(m, t, b, p) for m in spec.models for t in targets for b in spec.batch_sizes for p in spec.precisions]


def resolve_targets(spec: MatrixSpec, registry: Registry) -> list[Target]:
    path = spec.targets_file
    if path is None and Path("targets.toml").is_file():
        path = Path("targets.toml")
    tf = load_targets(path) if path is not None else TargetsFile(None, {}, {})
    return [replace(t, batch_sizes=spec.batch_sizes) for t in registry.resolve(tf, list(spec.targets))]


def host_env() -> dict[str, Any]:
    """The environment every cell records."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from deploykit import cpu as cpuinfo

    dot = ("VNNI" if not cpuinfo.u8s8_saturates() else "no VNNI") if cpuinfo.is_x86() else platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "machine": platform.machine(),
            "int8_dot_product": dot, "node": platform.node(), "versions": toolchain_versions()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - Windows
        return []


def run_matrix(spec: MatrixSpec, opts: MatrixOptions, registry: Registry | None = None) -> MatrixResult:
    registry = registry or load_registry()
    targets = resolve_targets(spec, registry)  # unknown targets fail before any work
    for m in spec.models:
        if not m.path.is_file():
            raise ConfigError(f"{spec.path or 'matrix.toml'}: model '{m.name}': {m.path} not found")
    cells_plan = plan(spec, targets)
    env = host_env()
    fingerprint = spec.fingerprint()
    journal = Journal(opts.out_dir)
    journal.lock()
    started = time.monotonic()
    try:
        journal.read()
        history = History(opts.db)
        db = str(history.path.resolve())
        with history:
            resumed = journal.resumable(fingerprint, db)
            if resumed:
                run_id = int(journal.header["run_id"])
                history.reopen_run(run_id)
                history.add_cells(run_id, journal.cells.values())  # the journal is the truth for this folder
                opts.on_event(f"resuming run {run_id}: {len(journal.cells)} of {len(cells_plan)} cells already done")
            else:
                run_id = history.start_run("matrix", str(spec.path or ""), fingerprint, str(opts.out_dir.resolve()),
                                           {**env, "load_average": load_average()})
            journal.start({"run_id": run_id, "fingerprint": fingerprint, "db": db, "status": "running",
                           "spec": str(spec.path or "")}, keep_cells=resumed)
            runner = _Runner(spec, opts, registry, history, journal, run_id, env, len(cells_plan))
            for m in spec.models:
                runner.model(m, targets)
            history.finish_run(run_id)
            journal.complete()
        order = {(m.name, t.name, b, p): i for i, (m, t, b, p) in enumerate(cells_plan)}
        cells = sorted((Cell.from_json(c) for c in journal.cells.values()),
                       key=lambda c: order.get((c.model, c.target, c.batch_size, c.precision), 1 << 30))
        return MatrixResult(run_id, resumed, cells, time.monotonic() - started, opts.out_dir, Path(db), env,
                            runner.rebuilt)
    finally:
        journal.unlock()


class _Runner:
    def __init__(self, spec: MatrixSpec, opts: MatrixOptions, registry: Registry, history: History,
                 journal: Journal, run_id: int, env: dict[str, Any], total: int) -> None:
        self.spec, self.opts, self.registry = spec, opts, registry
        self.history, self.journal, self.run_id, self.env = history, journal, run_id, env
        self.total = total
        self.cache = Cache(opts.cache_dir)
        self.rebuilt = 0

    # ------------------------------------------------------------------ bookkeeping
    def done(self, key: str) -> bool:
        return key in self.journal.cells

    def record(self, cell: Cell) -> None:
        if self.done(cell.key):  # resumed: never measured twice
            return
        raw = cell.to_json()
        self.journal.add(cell.key, raw)
        self.history.add_cells(self.run_id, [raw])
        self.opts.on_cell(cell, len(self.journal.cells), self.total)

    def blank(self, m: ModelSpec, t: Target, b: int, p: str) -> Cell:
        threads = t.options.get("threads", t.options.get("num_threads", "default")) or "default"
        return Cell(m.name, t.name, t.backend, t.device.name, b, p,
                    env={**self.env, "threads": threads, "device_kind": t.device.kind})

    def fail_all(self, m: ModelSpec, targets: list[Target], message: str, status: str = "error") -> None:
        for t in targets:
            for b in self.spec.batch_sizes:
                for p in self.spec.precisions:
                    cell = self.blank(m, t, b, p)
                    cell.status, cell.error = status, message  # type: ignore[assignment]
                    self.record(cell)

    # ------------------------------------------------------------------ per model
    def model(self, m: ModelSpec, targets: list[Target]) -> None:
        keys = [self.blank(m, t, b, p).key for t in targets for b in self.spec.batch_sizes for p in self.spec.precisions]
        if all(self.done(k) for k in keys):
            return
        self.opts.on_event(f"model {m.name}: calibrating ({self.spec.method}) and FP32 reference")
        try:
            prepared = self.prepare(m)
        except DeploykitError as exc:
            self.fail_all(m, targets, f"model {m.name}: {exc}")
            return
        except Exception as exc:  # a model that breaks calibration must not lose the other models
            log.debug("model %s failed", m.name, exc_info=True)
            self.fail_all(m, targets, f"model {m.name}: {type(exc).__name__}: {exc}")
            return
        for t in targets:
            self.group(m, t, prepared)

    def prepare(self, m: ModelSpec) -> _Prepared:
        from deploykit.quantize import load_canonical, quantize, write_canonical

        raw = modelmod.load_onnx(m.path)
        fp32 = modelmod.normalise(raw, str(m.path))
        specs = modelmod.input_specs(fp32)
        versions = self.env["versions"]
        calib_hash = file_hash(m.calib) if m.calib and Path(m.calib).exists() else str(m.calib)
        ckey = key_of("canonical", file_hash(m.path), calib_hash, self.spec.method, self.spec.calib_samples,
                      versions.get("deploykit"), versions.get("onnx"), versions.get("onnxruntime"))

        def build(folder: Path) -> None:
            src = data.open_source(m.calib, specs, None, self.spec.calib_samples) if m.calib else None
            if src is None:
                warnings.warn(f"model {m.name}: no calib data; calibrating on random inputs", stacklevel=2)
                src = data.RandomSource(specs, 64, 0)
            result = quantize(fp32, src, self.spec.method, source_hash=file_hash(m.path))
            write_canonical(result, fp32, folder)

        folder, built = self.cache.get_or_build("canonical", ckey, build)
        canonical = load_canonical(folder / "canonical.qdq.onnx")
        eval_spec = m.eval or m.calib
        src = data.open_source(eval_spec, specs, None, self.spec.eval_samples) if eval_spec else None
        if src is None:
            src = data.RandomSource(specs, 64, 1)
        fixed = modelmod.fixed_batch(specs)
        eval_batch = fixed or max(self.spec.batch_sizes)
        feeds, label_arr = data.collect_batches(src, eval_batch)
        reference = checks.run_all(_ort_runner(canonical.fp32_path, {}), feeds)
        classification = checks.classifies(m.task, reference[0])
        fp32_acc = checks.task_accuracy(reference[0], label_arr) if label_arr is not None and classification else None
        if feeds:  # what a target that needs fixed shapes (TFLite) fixes dynamic dims to, as the build does
            canonical = replace(canonical, example_shapes={name: (1, *a.shape[1:]) for name, a in feeds[0].items()})
        return _Prepared(canonical, ckey, built, feeds, label_arr, reference, classification, fp32_acc, fixed)

    # ------------------------------------------------------------------ per model x target
    def group(self, m: ModelSpec, t: Target, prep: _Prepared) -> None:
        """One model on one target: every batch size and precision (the unit a check job runs)."""
        todo = [(b, p) for b in self.spec.batch_sizes for p in self.spec.precisions
                if not self.done(self.blank(m, t, b, p).key)]
        if not todo:
            return
        self.opts.on_event(f"model {m.name} on {t.name} ({t.backend})")
        t0 = time.monotonic()
        try:
            backend = self.registry.get(t.backend)
            av = backend.probe(t)
            if not av.can_lower:
                self._not_run(m, t, todo, f"{av.reason}" + (f" (install: {av.install_hint})" if av.install_hint else ""))
                return
            art_info: dict[str, Any] = {}
            artifact = None
            if "int8" in self.spec.precisions:
                artifact, art_info = self.lower(backend, t, prep)
            not_here = av.reason if not av.can_run else (
                f"device '{t.device.name}' is remote ({t.device.address}); its checks run through its agent"
                if t.device.address else "")
            if not_here:
                what = "lowered and verified; " if artifact is not None else ""
                self._not_run(m, t, todo, f"{what}checks not run: {not_here}", art_info)
                return
            self._measure(m, t, prep, backend, artifact, art_info, todo, time.monotonic() - t0)
        except DeploykitError as exc:
            self._errors(m, t, todo, str(exc))
        except Exception as exc:  # a plugin bug fails this group's cells only
            log.debug("group %s/%s failed", m.name, t.name, exc_info=True)
            self._errors(m, t, todo, f"{type(exc).__name__}: {exc}")

    def lower(self, backend: Any, t: Target, prep: _Prepared) -> tuple[Any, dict[str, Any]]:
        akey = key_of("artifact", prep.canonical_key, t.backend, dict(t.options), self.env["versions"],
                      dict(prep.canonical.example_shapes or {}))

        def build(folder: Path) -> None:
            art = backend.lower(prep.canonical, t, folder / f"{t.name}{backend.artifact_suffix}")
            save_artifact(art, folder)

        t0 = time.monotonic()
        folder, built = self.cache.get_or_build("artifacts", akey, build)
        if built:
            self.rebuilt += 1
        artifact = load_artifact(folder)
        info = {"key": akey, "path": str(artifact.path), "rebuilt": built,
                "lower_seconds": round(time.monotonic() - t0, 3) if built else 0.0,
                "checks": [{"name": c.name, "status": c.status, "value": c.value, "message": c.message}
                           for c in artifact.checks]}
        return artifact, info

    def _not_run(self, m: ModelSpec, t: Target, todo: list[tuple[int, str]], why: str,
                 art_info: Mapping[str, Any] | None = None) -> None:
        for b, p in todo:
            cell = self.blank(m, t, b, p)
            cell.status, cell.error = "not_run", why
            if p == "int8" and art_info:
                cell.artifact = dict(art_info)
            self.record(cell)

    def _errors(self, m: ModelSpec, t: Target, todo: list[tuple[int, str]], why: str) -> None:
        for b, p in todo:
            cell = self.blank(m, t, b, p)
            cell.status, cell.error = "error", why
            self.record(cell)

    def _measure(self, m: ModelSpec, t: Target, prep: _Prepared, backend: Any, artifact: Any,
                 art_info: dict[str, Any], todo: list[tuple[int, str]], lower_s: float) -> None:
        precisions = sorted({p for _, p in todo}, key=["fp32", "fp16", "int8"].index)
        base_rss = rss_mb()
        runners: dict[str, Any] = {}
        notes: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="deploykit-matrix-") as scratch:
            if "int8" in precisions:
                runners["int8"] = backend.load(artifact, t)
            if "fp32" in precisions or "int8" in precisions:
                fp32 = backend.fp32_runner(prep.canonical, t, Path(scratch))
                if fp32 is None and t.backend == "onnxruntime":
                    fp32 = _ort_runner(prep.canonical.fp32_path, t.options)
                if fp32 is None:
                    notes["fp32"] = f"backend {t.backend} has no FP32 runner"
                else:
                    runners["fp32"] = fp32
            if "fp16" in precisions:
                notes["fp16"] = f"backend {t.backend} has no fp16 mode on this device"
            try:
                load_s = time.monotonic()
                accuracy = {p: self._accuracy(r, prep) for p, r in runners.items()}
                acc_s = time.monotonic() - load_s
                for b in self.spec.batch_sizes:
                    wanted = [p for p in precisions if (b, p) in todo]
                    if not wanted:
                        continue
                    timed = {p: runners[p] for p in precisions if p in runners}  # FP32 always, for the speed-up
                    feeds = _latency_feeds(prep.feeds, b if not prep.fixed_batch else prep.fixed_batch)
                    t1 = time.monotonic()
                    try:
                        timings, ratios = interleaved(timed, feeds, self.spec.rounds, self.spec.warmup,
                                                      self.spec.min_round_ms) if timed else ({}, {})
                    except Exception as exc:
                        log.debug("timing %s/%s b%d failed", m.name, t.name, b, exc_info=True)
                        self._errors(m, t, [(b, p) for p in wanted], f"timing at batch {b}: {type(exc).__name__}: {exc}")
                        continue
                    load = load_average()
                    for p in wanted:
                        cell = self.blank(m, t, b, p)
                        cell.env["load_average"] = load
                        cell.seconds = {"lower": round(lower_s, 3), "accuracy": round(acc_s, 3),
                                        "timing": round(time.monotonic() - t1, 3)}
                        if p == "int8":
                            cell.artifact = dict(art_info)
                        elif p == "fp32":
                            cell.artifact = {"key": prep.canonical_key, "path": str(prep.canonical.fp32_path),
                                             "rebuilt": prep.canonical_built}
                        if p not in timings:
                            cell.status, cell.error = "not_run", notes.get(p, f"no {p} runner")
                            self.record(cell)
                            continue
                        tm = timings[p]
                        cell.p50_ms, cell.p90_ms, cell.p99_ms = tm.p50_ms, tm.p90_ms, tm.p99_ms
                        cell.spread, cell.round_ms, cell.calls_per_round = tm.spread, tm.round_ms, tm.calls_per_round
                        cell.throughput = tm.throughput
                        cell.memory_mb = round(max(0.0, tm.peak_rss_mb - base_rss), 1)
                        if "fp32" in timings:
                            cell.fp32_p50_ms = timings["fp32"].p50_ms
                        if p in ratios:
                            cell.speedup, cell.speedup_spread = summarise_ratio(ratios[p])
                        elif p == "fp32":
                            cell.speedup, cell.speedup_spread = 1.0, 0.0
                        acc = accuracy.get(p, {})
                        cell.top1_agreement, cell.cosine = acc.get("top1_agreement"), acc.get("cosine")
                        cell.accuracy, cell.fp32_accuracy = acc.get("accuracy"), prep.fp32_accuracy
                        cell.eval_samples = int(acc.get("n", 0))
                        if p == "int8":
                            cell.guard = guard(cell, art_info)
                        self.record(cell)
            finally:
                for runner in runners.values():  # runners that hold native sessions say so with close()
                    close = getattr(runner, "close", None)
                    if callable(close):
                        close()

    def _accuracy(self, runner: Any, prep: _Prepared) -> dict[str, float]:
        got = checks.run_all(runner, prep.feeds)
        measured = checks.compare(prep.reference, got, classification=prep.classification)
        out = {"cosine": measured["cosine"], "n": float(len(got[0]))}
        if "top1_agreement" in measured:
            out["top1_agreement"] = measured["top1_agreement"]
        if prep.labels is not None and prep.classification:
            out["accuracy"] = checks.task_accuracy(got[0], prep.labels)
        return out


def guard(cell: Cell, art_info: Mapping[str, Any]) -> str:
    """The performance guard: an INT8 cell not faster than the same runtime's FP32, with the
    likely cause ('' when it is faster)."""
    if cell.speedup is None or cell.speedup > 1.0:
        return ""
    causes = []
    for c in art_info.get("checks", []):
        if c.get("name") == "int8_fraction" and c.get("value") is not None and c["value"] < 1.0:
            causes.append(f"float fallback layers ({c.get('message', '')})")
    if cell.fp32_p50_ms is not None and cell.fp32_p50_ms / max(cell.batch_size, 1) < TINY_CALL_MS:
        causes.append(f"per-call overhead on a tiny model (FP32 takes {cell.fp32_p50_ms:.3f} ms per call)")
    if not causes and cell.env.get("int8_dot_product") == "no VNNI":
        causes.append("this x86 CPU has no VNNI: its int8 dot products (vpmaddubsw) are barely faster than FP32 FMA, "
                      "so this runtime's INT8 kernels do not beat its FP32 ones at this size")
    if not causes:
        causes.append("this runtime's INT8 kernels are no faster than its FP32 ones on this CPU at this size")
    return f"INT8 not faster than {cell.backend} FP32 ({cell.speedup:.2f}x): likely " + "; ".join(causes)


@dataclass
class _Prepared:
    canonical: Any
    canonical_key: str
    canonical_built: bool
    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    reference: list[np.ndarray]
    classification: bool
    fp32_accuracy: float | None
    fixed_batch: int | None


def _ort_runner(path: Path, options: Mapping[str, Any]) -> Any:
    """FP32 in onnxruntime with the target's thread and optimisation options."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = int(options.get("threads") or 0)
    if threads:
        so.intra_op_num_threads = threads
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so.graph_optimization_level = levels.get(str(options.get("graph_optimization_level", "all")),
                                             ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    class _Runner:
        def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            return list(session.run(None, dict(feeds)))

    return _Runner()


def _latency_feeds(batches: list[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` evaluation samples (repeated when there are fewer)."""
    taken, n = [], 0
    for b in batches:
        taken.append(b)
        n += len(next(iter(b.values())))
        if n >= batch_size:
            break
    reps = -(-batch_size // max(n, 1))
    return {k: np.ascontiguousarray(np.concatenate([b[k] for b in taken] * reps)[:batch_size]) for k in taken[0]}
