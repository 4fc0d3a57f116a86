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
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

import deploykit
from deploykit import checks, data, model as modelmod
from deploykit.analyze import AccuracyTarget, parse_accuracy_target
from deploykit.backend import Artifact, Availability, CanonicalModel, CheckResult
from deploykit.errors import ConfigError, DeploykitError, OutputDirError
from deploykit.fileio import atomic_output, sha256
from deploykit.plugins import Registry, load_registry
from deploykit.progress import bar
from deploykit.quantize import quantize, requantize, write_canonical
from deploykit.quantize.canonical import ASYMMETRIC, SYMMETRIC
from deploykit.quantize.islands import layer_macs, mac_summary, resolve_keep_float
from deploykit.targets import Calibration, Preprocess, Target, load_targets

log = logging.getLogger("deploykit")
MANIFEST = "manifest.json"
REPORT = "report.md"
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
    example_inputs: tuple | None = None  # with a torch.nn.Module: inputs for the dynamo export
    input_names: list[str] | None = None  # with a torch.nn.Module: ONNX input names
    task: str = "auto"  # classification (top-k, accuracy), other (cosine/L2 only), auto: from the output shape
    activations: str | None = None  # activation profile; None: targets.toml [quantization], else from the targets
    keep_float: list[str] | None = None  # float-island patterns; None: targets.toml [quantization] keep_float
    compare_profiles: bool = True  # also place the other profile from the same statistics and report the difference
    recipe: str | None = None  # accuracy-recovering recipe; None: targets.toml [calibration] recipe (default auto)
    accuracy_target: str | None = None  # e.g. top1_agreement=0.95: fewest float layers meeting it (deploykit.analyze)
    on_event: Callable[[str], None] = field(default=lambda msg: None)


