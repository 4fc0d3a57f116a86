"""``deploykit build``: FP32 model -> canonical QDQ model -> one artifact per target -> checks.

One failing target never loses the others: each target runs in its own try block and the
manifest and report are written for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import platform
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

import numpy as np

from deploykit import checks, data, model as modelmod, ortsession, signals
from deploykit._version import __version__
from deploykit.analyze import AccuracyTarget, parse_accuracy_target
from deploykit.canonical import ASYMMETRIC, SYMMETRIC, CanonicalModel
from deploykit.errors import BuildFault, ConfigError, DataError, DeploykitError, OutputDirError
from deploykit.fileio import sha256
from deploykit.jobs import CheckJob, CheckSettings, Executor, LocalExecutor, latency_feeds
from deploykit.outdir import OutDir
from deploykit.plugins import Registry, load_registry
from deploykit.progress import Step, bar, step as progress_step
from deploykit.quantize import adopt, load_canonical, quantize, requantize, write_canonical
from deploykit.quantize.islands import layer_macs, mac_summary, resolve_keep_float
from deploykit.quantize.observe import METHODS
from deploykit.reference import canonical_runner, fp32_runner
from deploykit.remote import DEVICE_NOTE, DeviceRouter, on_devices
from deploykit.results import SCHEMA_VERSION, Artifact, Availability, CheckResult, TargetResult, jsonable
from deploykit.targets import Calibration, Preprocess, Target, TargetsFile, load_targets

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("deploykit")
T = TypeVar("T")
#: Target statuses that do not fail a build: checked and passed, lowered and verified where the
#: checks cannot run here (Core ML off macOS), or skipped
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
    allow_code: bool = False  # let targets.toml name Python code as data (module:function)
    activations: str | None = None  # activation profile; None: targets.toml [quantization], else from the targets
    keep_float: list[str] | None = None  # float-island patterns; None: targets.toml [quantization] keep_float
    compare_profiles: bool = True  # also place the other profile from the same statistics and report the difference
    recipe: str | None = None  # accuracy-recovering recipe; None: targets.toml [calibration] recipe (default auto)
    accuracy_target: str | None = None  # e.g. top1_agreement=0.95: fewest float layers meeting it (deploykit.analyze)
    #: an already-quantized model: calibrate its float reference again instead of adopting its scales
    requantize: bool = False
    on_event: Callable[[str], None] = field(default=lambda msg: None)


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    targets: list[TargetResult]
    canonical: CanonicalModel

    @property
    def ok(self) -> bool:
        return self.accuracy_target_met and all(t.status in SUCCESS for t in self.targets)

    @property
    def accuracy_target_met(self) -> bool:
        search = self.manifest.get("quantization", {}).get("accuracy_target")
        return search is None or bool(search.get("met"))


def build(model: Any, options: BuildOptions, registry: Registry | None = None,
          executor: Executor | None = None) -> BuildResult:
    """Build every target of ``options`` from an .onnx path, or a torch.nn.Module plus
    ``options.example_inputs`` (exported with the dynamo exporter at opset 18, dynamic batch).
    Each target's checks run as a :class:`deploykit.jobs.CheckJob` on ``executor`` (default:
    :class:`deploykit.jobs.LocalExecutor`, this process); a target whose device has an
    ``address`` runs on that device's agent (:mod:`deploykit.remote`) unless ``executor``
    places jobs on devices itself (:class:`deploykit.jobs.DevicePlacing`, e.g. Ray).

    Everything that can be checked is checked before calibration starts. The output folder
    is locked, each step journaled and staged (see :mod:`deploykit.outdir`): a rerun after an
    interruption keeps the finished steps, and the new outputs replace the old only at the end.
    """
    registry = registry or load_registry()
    executor = on_devices(executor or LocalExecutor(registry))  # a remote device's targets go to its agent
    events = options.on_event
    with stage("reading the configuration"):
        tf = load_targets(options.targets_file)
        targets = registry.resolve(tf, options.targets)  # fail fast on an unknown target, before any work
        _validate_options(options)
        calib_cfg = _calibration(tf.calibration, options)
        _refuse_code_from_config(calib_cfg, options, tf)
        preprocess = options.preprocess or tf.preprocess
        profile = choose_profile(targets, registry, options.activations, tf.quantization.activations,
                                 tf.where("quantization", "activations"))
    with OutDir(options.out_dir) as out:
        return _build_in(model, options, registry, executor, tf, targets, calib_cfg, preprocess, out, events, profile)


def _build_in(model: Any, options: BuildOptions, registry: Registry, executor: Executor, tf: TargetsFile,
              targets: list[Target], calib_cfg: Calibration, preprocess: Preprocess | None, out: OutDir,
              events: Callable[[str], None], profile: tuple[str, str]) -> BuildResult:
    activations, activations_reason = profile
    out_dir = out.root
    started = time.monotonic()
    stages: dict[str, float] = {}  # wall seconds per stage, for the manifest and "Where the time went"
    layout = {"calibration": ""}
    if not isinstance(model, (str, os.PathLike)):
        if options.example_inputs is None:
            raise DeploykitError("building from a torch module needs BuildOptions.example_inputs (a tuple of tensors)")
        with stage("exporting the torch module"), out.step("source", uuid.uuid4().hex) as step:
            modelmod.export_torch(model, options.example_inputs, step.dir / "source.onnx", options.input_names)
        model = out.step_dir("source") / "source.onnx"
        layout["source"] = ""
    model = Path(model)
    with stage("loading the model"):
        raw = modelmod.load_onnx(model)
        quantized = adopt.is_quantized(raw)
        if quantized:
            _check_adoption_options(options, str(model))
        adopting = quantized and not options.requantize
        if adopting:  # the float reference as the quantized model computes it (no folding, same node names)
            fp32 = adopt.dequantize(raw, str(model))
        else:
            fp32 = modelmod.normalise(adopt.dequantize(raw, str(model)) if quantized else raw, str(model))
        specs = modelmod.input_specs(fp32)
        source_hash = sha256(model)
        fixed_batch = modelmod.fixed_batch(specs)
        keep_float, keep_where = ((options.keep_float, "--keep-float") if options.keep_float is not None
                                  else (list(tf.quantization.keep_float), tf.where("quantization", "keep_float")))
        float_layers = resolve_keep_float(fp32, keep_float, keep_where) if keep_float and not adopting else []
        recipe = "none" if adopting else resolve_recipe(options.recipe, calib_cfg.recipe,
                                                        tf.where("calibration", "recipe"), fp32)
        target_spec = parse_accuracy_target(options.accuracy_target) if options.accuracy_target else None
        if target_spec is not None:  # the accuracy target is checked on every target
            targets = [_judged_on(t, target_spec) for t in targets]
    log.debug("normalised %s: opset 18, constants and BatchNorm folded, %d nodes; inputs %s", model,
              len(fp32.graph.node), ", ".join(f"{k} {d} {list(s)}" for k, (s, d) in specs.items()))

    signals.checkpoint()  # between stages: a safe point to stop
    with stage("opening the data"):
        calib_src = data.open_source(calib_cfg.data, specs, preprocess, calib_cfg.samples)
        if calib_src is None and adopting:  # the model's scales are kept: no calibration to warn about
            calib_src = data.RandomSource(specs, min(calib_cfg.samples, 64), calib_cfg.seed)
        elif calib_src is None:
            warnings.warn(RANDOM_WARNING, stacklevel=3)
            events("WARNING: " + RANDOM_WARNING)
            calib_src = data.RandomSource(specs, min(calib_cfg.samples, 64), calib_cfg.seed)
        eval_spec = options.eval if options.eval is not None else calib_cfg.eval
        eval_src = data.open_source(eval_spec, specs, preprocess, options.eval_samples) if eval_spec is not None else None
        eval_note = "" if eval_src is not None else (
            "evaluated on the calibration data (no --eval given)" if not calib_src.is_random else "evaluated on random data")
        if eval_src is None:
            eval_src = calib_src
        if fixed_batch:  # a fixed-batch model runs only full batches
            calib_src.exact_batches = eval_src.exact_batches = True
            targets = [_at_batch(t, fixed_batch, events) for t in targets]

    signals.checkpoint()  # between stages: a safe point to stop
    with stage("checking the data against the model"):
        eval_batch = fixed_batch or (max(t.batch_sizes[0] for t in targets) if targets else 1)
        session = ortsession.session(fp32, exact=False)
        _try_first_batch(session, calib_src, calib_cfg.batch_size if not fixed_batch else fixed_batch)
        eval_batches, labels = data.collect_batches(eval_src, eval_batch)
        first_output = _try_first_batch(session, eval_src, eval_batch) if eval_src is not calib_src else \
            session.run(None, eval_batches[0])[0]
        classification = _check_task(first_output, options.task, labels, eval_src.description, fp32)
        example = eval_batches[0] if eval_batches else None  # real shapes for the layers' MACs
        del session
    signals.checkpoint()  # between stages: a safe point to stop
    with stage("probing the backends"):
        availability = {t.name: registry.get(t.backend).probe(t) for t in targets}
    stages["load_and_check"] = time.monotonic() - started

    calib_key = _key(__version__, source_hash, calib_cfg.method, calib_cfg.percentile, calib_cfg.samples,
                     calib_cfg.batch_size, calib_cfg.seed, _source_key(calib_cfg.data), options.task, activations,
                     float_layers, recipe, options.accuracy_target)
    if adopting:
        calib_key = _key(calib_key, "adopt")
    calib_info = out.finished("calibration", calib_key)
    other_model = None  # the other activation profile, placed from the same statistics
    t0 = time.monotonic()
    if calib_info is None and adopting:
        with stage("adopting the quantized model"), out.step("calibration", calib_key) as step:
            taken = _adopt(raw, model, source_hash, calib_src, calib_cfg.batch_size, targets, registry, step.dir, events)
            step.payload.update(method=_meta(taken.model, "deploykit.calibration_method"), samples=taken.samples,
                                # its own scales are kept: adoption never calibrates on random data
                                data_hash=taken.data_hash, random_data=False,
                                seconds=time.monotonic() - t0,
                                quantization={"activations": taken.profile,
                                              "activations_reason": "fixed by the quantized model",
                                              "recipe": "none", "recipe_summary": {},
                                              **mac_summary(layer_macs(taken.fp32, example), taken.float_layers),
                                              "adoption": adopt.describe(taken)})
        calib_info = out.finished("calibration", calib_key) or {}
    elif calib_info is None:
        events(f"calibrating ({calib_cfg.method}, {activations} activations: {activations_reason}; recipe {recipe}) "
               f"on {calib_src.description}")
        log.debug("calibrate: %s on up to %s samples of %s, batch %s; every activation and weight gets one scale "
                  "in the canonical model", calib_cfg.method, calib_cfg.samples, calib_src.description,
                  calib_cfg.batch_size)
        with stage("calibrating"), out.step("calibration", calib_key) as step:
            result = quantize(fp32, calib_src, calib_cfg.method, calib_cfg.percentile, calib_cfg.batch_size,
                              source_hash, activations=activations, recipe=recipe)
            if float_layers:  # from the same statistics: no second calibration
                result = requantize(result, fp32, float_layers=float_layers)
            search = None
            if target_spec is not None:
                judges = _artifact_judges(targets, registry, availability, fp32, step.dir / "judges", eval_batch)
                result, search = _meet_accuracy_target(fp32, result, eval_src, target_spec, options.task,
                                                       float_layers, events, judges)
            write_canonical(result, fp32, step.dir)
            if options.compare_profiles:
                other_profile = SYMMETRIC if activations == ASYMMETRIC else ASYMMETRIC
                other_model = requantize(result, fp32, activations=other_profile).model
            step.payload.update(method=result.method, samples=result.samples, data_hash=result.data_hash,
                                random_data=result.random_data, seconds=time.monotonic() - t0,
                                quantization=quantization_summary(fp32, result, activations_reason, example))
            if search is not None:
                step.payload["quantization"]["accuracy_target"] = search
        calib_info = out.finished("calibration", calib_key) or {}
    else:
        events(f"calibration kept from the interrupted build ({calib_info['samples']} samples)")
    if calib_info is not None and other_model is None and options.compare_profiles and not adopting:
        calib_info.setdefault("quantization", {})["profile_comparison"] = {
            "status": "not_run", "message": "calibration kept from an interrupted build: other profile not placed"}
    stages["calibrate"] = time.monotonic() - t0
    canonical = load_canonical(out.step_dir("calibration") / "canonical.qdq.onnx")
    if eval_batches:  # what a target that needs fixed shapes (TFLite) fixes dynamic dims to
        canonical = dataclasses.replace(canonical, example_shapes={
            name: (1, *array.shape[1:]) for name, array in eval_batches[0].items()})
    events(f"canonical model: {out_dir / canonical.path.name} ({calib_info['samples']} samples, "
           f"{calib_info.get('method') if adopting else calib_cfg.method})")
    signals.checkpoint()

    log.debug("reference outputs: FP32 (accuracy reference) and canonical QDQ (fidelity reference) in onnxruntime "
              "on %d evaluation batches of %d", len(eval_batches), eval_batch)
    t0 = time.monotonic()
    with stage("computing the reference outputs"):
        reference = _reference_outputs(canonical, eval_batches)
        fp32_acc = checks.task_accuracy(reference["fp32"][0], labels) if labels is not None and classification else None
        stages["reference_outputs"] = time.monotonic() - t0
        t0 = time.monotonic()
        baseline = _baseline_latency(canonical, targets, eval_batches) if options.baseline and targets else []
        if baseline:
            stages["baseline_latency"] = time.monotonic() - t0
    quantization = dict(calib_info.get("quantization") or {})
    if other_model is not None:
        with stage("measuring the other activation profile"):
            quantization["profile_comparison"] = compare_profiles(other_model, activations, eval_batches, reference,
                                                                  classification)
    settings = CheckSettings(classification, fp32_acc, {entry["batch_size"]: entry["p50_ms"] for entry in baseline})

    def job_for(target: Target, artifact: Artifact) -> CheckJob:
        return CheckJob(target, artifact, canonical.path, canonical.fp32_path, tuple(eval_batches), labels,
                        tuple(reference["fp32"]), tuple(reference["canonical"]), settings)

    results = []
    t0 = time.monotonic()
    for target in targets:
        name = f"target-{target.name}"
        layout[name] = target.name
        key = _key(calib_key, jsonable(dataclasses.asdict(target)), _source_key(eval_spec), options.eval_samples,
                   options.baseline)
        kept = out.finished(name, key)
        if kept is not None:
            events(f"target {target.name}: kept from the interrupted build ({kept['status']})")
            results.append(TargetResult(target, kept["status"], kept["reason"], stored=kept))
            continue
        events(f"target {target.name} ({target.backend})")
        log.debug("%s: %s on device %s (%s), batch sizes %s, options %s, thresholds %s", target.name, target.backend,
                  target.device.name, target.device.kind, list(target.batch_sizes), dict(target.options) or "default",
                  dict(target.thresholds) or "none")
        with signals.hold(f"target {target.name}"), out.step(name, key) as journal:
            res = _build_target(target, registry, executor, canonical, journal.dir, job_for, availability[target.name])
            journal.payload.update(res.to_json(journal.dir, prefix=target.name))
        res.stored = out.finished(name, key)  # the entry as written, while the files were in staging
        results.append(res)
        log.debug("%s: %s%s in %.1f s", target.name, res.status, f" ({res.reason})" if res.reason else "",
                  res.seconds.get("total", 0.0))
    stages["targets"] = time.monotonic() - t0
    stages["total"] = time.monotonic() - started

    with stage("publishing the outputs"):
        manifest = _manifest(model, source_hash, canonical, calib_info, calib_src, eval_src, eval_note, classification,
                             fp32_acc, baseline, results, out_dir, time.monotonic() - started)
        manifest["quantization"] = jsonable(quantization)
        manifest["stages"] = {k: round(v, 3) for k, v in stages.items()}
        from deploykit.report import markdown_report

        manifest["files"] = out.publish(layout, manifest, markdown_report(manifest))
        canonical = _moved(canonical, out_dir)
        for r in results:
            r.relocate(out_dir)
    return BuildResult(out_dir, manifest, results, canonical)


def _check_adoption_options(o: BuildOptions, where: str) -> None:
    """Options that choose how to calibrate mean nothing for a model whose scales are kept."""
    if o.requantize:
        return
    given = [flag for flag, value in (("--method", o.method), ("--percentile", o.percentile),
                                       ("--activations", o.activations), ("--keep-float", o.keep_float),
                                       ("--recipe", o.recipe), ("--accuracy-target", o.accuracy_target))
             if value is not None]
    if given:
        raise ConfigError(f"{where} is already quantized: its scales are kept, so {given[0]} does not apply; "
                          f"pass --requantize to calibrate it again")


def _adopt(raw: "onnx.ModelProto", model: Path, source_hash: str, calib_src: data.DataSource, batch_size: int,
           targets: list[Target], registry: Registry, folder: Path, events: Callable[[str], None]) -> adopt.Adopted:
    """An already-quantized model as the canonical model: taken as given, or made canonical where
    that is exact (deploykit/quantize/adopt.py), written as a calibration step would write it.
    The FP32 reference is ``<stem>.fp32.onnx`` beside a ``<stem>.qdq.onnx`` when there is one
    (what deploykit and its QAT export write), else the model with its weights dequantized."""
    import shutil

    import onnx

    taken = adopt.adopt(raw, source_hash=source_hash, calib=None if calib_src.is_random else calib_src,
                        batch_size=batch_size, where=str(model))
    refused = [t for t in targets if taken.profile not in registry.get(t.backend).activation_profiles]
    if refused:
        raise ConfigError(f"{model}: its activations are {taken.profile} (zero points fixed by its quantizer) and "
                          f"target '{refused[0].name}' ({refused[0].backend}) lowers only "
                          f"{', '.join(registry.get(refused[0].backend).activation_profiles)}; drop that target or "
                          f"pass --requantize")
    qdq, calib, fp32 = (folder / f"canonical.{suffix}" for suffix in ("qdq.onnx", "calib.json", "fp32.onnx"))
    if taken.status == "canonical":
        shutil.copyfile(model, qdq)  # byte for byte: lowered as it is
    else:
        onnx.save(taken.model, str(qdq))
    taken.table.save(calib)
    beside = model.with_name(model.name.replace(".qdq.onnx", ".fp32.onnx"))
    if model.name.endswith(".qdq.onnx") and beside.is_file():
        shutil.copyfile(beside, fp32)
        reference = str(beside)
    else:
        onnx.save(taken.fp32, str(fp32))
        reference = "its weights dequantized"
    how = "canonical as given" if taken.status == "canonical" else \
        "made canonical (" + "; ".join(taken.changes) + ")" if taken.changes else "made canonical"
    events(f"already quantized ({taken.producer or 'unknown producer'}): {how}; scales kept; FP32 reference: {reference}")
    return taken


def _meta(model: "onnx.ModelProto", key: str) -> str:
    return next((p.value for p in model.metadata_props if p.key == key), "")


def quantization_summary(fp32: Any, result: Any, reason: str,
                         example: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """For the manifest: the activation profile and why, the float layers, their MACs (at the shapes
    of ``example``, one evaluation batch) and the int8 share of MACs."""
    graph = result.calibrated if getattr(result, "calibrated", None) is not None else fp32
    return {"activations": result.activations, "activations_reason": reason,
            "recipe": getattr(result, "recipe", "none"), "recipe_summary": dict(getattr(result, "recipe_summary", {})),
            **mac_summary(layer_macs(graph, example), result.float_layers)}


def resolve_recipe(option: str | None, configured: str, where: str, fp32: Any) -> str:
    """The recipe to run (``auto`` resolved for this network), validated: a bad one names its source."""
    from deploykit.quantize import recipes

    spec, source = (option, "--recipe") if option is not None else (configured, where)
    try:
        return recipes.format_recipe(recipes.parse_recipe(recipes.resolve_auto(spec, fp32)))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _meet_accuracy_target(fp32: Any, result: Any, eval_src: Any, target: Any, task: str, declared: list[str],
                          events: Callable[[str], None],
                          judges: dict[str, Callable[..., Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fewest float layers (beyond the declared ones) meeting ``target`` on the evaluation data,
    from the same calibration, judged on the targets' own artifacts where ``judges`` has them
    (else on the canonical semantics); their latency cost measured on the canonical models in
    onnxruntime."""
    from deploykit import analyze

    data = analyze.prepare_eval(fp32, eval_src, task=task)
    q = analyze.Quantized(fp32, result)
    if judges:
        judges = {name: _judge_on(judge, data) for name, judge in judges.items()}
    found = analyze.search_float_layers(q, data, target, judges=judges)
    floats = list(dict.fromkeys(list(declared) + found.float_layers))
    chosen = requantize(result, fp32, float_layers=floats) if found.float_layers else result
    judged_on = ", ".join(judges) if judges else "the canonical model"
    events(f"accuracy target {target}: {'met' if found.met else 'NOT met'} with {len(found.float_layers)} float "
           f"layer(s), {found.metrics.get(target.metric, float('nan')):.4f} on {judged_on} (int8 share of MACs "
           f"{found.int8_mac_share:.1%})")
    summary = found.to_json()
    summary["judged_on"] = list(judges) if judges else ["canonical"]
    summary["latency_cost"] = _latency_cost(result, chosen, eval_src) if found.float_layers else None
    return chosen, summary


