"""Run a benchmark matrix: models x targets x batch sizes x precisions.

Per model: normalise, calibrate once into the canonical model (cached by content), evaluate
FP32 and the canonical model in onnxruntime as the references. Per model x target (one
*group*): lower the INT8 artifact (cached by content: an unchanged cell is never rebuilt),
then run the group as one :class:`deploykit.jobs.CheckJob` on the executor
(``MatrixOptions.executor``: this process by default; a device agent or Ray elsewhere): the
job measures the artifact's and the backend's FP32 accuracy, and times both in alternating
rounds at every batch size. Each finished cell goes to the journal and the history at once,
so an interrupted matrix resumes; an error fails its own cells only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deploykit import checks, data, model as modelmod, timing
from deploykit.errors import ConfigError, DeploykitError
from deploykit.fileio import sha256 as file_hash
from deploykit.history import History
from deploykit.jobs import CheckJob, CheckSettings, Executor, LocalExecutor
from deploykit.matrix.cache import (
    Cache,
    key_of,
    load_artifact,
    save_artifact,
    toolchain_versions,
)
from deploykit.matrix.cell import Cell
from deploykit.matrix.render import write_outputs
from deploykit.matrix.spec import MatrixSpec, ModelSpec
from deploykit.outdir import OutDir
from deploykit.pipeline import choose_profile, resolve_recipe
from deploykit.plugins import Registry, load_registry
from deploykit.reference import canonical_runner, fp32_runner
from deploykit.remote import DEVICE_NOTE, on_devices
from deploykit.results import CheckResult
from deploykit.targets import Target, TargetsFile, load_targets

log = logging.getLogger("deploykit")

#: below this FP32 p50 (ms per call) the guard blames per-call overhead
TINY_CALL_MS = 0.25
#: an INT8 cell whose CPU time per call is this much below FP32's, measured under a load above
#: the machine's cores, is not guarded for a wall-clock ratio at or below 1.0 (see guard())
CPU_CLEARS = 1.05


@dataclass
class MatrixOptions:
    out_dir: Path
    db: Path | None = None
    cache_dir: Path | None = None
    #: runs each model x target's check job (default: LocalExecutor, this process)
    executor: Executor | None = None
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
    meta: dict[str, Any] = field(default_factory=dict)  # what the outputs say besides the cells
    files: list[Path] = field(default_factory=list)  # the outputs written

    @property
    def errors(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "error"]


def plan(spec: MatrixSpec, targets: list[Target]) -> list[tuple[ModelSpec, Target, int, str]]:
    return [(m, t, b, p) for m in spec.models for t in targets for b in spec.batch_sizes for p in spec.precisions]


def targets_file_of(spec: MatrixSpec) -> Path | None:
    """The spec's targets file, else ./targets.toml when there is one."""
    if spec.targets_file is None and Path("targets.toml").is_file():
        return Path("targets.toml")
    return spec.targets_file


def resolve_targets(spec: MatrixSpec, registry: Registry) -> tuple[TargetsFile, list[Target]]:
    """The targets file (the spec's, else ./targets.toml, else none) and the matrix's targets."""
    path = targets_file_of(spec)
    tf = load_targets(path) if path is not None else TargetsFile(None, {}, {})
    return tf, [replace(t, batch_sizes=spec.batch_sizes) for t in registry.resolve(tf, list(spec.targets))]