@dataclass
class TargetResult:
    target: Target
    status: str = "ok"  # ok | failed (a check failed) | skipped (backend unavailable) | error
    reason: str = ""
    availability: Availability | None = None
    artifact: Artifact | None = None
    checks: list[CheckResult] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    device_info: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self, out_dir: Path) -> dict[str, Any]:
        art = None
        if self.artifact is not None:
            art = {"path": _rel(self.artifact.path, out_dir), "sha256": sha256(self.artifact.path),
                   "files": {_rel(f, out_dir): sha256(f) for f in self.artifact.files if f.exists()},
                   "metadata": _jsonable(self.artifact.metadata)}
        t = self.target
        return {
            "name": t.name, "backend": t.backend, "device": {"name": t.device.name, "kind": t.device.kind,
                                                             "address": t.device.address},
            "options": _jsonable(t.options), "thresholds": dict(t.thresholds), "batch_sizes": list(t.batch_sizes),
            "status": self.status, "reason": self.reason,
            "availability": None if self.availability is None else {
                "can_lower": self.availability.can_lower, "can_run": self.availability.can_run,
                "reason": self.availability.reason, "install_hint": self.availability.install_hint,
                "versions": dict(self.availability.versions)},
            "artifact": art, "checks": [c.to_json() for c in self.checks], "latency": self.latency,
            "preflight": _jsonable(self.metadata), "device_info": _jsonable(self.device_info),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    targets: list[TargetResult]
    canonical: CanonicalModel

    @property
    def ok(self) -> bool:
        return self.accuracy_target_met and all(t.status in ("ok", "skipped") for t in self.targets)

    @property
    def accuracy_target_met(self) -> bool:
        search = self.manifest.get("quantization", {}).get("accuracy_target")
        return search is None or bool(search.get("met"))


def build(model: Any, options: BuildOptions, registry: Registry | None = None) -> BuildResult:
    """Build every target of ``options`` from an .onnx path, or a torch.nn.Module plus
    ``options.example_inputs`` (exported with the dynamo exporter at opset 18, dynamic batch)."""
    registry = registry or load_registry()
    out_dir = Path(options.out_dir)
    tf = load_targets(options.targets_file)
    targets = tf.resolve(options.targets, registry)  # fail fast on an unknown target, before any work
    if options.task not in checks.TASKS:
        raise ConfigError(f"task '{options.task}' is not one of {', '.join(checks.TASKS)}")
    calib_cfg = _calibration(tf.calibration, options)
    profile, profile_reason = choose_profile(targets, registry, options.activations, tf.quantization.activations,
                                             tf.where("quantization", "activations"))
    keep_float, keep_where = ((options.keep_float, "--keep-float") if options.keep_float is not None
                              else (list(tf.quantization.keep_float), tf.where("quantization", "keep_float")))
    preprocess = options.preprocess or tf.preprocess
    owned = claim_out_dir(out_dir)  # files earlier builds wrote here: ours to overwrite, and to keep listing
    events = options.on_event

    if not isinstance(model, (str, os.PathLike)):
        if options.example_inputs is None:
            raise DeploykitError("building from a torch module needs BuildOptions.example_inputs (a tuple of tensors)")
        model = modelmod.export_torch(model, options.example_inputs, out_dir / "source.onnx", options.input_names)
    model = Path(model)
    started = time.monotonic()
    raw = modelmod.load_onnx(model)
    fp32 = modelmod.normalise(raw, str(model))
    specs = modelmod.input_specs(fp32)
    source_hash = sha256(model)

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

    float_layers = resolve_keep_float(fp32, keep_float, keep_where) if keep_float else []
    recipe = _recipe(options.recipe, calib_cfg.recipe, tf.where("calibration", "recipe"), fp32)
    target_spec = parse_accuracy_target(options.accuracy_target) if options.accuracy_target else None
    events(f"calibrating ({calib_cfg.method}, {profile} activations: {profile_reason}; recipe {recipe}) "
           f"on {calib_src.description}")
    t0 = time.monotonic()
    result = quantize(fp32, calib_src, calib_cfg.method, calib_cfg.percentile, calib_cfg.batch_size, source_hash,
                      activations=profile, recipe=recipe)
    if float_layers:
        result = requantize(result, fp32, float_layers=float_layers)
    search = None
    if target_spec is not None:
        result, search = _meet_accuracy_target(fp32, result, eval_src, target_spec, options.task, float_layers, events)
        targets = [_judged_on(t, target_spec) for t in targets]  # and checked on every target
    canonical = write_canonical(result, fp32, out_dir)
    # a build that stops after this point must still be able to reuse its own folder
    owned |= {_rel(p, out_dir) for p in out_dir.iterdir() if p.is_file()}
    _write_json(out_dir / MANIFEST, {"deploykit": deploykit.__version__, "status": "incomplete", "files": sorted(owned)})
    calibrate_s = time.monotonic() - t0
    events(f"canonical model: {canonical.path} ({result.samples} samples, {calib_cfg.method})")

    fixed_batch = modelmod.fixed_batch(specs)
    if fixed_batch:
        targets = [_at_batch(t, fixed_batch, events) for t in targets]
    eval_batch = fixed_batch or (max(t.batch_sizes[0] for t in targets) if targets else 1)
    eval_batches, labels = _eval_batches(eval_src, eval_batch)
    reference = _reference_outputs(canonical, eval_batches)
    classification = checks.classifies(options.task, reference["fp32"][0])
    fp32_acc = checks.task_accuracy(reference["fp32"][0], labels) if labels is not None and classification else None
    baseline = _baseline_latency(canonical, targets, eval_batches) if options.baseline and targets else []
    quant = quantization_summary(fp32, result, profile_reason)
    if search is not None:
        quant["accuracy_target"] = search
    if options.compare_profiles:
        quant["profile_comparison"] = compare_profiles(fp32, result, eval_batches, reference, classification)

    results = []
    for target in targets:
        events(f"target {target.name} ({target.backend})")
        results.append(_build_target(target, registry, canonical, out_dir, eval_batches, labels, reference, fp32_acc,
                                     {l["batch_size"]: l["p50_ms"] for l in baseline}, classification))

    manifest = _manifest(model, source_hash, canonical, result, calib_src, eval_src, eval_note, classification, fp32_acc,
                         baseline, results, out_dir, calibrate_s, time.monotonic() - started, registry)
    manifest["quantization"] = _jsonable(quant)
    # artifacts of earlier builds into this folder stay deploykit's (listed, never foreign)
    manifest["files"] = sorted(set(manifest["files"]) | {f for f in owned if (out_dir / f).is_file()})
    _write_json(out_dir / MANIFEST, manifest)
    from deploykit.report import markdown_report

    with atomic_output(out_dir / REPORT) as tmp:
        tmp.write_text(markdown_report(manifest), encoding="utf-8")
    return BuildResult(out_dir, manifest, results, canonical)


def quantization_summary(fp32: Any, result: Any, reason: str) -> dict[str, Any]:
    """For the manifest: the activation profile and why, the float layers, their MACs and the
    int8 share of MACs."""
    graph = result.calibrated if getattr(result, "calibrated", None) is not None else fp32
    return {"activations": result.activations, "activations_reason": reason,
            "recipe": getattr(result, "recipe", "none"), "recipe_summary": dict(getattr(result, "recipe_summary", {})),
            **mac_summary(layer_macs(graph), result.float_layers)}


def _recipe(option: str | None, configured: str, where: str, fp32: Any) -> str:
    """The recipe to run (``auto`` resolved for this network), validated: a bad one names its source."""
    from deploykit.quantize import recipes

    spec, source = (option, "--recipe") if option is not None else (configured, where)
    try:
        return recipes.format_recipe(recipes.parse_recipe(recipes.resolve_auto(spec, fp32)))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _meet_accuracy_target(fp32: Any, result: Any, eval_src: Any, target: Any, task: str, declared: list[str],
                          events: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Fewest float layers (beyond the declared ones) meeting ``target`` on the evaluation data,
    from the same calibration; their latency cost measured on the canonical models in onnxruntime."""
    from deploykit import analyze

    data = analyze.prepare_eval(fp32, eval_src, task=task)
    q = analyze.Quantized(fp32, result)
    found = analyze.search_float_layers(q, data, target)
    floats = list(dict.fromkeys(list(declared) + found.float_layers))
    chosen = requantize(result, fp32, float_layers=floats) if found.float_layers else result
    events(f"accuracy target {target}: {'met' if found.met else 'NOT met'} with {len(found.float_layers)} float "
           f"layer(s), {found.metrics.get(target.metric, float('nan')):.4f} (int8 share of MACs "
           f"{found.int8_mac_share:.1%})")
    summary = found.to_json()
    summary["latency_cost"] = _latency_cost(result, chosen, eval_src) if found.float_layers else None
    return chosen, summary


def _latency_cost(all_int8: Any, chosen: Any, source: Any, rounds: int = 15) -> dict[str, Any]:
    """Batch-1 latency of the all-int8 and the chosen canonical model in onnxruntime (default
    optimizations, interleaved rounds, medians): what the float layers cost."""
    import onnxruntime as ort

    feeds = {k: v[:1] for k, v in next(iter(source.batches(1))).feeds.items()}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {name: ort.InferenceSession(m.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for name, m in (("all_int8", all_int8), ("chosen", chosen))}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - t) * 1000)
    med = {k: float(np.median(v[2:])) for k, v in times.items()}
    return {"runtime": "onnxruntime (canonical models, CPU, batch 1)", "all_int8_ms": med["all_int8"],
            "chosen_ms": med["chosen"], "ratio": med["chosen"] / med["all_int8"] if med["all_int8"] else None}


def compare_profiles(fp32: Any, result: Any, batches: list[dict], reference: dict,
                     classification: bool) -> dict[str, Any]:
    """Place the other activation profile from the same statistics (no calibration) and measure
    both canonical models against FP32 in onnxruntime: what the choice cost or saved."""
    other_profile = SYMMETRIC if result.activations == ASYMMETRIC else ASYMMETRIC
    try:
        other = requantize(result, fp32, activations=other_profile)
    except DeploykitError as exc:
        return {"status": "not_run", "message": str(exc)}
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(other.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with bar(len(batches), f"canonical model, {other_profile} activations", "batch") as b:
        outs = []
        for feeds in batches:
            outs.append(session.run(None, feeds))
            b.update()
    got = [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
    chosen = checks.compare(reference["fp32"], reference["canonical"], classification=classification)
    alt = checks.compare(reference["fp32"], got, classification=classification)
    metric = "top1_agreement" if classification and "top1_agreement" in chosen else "cosine"
    delta = chosen[metric] - alt[metric]
    verdict = "saved" if delta > 0 else "cost" if delta < 0 else "changed nothing in"
    amount = f"{abs(delta) * 100:.2f} points of" if metric == "top1_agreement" else f"{abs(delta):.5f} of"
    return {"status": "measured", "metric": metric, "chosen": result.activations, "other": other_profile,
            "chosen_metrics": chosen, "other_metrics": alt, "difference": delta,
            "message": f"{result.activations} activations {verdict} {amount} {metric} against {other_profile} "
                       f"({chosen[metric]:.4f} vs {alt[metric]:.4f}, canonical models in onnxruntime vs FP32)"}


def choose_profile(targets: list[Target], registry: Registry, option: str | None, configured: str | None,
                   where: str) -> tuple[str, str]:
    """The activation profile of this build and why: the command line, else targets.toml, else
    symmetric when any target's backend lowers only that (TensorRT), asymmetric otherwise.

    An explicit asymmetric choice with a target that cannot lower it is a ConfigError naming
    the target, before any calibration."""
    supported = {t.name: registry.get(t.backend).activation_profiles for t in targets}
    chosen = option or configured
    if chosen is not None:
        source = "--activations" if option else where
        if chosen not in (SYMMETRIC, ASYMMETRIC):
            raise ConfigError(f"{source}: '{chosen}' is not symmetric or asymmetric")
        refused = [n for n, profiles in supported.items() if chosen not in profiles]
        if refused:
            t = next(t for t in targets if t.name == refused[0])
            raise ConfigError(f"{source} {chosen}: target '{t.name}' ({t.backend}) lowers only "
                              f"{', '.join(supported[t.name])} activations; use --activations symmetric "
                              f"or drop that target")
        return chosen, f"chosen by {source}"
    needs = [n for n, profiles in supported.items() if ASYMMETRIC not in profiles]
    if needs:
        return SYMMETRIC, f"target {needs[0]} needs it"
    return ASYMMETRIC, "every target lowers zero points" if targets else "no target needs symmetric"


def _write_json(path: Path, obj: dict) -> None:
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


def _judged_on(target: Target, goal: AccuracyTarget) -> Target:
    """The accuracy target as this target's threshold for that metric (the command line wins
    over targets.toml and the defaults: the build was asked for exactly this)."""
    key = f"{'max' if goal.metric == 'accuracy_drop' else 'min'}_{goal.metric}"
    return dataclasses.replace(target, thresholds={**target.thresholds, key: goal.value})


def _at_batch(target: Target, batch: int, events: Callable[[str], None]) -> Target:
    if target.batch_sizes == (batch,):
        return target
    events(f"{target.name}: the model has a fixed batch of {batch}; latency only at that batch "
           f"(export with a dynamic batch for batch_sizes {list(target.batch_sizes)})")
    return dataclasses.replace(target, batch_sizes=(batch,))


def _eval_batches(src: data.DataSource, batch_size: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    feeds, labels = [], []
    for b in src.batches(batch_size):
        feeds.append(b.feeds)
        labels.append(b.labels)
    has_labels = all(l is not None for l in labels)
    return feeds, (np.concatenate(labels) if has_labels and labels else None)


def _ort_runner(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    class _Runner:
        def run(self, feeds):
            return session.run(None, dict(feeds))

    return _Runner()


def _reference_outputs(canonical: CanonicalModel, batches: list[dict]) -> dict[str, list[np.ndarray]]:
    """FP32 (accuracy reference) and canonical QDQ (fidelity reference) outputs, in onnxruntime."""
    with bar(2, "reference outputs", "model") as b:
        fp32 = checks.run_all(_ort_runner(canonical.fp32_path), batches)
        b.update()
        qdq = checks.run_all(_ort_runner(canonical.path), batches)
        b.update()
    return {"fp32": fp32, "canonical": qdq}


def _latency_feeds(batches: list[dict], batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` evaluation samples (repeated if there are fewer)."""
    taken, n = [], 0
    for b in batches:  # only as many batches as needed, not the whole evaluation set
        taken.append(b)
        n += len(next(iter(b.values())))
        if n >= batch_size:
            break
    reps = -(-batch_size // n)
    return {k: np.concatenate([b[k] for b in taken] * reps)[:batch_size] for k in taken[0]}


def _baseline_latency(canonical: CanonicalModel, targets: list[Target], batches: list[dict]) -> list[dict]:
    runner = _ort_runner(canonical.fp32_path)
    sizes = sorted({b for t in targets for b in t.batch_sizes})
    warmup, runs = max(t.warmup for t in targets), max(t.runs for t in targets)
    out = []
    for b in bar_iter(sizes, "FP32 baseline latency"):
        out.append(checks.measure_latency(runner, _latency_feeds(batches, b), warmup, runs).to_json())
    return out


def bar_iter(items: list, desc: str):
    with bar(len(items), desc) as b:
        for item in items:
            yield item
            b.update()


def _build_target(target: Target, registry: Registry, canonical: CanonicalModel, out_dir: Path,
                  batches: list[dict], labels: np.ndarray | None, reference: dict, fp32_acc: float | None,
                  ort_fp32_ms: dict[int, float], classification: bool) -> TargetResult:
    res = TargetResult(target)
    try:
        backend = registry.get(target.backend)
        res.availability = backend.probe(target)
        pre_checks, res.metadata = backend.preflight(canonical, target)
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in pre_checks)
        if not res.availability.can_lower:
            res.status, res.reason = "skipped", _missing(res.availability)
            return res
        dest = out_dir / target.name / f"{target.name}{backend.artifact_suffix}"
        t0 = time.monotonic()
        with bar(1, f"{target.name}: lower", "model") as b:
            res.artifact = backend.lower(canonical, target, dest)
            b.update()
        res.seconds["lower"] = time.monotonic() - t0
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in res.artifact.checks)
        not_here = res.availability.reason if not res.availability.can_run else (
            f"device '{target.device.name}' is remote ({target.device.address}) and this version has no remote "
            f"agent; copy {dest.name} to the device to check it there" if target.device.address else "")
        if not_here:
            res.reason = f"checks not run: {not_here}"
            for name in ("top1_agreement", "cosine", "fidelity_rel_l2", "latency_p50_ms"):
                res.checks.append(CheckResult(name, "not_run", message=not_here))
        else:
            _run_checks(res, backend, canonical, batches, labels, reference, fp32_acc, ort_fp32_ms, classification)
        try:
            res.device_info = backend.device_info(target)
        except Exception as exc:  # device facts are nice to have, never fatal
            res.device_info = {"error": f"{type(exc).__name__}: {exc}"}
    except DeploykitError as exc:
        res.status, res.reason = "error", str(exc)
        return res
    except Exception as exc:  # a plugin bug must not lose the other targets
        log.debug("target %s failed", target.name, exc_info=True)
        res.status, res.reason = "error", f"{type(exc).__name__}: {exc}"
        return res
    if any(c.status == "fail" for c in res.checks):
        res.status = "failed"
        failed = [c.name for c in res.checks if c.status == "fail"]
        res.reason = "failed checks: " + ", ".join(failed)
    return res