def _artifact_judges(targets: list[Target], registry: Registry, availability: dict[str, Availability], fp32: Any,
                     workdir: Path, batch: int) -> dict[str, Callable[[Any, Any], np.ndarray]]:
    """For each target that can lower and run here: (variant, eval data) -> its first output,
    computed by lowering the variant with the target's backend and running its runner on batches
    of ``batch``, the size the target's accuracy check runs at (OpenVINO's int8 results depend on
    the batch: EfficientNet-Lite0, 39 float layers, 256 crops: 95.31% at batch 32, 94.92% at 1).
    Targets that cannot run here (missing runtime, remote device) do not judge."""
    import onnx

    from deploykit.canonical import CalibrationTable

    workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = workdir / "fp32.onnx"
    onnx.save(fp32, str(fp32_path))
    judges: dict[str, Callable[[Any, Any], np.ndarray]] = {}
    for target in targets:
        avail = availability.get(target.name)
        if avail is None or not (avail.can_lower and avail.can_run) or target.device.address:
            continue
        backend = registry.get(target.backend)
        folder = workdir / target.name

        def judge(variant: Any, data: Any, backend: Any = backend, target: Target = target,
                  folder: Path = folder) -> np.ndarray:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "variant.qdq.onnx"
            onnx.save(variant, str(path))
            canonical = CanonicalModel(path, variant, CalibrationTable.from_model(variant), fp32_path)
            artifact = backend.lower(canonical, target, folder / f"variant{backend.artifact_suffix}")
            with backend.load(artifact, target) as runner:
                return np.concatenate([runner.run(b.feeds)[0] for b in data.source.batches(batch)])

        judges[target.name] = judge
    return judges