@dataclass(frozen=True)
class Calibrate:
    """How each model is calibrated: what ``deploykit build`` does with the same targets file
    and these targets (method, samples, percentile, batch, recipe, activation profile, float
    islands), unless the spec says otherwise; so a matrix cell's artifact is the build's."""

    method: str
    samples: int
    percentile: float
    batch_size: int
    recipe: str  # unresolved ("auto" is resolved per network)
    recipe_where: str
    activations: str
    activations_why: str
    keep_float: tuple[str, ...]
    keep_float_where: str
    preprocess: Any

    @classmethod
    def of(cls, spec: MatrixSpec, tf: TargetsFile, targets: list[Target], registry: Registry) -> Calibrate:
        cal = tf.calibration
        where = str(spec.path or "matrix.toml") + " [matrix] key '{}'"
        profile, why = choose_profile(targets, registry, spec.activations, tf.quantization.activations,
                                      tf.where("quantization", "activations"))
        return cls(spec.method or cal.method, spec.calib_samples or cal.samples, cal.percentile, cal.batch_size,
                   spec.recipe if spec.recipe is not None else cal.recipe,
                   where.format("recipe") if spec.recipe is not None else tf.where("calibration", "recipe"),
                   profile, why, tuple(tf.quantization.keep_float), tf.where("quantization", "keep_float"),
                   tf.preprocess)

    def describe(self, recipe: str) -> str:
        return f"{self.method}, {self.activations} activations ({self.activations_why}), recipe {recipe}"


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
    """Measure every cell of ``spec`` into ``opts.out_dir`` and the history; write the outputs.

    The folder is a :class:`deploykit.outdir.OutDir`: locked for the run, each finished cell a
    journaled step, so a rerun after an interruption resumes the same run id and measures only
    the missing cells; the outputs (matrix.md, .csv, .json, .html) replace the previous run's
    only at the end."""
    registry = registry or load_registry()
    tf, targets = resolve_targets(spec, registry)  # unknown targets fail before any work
    calibrate = Calibrate.of(spec, tf, targets, registry)  # a bad profile or target fails here too
    for m in spec.models:
        if not m.path.is_file():
            raise ConfigError(f"{spec.path or 'matrix.toml'}: model '{m.name}': {m.path} not found")
    cells_plan = plan(spec, targets)
    env = host_env()
    fingerprint = spec.fingerprint()
    started = time.monotonic()
    with OutDir(opts.out_dir) as out:
        history = History(opts.db)
        db = str(history.path.resolve())
        with history:
            run_key = key_of("matrix-run", fingerprint, db)
            header = out.finished(RUN_STEP, run_key)
            resumed = header is not None
            if header is not None:
                run_id = int(header["run_id"])
                history.reopen_run(run_id)
            else:
                run_id = history.start_run("matrix", str(spec.path or ""), fingerprint, str(opts.out_dir.resolve()),
                                           {**env, "load_average": load_average()})
                with out.step(RUN_STEP, run_key) as step:
                    step.payload.update(run_id=run_id, fingerprint=fingerprint, db=db)
            runner = _Runner(spec, opts, registry, history, out, f"{run_key}:{run_id}", run_id, env, len(cells_plan),
                             calibrate)
            kept = [runner.finished(_key(m, t, b, p)) for m, t, b, p in cells_plan]
            if resumed:  # the folder's journal is the truth: the history gets each kept cell (once)
                history.add_cells(run_id, [c for c in kept if c is not None])
                opts.on_event(f"resuming run {run_id}: {sum(c is not None for c in kept)} of {len(cells_plan)} "
                              f"cells already done")
            for m in spec.models:
                runner.model(m, targets)
            history.finish_run(run_id)
        order = {(m.name, t.name, b, p): i for i, (m, t, b, p) in enumerate(cells_plan)}
        cells = sorted((Cell.from_json(c) for c in runner.cells.values()),
                       key=lambda c: order.get((c.model, c.target, c.batch_size, c.precision), 1 << 30))
        result = MatrixResult(run_id, resumed, cells, time.monotonic() - started, opts.out_dir, Path(db), env,
                              runner.rebuilt)
        result.meta = _meta(spec, result)
        with out.step(OUTPUT_STEP, uuid.uuid4().hex) as step:
            write_outputs(step.dir, cells, result.meta)
        manifest = {"kind": "deploykit.matrix", "run_id": run_id, "spec": str(spec.path or ""), "db": db,
                    "cells": len(cells), "errors": len(result.errors), "summary": result.meta["summary"]}
        published = out.publish({name: "" for name in out.journal["steps"]}, manifest, None)
        result.files = [opts.out_dir / f for f in published if f.startswith("matrix.")]
        return result


RUN_STEP = "run"
OUTPUT_STEP = "outputs"


def _key(m: ModelSpec, t: Target, b: int, p: str) -> str:
    return f"{m.name}/{t.name}/b{b}/{p}"  # = Cell.key


def _step_name(cell_key: str) -> str:
    """A cell's journal step (a folder name: the key's hash, since cell keys hold slashes)."""
    return "cell-" + hashlib.sha256(cell_key.encode()).hexdigest()[:24]