def _missing(av: Availability) -> str:
    return av.reason + (f" (install: {av.install_hint})" if av.install_hint else "")


def _run_checks(res: TargetResult, backend, canonical: CanonicalModel, batches: list[dict],
                labels: np.ndarray | None, reference: dict, fp32_acc: float | None,
                ort_fp32_ms: dict[int, float], classification: bool) -> None:
    target = res.target
    th = target.thresholds
    rss0 = _rss_mb()
    t0 = time.monotonic()
    runner = backend.load(res.artifact, target)
    res.seconds["load"] = time.monotonic() - t0
    with bar(len(batches), f"{target.name}: accuracy", "batch") as b:
        outputs = []
        for feeds in batches:
            outputs.append(runner.run(feeds))
            b.update()
    got = [np.concatenate([o[i] for o in outputs]) for i in range(len(outputs[0]))]
    measured = checks.compare(reference["fp32"], got, classification=classification)
    for name, value in measured.items():
        res.checks.append(checks.judge(name, value, th, "vs FP32 in onnxruntime"))
    for key in th:  # a threshold on a metric this task has no value for is said, not dropped
        metric = key.partition("_")[2]
        if metric in ("top1_agreement", "top5_agreement", "accuracy", "accuracy_drop") and not classification:
            res.checks.append(checks.judge(metric, None, th, "not a classification task (--task)"))
        elif metric in ("accuracy", "accuracy_drop") and labels is None:
            res.checks.append(checks.judge(metric, None, th, "no labels in the evaluation data"))
    for name, value in checks.compare(reference["canonical"], got, prefix="fidelity_").items():
        res.checks.append(checks.judge(name, value, th, "vs the canonical QDQ model in onnxruntime"))
    if labels is not None and classification:
        acc = checks.task_accuracy(got[0], labels)
        res.checks.append(checks.judge("accuracy", acc, th, f"on {len(labels)} labelled samples"))
        res.checks.append(checks.judge("accuracy_drop", (fp32_acc or 0.0) - acc, th,
                                       f"FP32 accuracy {fp32_acc:.4f} minus target accuracy"))
    memory_mb = max(0.0, _rss_mb() - rss0)  # before a baseline runner adds its own
    with tempfile.TemporaryDirectory(prefix="deploykit-fp32-") as scratch:
        _measure_latency(res, runner, _fp32_runner(res, backend, canonical, Path(scratch)), batches, ort_fp32_ms)
    res.checks.append(checks.judge("memory_mb", memory_mb, th,
                                   "resident memory added by loading and running the artifact"))