def _judge_on(judge: Callable[[Any, Any], np.ndarray], data: Any) -> Callable[[Any], np.ndarray]:
    return lambda variant: judge(variant, data)


def _latency_cost(all_int8: Any, chosen: Any, source: Any, rounds: int = 15) -> dict[str, Any]:
    """Batch-1 latency of the all-int8 and the chosen canonical model in onnxruntime (default
    optimizations, interleaved rounds, medians): what the float layers cost."""
    feeds = {k: v[:1] for k, v in next(iter(source.batches(1))).feeds.items()}
    sessions = {name: ortsession.session(m.model, exact=False) for name, m in (("all_int8", all_int8), ("chosen", chosen))}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - t) * 1000)
    med = {k: float(np.median(v[2:])) for k, v in times.items()}
    return {"runtime": "onnxruntime (canonical models, CPU, batch 1)", "all_int8_ms": med["all_int8"],
            "chosen_ms": med["chosen"], "ratio": med["chosen"] / med["all_int8"] if med["all_int8"] else None}


def compare_profiles(other: "onnx.ModelProto", chosen_profile: str, batches: list[dict[str, np.ndarray]], reference: dict[str, Any],
                     classification: bool) -> dict[str, Any]:
    """Measure the other activation profile's canonical model (placed from the same statistics)
    and the chosen one against FP32: what the choice cost or saved."""
    other_profile = SYMMETRIC if chosen_profile == ASYMMETRIC else ASYMMETRIC
    session = ortsession.session(other, exact=True)  # exact Q/DQ, as the reference
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
    return {"status": "measured", "metric": metric, "chosen": chosen_profile, "other": other_profile,
            "chosen_metrics": chosen, "other_metrics": alt, "difference": delta,
            "message": f"{chosen_profile} activations {verdict} {amount} {metric} against {other_profile} "
                       f"({chosen[metric]:.4f} vs {alt[metric]:.4f}: both canonical models vs FP32, exact Q/DQ in onnxruntime)"}


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