def _meta(spec: MatrixSpec, result: MatrixResult) -> dict[str, Any]:
    """What the outputs say about the run besides the cells."""
    loads = sorted({tuple(c.env.get("load_average", [])) for c in result.cells if c.env.get("load_average")})
    ok = [c for c in result.cells if c.status == "ok"]
    summary = (f"{len(result.cells)} cells ({len(ok)} measured, {len(result.errors)} errors) in "
               f"{result.seconds:.1f} s; {result.rebuilt} artifact(s) built, the rest reused from the cache"
               + ("; resumed" if result.resumed else ""))
    return {"run_id": result.run_id, "spec": str(spec.path or ""), "summary": summary, "env": result.env,
            "load_average": f"{loads[0][0]}-{loads[-1][0]}" if loads else "n/a", "db": str(result.db),
            "seconds": round(result.seconds, 1), "rebuilt": result.rebuilt, "resumed": result.resumed}


class _Runner:
    def __init__(self, spec: MatrixSpec, opts: MatrixOptions, registry: Registry, history: History,
                 out: OutDir, run_key: str, run_id: int, env: dict[str, Any], total: int,
                 calibrate: Calibrate) -> None:
        self.spec, self.opts, self.registry, self.calibrate = spec, opts, registry, calibrate
        self.history, self.out, self.run_key, self.run_id, self.env = history, out, run_key, run_id, env
        self.total = total
        self.cache = Cache(opts.cache_dir)
        # a remote device's cells go to its agent, unless the executor places jobs itself (Ray)
        self.executor: Executor = on_devices(opts.executor or LocalExecutor(registry))
        self.rebuilt = 0
        self.cells: dict[str, dict[str, Any]] = {}  # this run's finished cells, kept and new

    # ------------------------------------------------------------------ bookkeeping
    def finished(self, key: str) -> dict[str, Any] | None:
        """A cell this run finished before an interruption (its journal step), else None."""
        payload = self.out.finished(_step_name(key), self.run_key)
        if payload is not None:
            self.cells[key] = payload["cell"]
            return dict(payload["cell"])
        return None

    def done(self, key: str) -> bool:
        return key in self.cells

    def record(self, cell: Cell) -> None:
        if self.done(cell.key):  # resumed: never measured twice
            return
        raw = cell.to_json()
        with self.out.step(_step_name(cell.key), self.run_key) as step:  # journaled (fsync) before it counts
            step.payload["cell"] = raw
        self.cells[cell.key] = raw
        self.history.add_cells(self.run_id, [raw])
        self.opts.on_cell(cell, len(self.cells), self.total)

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
        self.opts.on_event(f"model {m.name}: canonical model (cached by content) and the references")
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
        from deploykit.quantize import load_canonical, quantize, requantize, write_canonical
        from deploykit.quantize.islands import resolve_keep_float

        c = self.calibrate
        raw = modelmod.load_onnx(m.path)
        fp32 = modelmod.normalise(raw, str(m.path))
        specs = modelmod.input_specs(fp32)
        versions = self.env["versions"]
        recipe = resolve_recipe(None, c.recipe, c.recipe_where, fp32)
        float_layers = resolve_keep_float(fp32, list(c.keep_float), c.keep_float_where) if c.keep_float else []
        calib_hash = file_hash(m.calib) if m.calib and Path(m.calib).exists() else str(m.calib)
        ckey = key_of("canonical", file_hash(m.path), calib_hash, c.method, c.samples, c.percentile, c.batch_size,
                      recipe, c.activations, float_layers, str(c.preprocess), versions.get("deploykit"),
                      versions.get("onnx"), versions.get("onnxruntime"))

        def build(folder: Path) -> None:
            src = data.open_source(m.calib, specs, c.preprocess, c.samples) if m.calib else None
            if src is None:
                warnings.warn(f"model {m.name}: no calib data; calibrating on random inputs", stacklevel=2)
                src = data.RandomSource(specs, 64, 0)
            self.opts.on_event(f"model {m.name}: calibrating ({c.describe(recipe)}) on {src.description}")
            result = quantize(fp32, src, c.method, c.percentile, c.batch_size, file_hash(m.path),
                              activations=c.activations, recipe=recipe)
            if float_layers:  # from the same statistics, as the build
                result = requantize(result, fp32, float_layers=float_layers)
            write_canonical(result, fp32, folder)

        folder, built = self.cache.get_or_build("canonical", ckey, build)
        canonical = load_canonical(folder / "canonical.qdq.onnx")
        eval_spec = m.eval or m.calib
        src = data.open_source(eval_spec, specs, c.preprocess, self.spec.eval_samples) if eval_spec else None
        if src is None:
            src = data.RandomSource(specs, 64, 1)
        fixed = modelmod.fixed_batch(specs)
        eval_batch = fixed or max(self.spec.batch_sizes)
        feeds, label_arr = data.collect_batches(src, eval_batch)
        reference = checks.run_all(fp32_runner(canonical.fp32_path), feeds)
        reference_canonical = checks.run_all(canonical_runner(canonical.path), feeds)  # the jobs' fidelity reference
        classification = checks.classifies(m.task, reference[0], fp32)
        fp32_acc = checks.task_accuracy(reference[0], label_arr) if label_arr is not None and classification else None
        if feeds:  # what a target that needs fixed shapes (TFLite) fixes dynamic dims to, as the build does
            canonical = replace(canonical, example_shapes={name: (1, *a.shape[1:]) for name, a in feeds[0].items()})
        return _Prepared(canonical, ckey, built, feeds, label_arr, reference, reference_canonical, classification,
                         fp32_acc, fixed)

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
            # the job times INT8 beside FP32, so an fp32-only matrix lowers too (cached all the same)
            artifact, art_info = self.lower(backend, t, prep)
            not_here = self.executor.accepts(t, av)
            if not_here:
                self._not_run(m, t, todo, f"lowered and verified; checks not run: {not_here}", art_info)
                return
            self._measure(m, t, prep, artifact, art_info, todo, time.monotonic() - t0)
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

    def _measure(self, m: ModelSpec, t: Target, prep: _Prepared, artifact: Any, art_info: dict[str, Any],
                 todo: list[tuple[int, str]], lower_s: float) -> None:
        """Run the group's check job on the executor and turn its result into cells."""
        sizes = sorted({b for b, _ in todo})
        if prep.fixed_batch:  # a fixed-batch model runs only full batches
            other = [(b, p) for b, p in todo if b != prep.fixed_batch]
            if other:
                self._not_run(m, t, other, f"the model has a fixed batch size of {prep.fixed_batch}")
            sizes = [b for b in sizes if b == prep.fixed_batch]
            if not sizes:
                return
        target = replace(t, batch_sizes=tuple(sizes), warmup=self.spec.warmup)
        settings = CheckSettings(prep.classification, prep.fp32_accuracy, rounds=self.spec.rounds,
                                 min_round_ms=self.spec.min_round_ms, layers=False, fp32_checks=True)
        job = CheckJob(target, artifact, prep.canonical.path, prep.canonical.fp32_path, tuple(prep.feeds),
                       prep.labels, tuple(prep.reference), tuple(prep.reference_canonical), settings)
        t1 = time.monotonic()
        result = self.executor.run(job)
        job_s = time.monotonic() - t1
        load = load_average()
        device = result.notes.get(DEVICE_NOTE)  # where a remote device's agent ran it
        if len(result.latency) != len(sizes):
            raise DeploykitError(f"the check job returned latency for {len(result.latency)} batch sizes, "
                                 f"not {len(sizes)}")
        int8_values, fp32_values = _values(result.checks), _values(result.fp32_checks)
        n = len(prep.reference[0]) if prep.reference else 0
        seconds = {"lower": round(lower_s, 3), "job": round(job_s, 3),
                   **{k: round(v, 3) for k, v in result.seconds.items()}}
        for b, entry in zip(sizes, result.latency):
            for p in [p for p in ("fp32", "fp16", "int8") if (b, p) in todo]:
                cell = self.blank(m, t, b, p)
                cell.env["load_average"] = load
                if device:
                    cell.env["device"] = device
                cell.seconds = dict(seconds)
                if p == "fp16":
                    cell.status, cell.error = "not_run", f"backend {t.backend} has no fp16 mode on this device"
                elif p == "int8":
                    cell.artifact = dict(art_info)
                    _fill(cell, entry.stats.p50_ms, entry.stats, entry.rounds_ms, entry.calls_per_round, int8_values, n)
                    cell.fp32_p50_ms = entry.fp32_p50_ms
                    cell.cpu_ms = _median(entry.cpu_rounds_ms)
                    if entry.fp32_rounds_ms:
                        cell.speedup, cell.speedup_spread = timing.summarise_ratio(
                            _ratios(entry.fp32_rounds_ms, entry.rounds_ms))
                    elif entry.speedup is not None:
                        cell.speedup, cell.speedup_spread = entry.speedup, None
                    if entry.fp32_cpu_rounds_ms and entry.cpu_rounds_ms:
                        cell.cpu_speedup = timing.summarise_ratio(
                            _ratios(entry.fp32_cpu_rounds_ms, entry.cpu_rounds_ms))[0]
                    cell.guard, cell.note = guard(cell, art_info)
                elif entry.fp32_stats is None:
                    cell.status, cell.error = "not_run", result.notes.get(
                        "fp32_runner", result.notes.get("fp32_baseline_error", f"backend {t.backend} has no FP32 runner"))
                else:
                    cell.artifact = {"key": prep.canonical_key, "path": str(prep.canonical.fp32_path),
                                     "rebuilt": prep.canonical_built}
                    _fill(cell, entry.fp32_stats.p50_ms, entry.fp32_stats, entry.fp32_rounds_ms,
                          entry.fp32_calls_per_round, fp32_values, n)
                    cell.fp32_p50_ms = entry.fp32_stats.p50_ms
                    cell.cpu_ms = _median(entry.fp32_cpu_rounds_ms)
                    cell.speedup, cell.speedup_spread = 1.0, 0.0
                cell.fp32_accuracy = prep.fp32_accuracy
                self.record(cell)