def _measure_latency(res: TargetResult, runner, fp32, batches: list[dict], ort_fp32_ms: dict[int, float]) -> None:
    target, th = res.target, res.target.thresholds
    for i, b in enumerate(bar_iter(list(target.batch_sizes), f"{target.name}: latency")):
        feeds = _latency_feeds(batches, b)
        stats = checks.measure_latency(runner, feeds, target.warmup, target.runs)
        entry = stats.to_json()
        extra = getattr(runner, "last_gpu_ms", None)
        if extra is not None:
            entry["gpu_compute_ms"] = extra
        if fp32 is not None:  # same runtime, same device, measured right after: the fair ratio
            base = checks.measure_latency(fp32, feeds, target.warmup, target.runs)
            entry.update(fp32_p50_ms=base.p50_ms, speedup=base.p50_ms / stats.p50_ms, speedup_vs=f"{target.backend} fp32")
        elif b in ort_fp32_ms:
            entry.update(fp32_p50_ms=ort_fp32_ms[b], speedup=ort_fp32_ms[b] / stats.p50_ms, speedup_vs="onnxruntime fp32")
        res.latency.append(entry)
        if i == 0:  # thresholds apply to the first batch size
            note = f"batch {b}, {target.runs} runs after {target.warmup} warm-up"
            res.checks.append(checks.judge("latency_p50_ms", stats.p50_ms, th, note))
            res.checks.append(checks.judge("latency_p99_ms", stats.p99_ms, th, note))
            res.checks.append(checks.judge("throughput", stats.throughput, th, f"samples/s at batch {b}"))
            if "speedup" in entry:
                res.checks.append(checks.judge("speedup", entry["speedup"], th,
                                               f"INT8 vs {entry['speedup_vs']} p50 at batch {b}"))