@contextlib.contextmanager
def stage(step: str) -> Iterator[None]:
    """Name the step an unexpected fault happened in (one line, exit 3; -v shows the traceback);
    a full or read-only disk is an output-folder error, not a bug."""
    try:
        yield
    except DeploykitError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise OutputDirError(f"while {step}: {exc.strerror} ({exc.filename or 'the output folder'}); "
                                 f"free space or choose another --out, then rerun to continue") from exc
        raise BuildFault(step, exc) from exc
    except MemoryError as exc:
        raise BuildFault(step, exc) from exc
    except Exception as exc:
        raise BuildFault(step, exc) from exc


def _validate_options(o: BuildOptions) -> None:
    if o.task not in checks.TASKS:
        raise ConfigError(f"task '{o.task}' is not one of {', '.join(checks.TASKS)}")
    if o.percentile is not None and not (math.isfinite(o.percentile) and 0 < o.percentile <= 100):
        raise ConfigError(f"percentile {o.percentile} is not in (0, 100]")
    for name in ("samples", "eval_samples", "batch_size"):
        value = getattr(o, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name.replace('_', '-')} {value!r} must be a positive integer")
    if o.method is not None and o.method not in METHODS:
        raise ConfigError(f"unknown calibration method '{o.method}'; use one of {', '.join(METHODS)}")