def _values(results: list[CheckResult]) -> dict[str, float]:
    return {c.name: float(c.value) for c in results if c.value is not None}


def _ratios(fp32: tuple[float, ...], int8: tuple[float, ...]) -> list[float]:
    """The per-round speed-ups: FP32's round figure over INT8's, round by round."""
    return [f / q if q > 0 else 0.0 for f, q in zip(fp32, int8)]


def _median(values: tuple[float, ...]) -> float | None:
    return float(np.median(values)) if values else None


def _fill(cell: Cell, p50: float, stats: Any, rounds_ms: tuple[float, ...], calls: int, values: Mapping[str, float],
          n: int) -> None:
    """Latency and accuracy of one precision into its cell."""
    cell.p50_ms, cell.p90_ms, cell.p99_ms, cell.throughput = p50, stats.p90_ms, stats.p99_ms, stats.throughput
    cell.round_ms, cell.calls_per_round = list(rounds_ms), calls
    cell.spread = (max(rounds_ms) - min(rounds_ms)) / p50 if rounds_ms and p50 > 0 else None
    cell.top1_agreement, cell.cosine = values.get("top1_agreement"), values.get("cosine")
    cell.accuracy, cell.memory_mb = values.get("accuracy"), values.get("memory_mb")
    if cell.memory_mb is not None:
        cell.memory_mb = round(cell.memory_mb, 1)
    cell.eval_samples = n