def _fp32_runner(res: TargetResult, backend, canonical: CanonicalModel, scratch: Path):
    """The backend's own FP32 runner, or None (then the onnxruntime FP32 row is the baseline)."""
    try:
        return backend.fp32_runner(canonical, res.target, scratch)
    except Exception as exc:  # a baseline is worth having, never worth failing the target for
        res.metadata["fp32_baseline_error"] = f"{type(exc).__name__}: {exc}"
        return None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions(registry: Registry) -> dict[str, str]:
    out = {"deploykit": deploykit.__version__, "python": platform.python_version()}
    for dist in ("numpy", "onnx", "onnxruntime", "pluggy", "openvino", "tensorflow", "ai-edge-litert",
                 "coremltools", "tensorrt", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _manifest(model: Path, source_hash: str, canonical: CanonicalModel, q, calib_src, eval_src, eval_note,
              classification: bool, fp32_acc, baseline, results: list[TargetResult], out_dir: Path, calibrate_s: float, total_s: float,
              registry: Registry) -> dict[str, Any]:
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
            listed.add(_rel(p, out_dir))
    return {
        "deploykit": deploykit.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node()},
        "versions": _versions(registry),
        "model": {"path": str(model), "sha256": source_hash},
        "calibration": {"method": q.method, "samples": q.samples, "data": calib_src.description,
                        "data_sha256": q.data_hash, "random_data": q.random_data,
                        "warning": RANDOM_WARNING if q.random_data else "", "seconds": round(calibrate_s, 3)},
        "evaluation": {"data": eval_src.description, "note": eval_note, "classification": classification,
                       "fp32_accuracy": fp32_acc},
        "canonical": {"path": _rel(canonical.path, out_dir), "sha256": sha256(canonical.path),
                      "fp32_path": _rel(canonical.fp32_path, out_dir),
                      "calibration_table": _rel(files[2], out_dir), "calibration_table_sha256": sha256(files[2]),
                      "qdq_nodes": len(qdq_nodes), "tensors_in_table": len(canonical.calibration),
                      "lint_violations": list(q.lint_violations)},
        "baseline": {"backend": "onnxruntime", "precision": "fp32", "latency": baseline},
        "targets": [r.to_json(out_dir) for r in results],
        "files": sorted(listed | {MANIFEST, REPORT}),
        "seconds": round(total_s, 3),
    }


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