def _refuse_code_from_config(cfg: Calibration, o: BuildOptions, tf: TargetsFile) -> None:
    """A data source that is code runs only when the user typed it (CLI/API) or --allow-code."""
    for key, given, value in (("data", o.calib, cfg.data), ("eval", o.eval, cfg.eval)):
        if given is None and value is not None and data.is_code(value) and not o.allow_code:
            raise ConfigError(f"{tf.where('calibration', key)} = '{value}' names Python code to run; deploykit "
                              f"does not run code from a configuration file unless you pass --allow-code "
                              f"(or give it with --{'calib' if key == 'data' else 'eval'})")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:32]


def _source_key(src: Any) -> Any:
    """What identifies a data source across runs: its name, and for files their size and mtime."""
    if src is None or callable(src):
        return None if src is None else f"callable:{getattr(src, '__qualname__', src)}:{uuid.uuid4().hex}"
    path = Path(str(src))
    try:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return str(src)


def _try_first_batch(session: Any, src: data.DataSource, batch_size: int) -> np.ndarray:
    """Run the first batch through FP32 onnxruntime before calibrating: data that the model
    cannot run on (ids out of range, wrong dynamic dims) fails now, in one line. Returns the
    first output."""
    batch = next(iter(src.batches(batch_size)))
    try:
        return np.asarray(session.run(None, batch.feeds)[0])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        hint = "; pass --calib with real samples" if src.is_random else ""
        raise DataError(f"{src.description}: the model cannot run on this data: {first}{hint}") from None