def guard(cell: Cell, art_info: Mapping[str, Any]) -> tuple[str, str]:
    """The performance guard: (why this INT8 cell is not faster than the same runtime's FP32,
    or ''; a note when the guard held back).

    It holds back in one case: the wall-clock speed-up is at most 1.0, but the machine was
    oversubscribed (load average above its cores) and INT8 took clearly less CPU time per call
    in the same rounds (CPU_CLEARS). Then the wall clock measured the load, not the kernels: a
    call that outlasts a time slice waits for other processes, one that fits in it does not."""
    if cell.speedup is None or cell.speedup > 1.0:
        return "", ""
    load, cores = (cell.env.get("load_average") or [0.0])[0], cell.env.get("cores") or 1
    if cell.cpu_speedup is not None and cell.cpu_speedup > CPU_CLEARS and load > cores:
        return "", (f"INT8 took {cell.cpu_speedup:.2f}x less CPU per call than FP32 in the same rounds; the "
                    f"wall-clock {cell.speedup:.2f}x is the load's ({load:g} on {cores} cores), not the kernels'")
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
    cpu = f"; CPU time per call {cell.cpu_speedup:.2f}x" if cell.cpu_speedup is not None else ""
    return f"INT8 not faster than {cell.backend} FP32 ({cell.speedup:.2f}x{cpu}): likely " + "; ".join(causes), ""


@dataclass
class _Prepared:
    canonical: Any
    canonical_key: str
    canonical_built: bool
    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    reference: list[np.ndarray]
    reference_canonical: list[np.ndarray]
    classification: bool
    fp32_accuracy: float | None
    fixed_batch: int | None