def _check_task(out0: np.ndarray, task: str, labels: np.ndarray | None, where: str, model: onnx.ModelProto) -> bool:
    """Decide classification from the first output and the model's head (checks.classifies); check
    labels against it (shape, type, range)."""
    out0 = np.asarray(out0)
    if task == "classification" and not checks.is_classifier(out0):
        raise ConfigError(f"--task classification needs a first output of shape [N, classes], the model gives "
                          f"{list(out0.shape)}; use --task other")
    classification = checks.classifies(task, out0, model)
    if labels is not None and classification:
        if labels.ndim > 1 and int(np.prod(labels.shape[1:])) != 1:
            raise DataError(f"{where}: labels have shape {list(labels.shape)}; give one class index per sample")
        flat = labels.reshape(-1)
        if not np.issubdtype(flat.dtype, np.integer) and not (
                np.issubdtype(flat.dtype, np.floating) and np.all(np.isfinite(flat)) and np.all(flat == np.round(flat))):
            raise DataError(f"{where}: labels are {flat.dtype}, not class indices")
        classes = out0.shape[1]
        if flat.size and (flat.min() < 0 or flat.max() >= classes):
            raise DataError(f"{where}: labels range over [{flat.min():g}, {flat.max():g}] but the model has "
                            f"{classes} classes (0..{classes - 1}); check the labels or the model")
    return classification


def _moved(canonical: CanonicalModel, out_dir: Path) -> CanonicalModel:
    return dataclasses.replace(canonical, path=out_dir / canonical.path.name,
                               fp32_path=out_dir / canonical.fp32_path.name)


def _calibration(cfg: Calibration, o: BuildOptions) -> Calibration:
    changes = {k: v for k, v in {"method": o.method, "percentile": o.percentile, "samples": o.samples,
                                 "data": o.calib, "batch_size": o.batch_size}.items() if v is not None}
    return dataclasses.replace(cfg, **changes)


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


def _build_target(target: Target, registry: Registry, executor: Executor, canonical: CanonicalModel, folder: Path,
                  job_for: Callable[[Target, Artifact], CheckJob], availability: Availability) -> TargetResult:
    """Preflight, lower, then run the target's check job on ``executor``, under one progress
    step whose lower / accuracy / latency steps nest beneath it."""
    res = TargetResult(target)
    started = time.monotonic()
    with progress_step(f"target {target.name} ({target.backend})", unit="stage") as progress:
        _target_stages(res, progress, registry, executor, canonical, folder, job_for, availability)
    res.seconds["total"] = time.monotonic() - started
    return res


def _target_stages(res: TargetResult, progress: Step, registry: Registry, executor: Executor,
                   canonical: CanonicalModel, folder: Path, job_for: Callable[[Target, Artifact], CheckJob],
                   availability: Availability) -> None:
    target = res.target
    try:
        t0 = time.monotonic()
        backend = registry.get(target.backend)
        res.availability = availability
        pre_checks, res.metadata = backend.preflight(canonical, target)
        res.seconds["preflight"] = time.monotonic() - t0
        remote = bool(target.device.address)  # checked on the device, whatever this host can run
        progress.total = 4 if availability.can_run or remote else 2  # preflight, lower[, accuracy, latency]
        progress.update()
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in pre_checks)
        # a backend that cannot lower here lowers on the device when it has an agent (TensorRT
        # engines are built where they run); the artifact is downloaded into --out all the same
        lower_there = not res.availability.can_lower and remote and isinstance(executor, DeviceRouter)
        if not res.availability.can_lower and not lower_there:
            res.status, res.reason = "skipped", _missing(res.availability)
            log.debug("%s: skipped: %s", target.name, res.reason)
            return
        dest = folder / f"{target.name}{backend.artifact_suffix}"
        t0 = time.monotonic()
        with bar(1, f"{target.name}: lower" + (f" on {target.device.name}" if lower_there else ""), "model") as b:
            res.artifact = (executor.lower(canonical, target, dest) if isinstance(executor, DeviceRouter) and lower_there
                            else backend.lower(canonical, target, dest))
            b.update()
        if lower_there:
            res.metadata["lowered_on"] = f"{target.device.name} ({target.device.address})"
        res.seconds["lower"] = time.monotonic() - t0
        progress.update()
        res.checks.extend(checks.apply_thresholds(c, target.thresholds) for c in res.artifact.checks)
        log.debug("%s: lowered to %s (%.1f MB) in %.1f s; verification: %s", target.name, res.artifact.path.name,
                  _size_mb(res.artifact.path), res.seconds["lower"],
                  ", ".join(f"{c.name} {c.status}" for c in res.artifact.checks) or "none")
        not_here = executor.accepts(target, res.availability)  # a remote device's agent: "" (docs/agent.md)
        if not_here:  # lowered and verified, never "ok": nothing was measured
            res.status, res.reason = "lowered", f"lowered and verified; checks not run: {not_here}"
            for name in ("top1_agreement", "cosine", "fidelity_rel_l2", "latency_p50_ms"):
                res.checks.append(CheckResult(name, "not_run", message=not_here))
        else:
            job = job_for(target, res.artifact)
            log.debug("%s: check job: %d evaluation batches against FP32 and the canonical model, latency at batch "
                      "sizes %s (%d warm-up, %d runs each)", target.name, len(job.inputs), list(target.batch_sizes),
                      target.warmup, target.runs)
            checked = executor.run(job)
            progress.update(2)
            res.checks.extend(checked.checks)
            res.latency.extend(checked.latency)
            res.seconds.update(checked.seconds)
            device_note = checked.notes.pop(DEVICE_NOTE, None)
            res.metadata.update(checked.notes)
            if remote:  # the facts of the device the checks ran on, as its agent reported them
                res.device_info = dict(device_note or {"address": target.device.address})
        if not remote:
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


def _manifest(model: Path, source_hash: str, canonical: CanonicalModel, calib: dict[str, Any],
              calib_src: data.DataSource, eval_src: data.DataSource, eval_note: str, classification: bool,
              fp32_acc: float | None, baseline: list[dict[str, Any]], results: list[TargetResult], out_dir: Path,
              total_s: float) -> dict[str, Any]:
    """The manifest; ``files`` is filled in by the publish step (exactly what it moved into OUT)."""
    qdq_nodes = [n for n in canonical.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    table = canonical.path.with_name(canonical.path.name.replace(".qdq.onnx", ".calib.json"))
    return {
        "schema_version": SCHEMA_VERSION,
        "deploykit": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node()},
        "versions": _versions(),
        "model": {"path": str(out_dir / model.name) if model.parent.name == "source" and model.parent.parent.name == "done"
                  else str(model), "sha256": source_hash},
        "calibration": {"method": calib["method"], "samples": calib["samples"], "data": calib_src.description,
                        "data_sha256": calib["data_hash"], "random_data": calib["random_data"],
                        "warning": RANDOM_WARNING if calib["random_data"] else "",
                        "seconds": round(calib.get("seconds") or 0.0, 3)},
        "evaluation": {"data": eval_src.description, "note": eval_note, "classification": classification,
                       "fp32_accuracy": fp32_acc},
        "canonical": {"path": canonical.path.name, "sha256": sha256(canonical.path),
                      "fp32_path": canonical.fp32_path.name,
                      "calibration_table": table.name, "calibration_table_sha256": sha256(table),
                      "qdq_nodes": len(qdq_nodes), "tensors_in_table": len(canonical.calibration)},
        "baseline": {"backend": "onnxruntime", "precision": "fp32", "latency": baseline},
        "targets": [r.to_json(out_dir) for r in results],
        "files": [],
        "seconds": round(total_s, 3),
    }
