"""The ``deploykit`` command. Handled errors print one line and exit non-zero."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deploykit._version import __version__
from deploykit.errors import BuildFault, CheckFailed, ConfigError, DeploykitError, Terminated

if TYPE_CHECKING:  # imported where used: `deploykit --help` stays fast
    from deploykit.targets import Preprocess

DEFAULT_TARGETS_FILE = "targets.toml"


def _targets_file(value: str | None) -> Path | None:
    if value:
        return Path(value)
    return Path(DEFAULT_TARGETS_FILE) if Path(DEFAULT_TARGETS_FILE).is_file() else None


def _echo_json(obj: Any) -> None:
    from deploykit.outdir import dumps

    click.echo(dumps(obj))  # strict JSON: NaN/inf become null


_VERBOSE = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deploykit")
@click.option("-v", "--verbose", is_flag=True,
              help="Say what each stage does, and show the vendor SDKs' own start-up logs (quiet by default).")
def cli(verbose: bool) -> None:
    """Ship one FP32 model to many targets: calibrate once into a canonical QDQ INT8 ONNX model,
    lower it to each target keeping its scales, and check latency and accuracy on target.

    \b
    Typical use:
      deploykit build model.onnx --target onnxruntime,openvino --calib calib.npz --eval eval.npz
      deploykit backends            # what this machine can build and run
      deploykit targets             # list and validate targets.toml
      deploykit inspect out/canonical.qdq.onnx --lint
      deploykit run-job JOB_DIR     # a saved check job, in this process
      deploykit agent               # serve check jobs on this device (docs/agent.md)
    """
    from deploykit import vendorlog

    verbose = verbose or vendorlog.verbose()
    _VERBOSE["on"] = verbose
    ctx = click.get_current_context()
    if ctx.invoked_subcommand != "build":  # only a build defers Ctrl-C to safe points
        from deploykit import signals

        signals.unblock()
    from deploykit.progress import EchoHandler

    # -v: deploykit's own stage descriptions (DEBUG) and the vendors' INFO logs; not every
    # library's DEBUG chatter (matplotlib's font cache, pydot, ...) that a vendor import pulls in
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[EchoHandler()])  # through the live display, never through its bars
    logging.getLogger("deploykit").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    vendorlog.set_verbose(verbose)  # -v: vendor start-up lines and loggers shown, here and in child processes


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "targets", required=True,
              help="Comma-separated targets: entries of targets.toml, or bare backend names.")
@click.option("--calib", metavar="SRC", help="Calibration data: .npy/.npz, an image folder, or module:function. "
              "Without it deploykit calibrates on random data and says so loudly.")
@click.option("--eval", "eval_", metavar="SRC", help="Evaluation data (same forms as --calib; an .npz 'labels' "
              "array or class sub-folders give task accuracy). Default: the calibration data.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="Calibration method [default: minmax (best on every real network measured), or targets.toml "
              "[calibration] method].")
@click.option("--activations", type=click.Choice(["symmetric", "asymmetric"]),
              help="Activation profile of the canonical model: asymmetric (int8 zero point per tensor: more accurate "
              "after ReLU) or symmetric (zero point 0: TensorRT needs it) [default: targets.toml [quantization] "
              "activations, else symmetric when any target needs it, asymmetric otherwise].")
@click.option("--keep-float", "keep_float", metavar="PATTERNS", help="Comma-separated layers to keep float: node "
              "names, op types (Gemm) or globs ('/head/*'); a pattern matching no node is an error "
              "[default: targets.toml [quantization] keep_float].")
@click.option("--recipe", metavar="STEPS", help="Accuracy-recovering PTQ, comma-separated: bias_correction, "
              "smoothquant[:ALPHA], cle, adaround[:ITERATIONS], gptq[:DAMPING]; 'none' for plain calibration [default: targets.toml "
              "[calibration] recipe, else auto: bias_correction for CNNs, smoothquant:0.9,gptq for transformers].")
@click.option("--accuracy-target", "accuracy_target", metavar="METRIC=VALUE", help="Keep the fewest layers float "
              "(by sensitivity per MAC) that meet top1_agreement=0.95, cosine=0.998 or accuracy_drop=0.01 on the "
              "evaluation data, then tries those layers back in int8 (largest MACs first) while the target holds; "
              "judged on every target's artifact; exit 1 (shipping the best found) when not met.")
@click.option("--requantize", is_flag=True, help="MODEL is already quantized (QDQ): calibrate its float reference "
              "again instead of keeping its scales. Without it a canonical model is lowered as given, another "
              "quantizer's model is made canonical where that is exact, else refused naming the node and why.")
@click.option("--percentile", type=float, callback=lambda c, p, v: _percentile(v),
              help="Percentile for --method percentile, in (0, 100] [default: 99.99].")
@click.option("--samples", type=click.IntRange(min=1), help="Calibration samples to use [default: 512].")
@click.option("--eval-samples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Evaluation samples to use.")
@click.option("--task", type=click.Choice(["auto", "classification", "other"]), default="auto", show_default=True,
              help="classification: top-1/top-5 agreement and accuracy on the first output; other (encoders, "
              "detectors): cosine and L2 only; auto: classification when the first output is [N, classes] from a linear "
              "head, not an embedding (docs/accuracy.md).")
@click.option("--calib-batch-size", type=click.IntRange(min=1), help="Batch size while calibrating (scales do not depend on it).")
@click.option("--preprocess", metavar="K=V,...", help="Image preprocessing, e.g. "
              "'resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW'.")
@click.option("--targets-file", metavar="FILE", help="Targets file [default: ./targets.toml if present].")
@click.option("-o", "--out", "out_dir", default="deploykit-out", show_default=True, type=click.Path(path_type=Path),
              help="Output folder (created; refused if it holds files deploykit did not write).")
@click.option("--no-baseline", is_flag=True, help="Skip the FP32 onnxruntime latency reference row.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Results history to record this build in [default: $DEPLOYKIT_DB, else the user's data folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout instead of the table.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the checks run: local (this machine, and each remote device's agent) or ray (a Ray task "
                   "per target on the node declaring resource device:NAME; docs/agent.md).")
@click.option("--ray-address", metavar="ADDR", help="With --executor ray: the cluster to join (e.g. HEAD:6379) "
                                                      "[default: start a local instance].")
@click.option("--allow-code", is_flag=True, help="Let targets.toml name Python code as data ('module:function' or "
              "'file.py:function' in [calibration]); without it only data files and folders are read from it. "
              "Code given with --calib/--eval always runs: you typed it.")
def build(model: Path, targets: str, calib: str | None, eval_: str | None, method: str | None,
          activations: str | None, keep_float: str | None, recipe: str | None, accuracy_target: str | None,
          percentile: float | None, samples: int | None, eval_samples: int, task: str, calib_batch_size: int | None,
          preprocess: str | None, targets_file: str | None, out_dir: Path, no_baseline: bool, db: Path | None,
          as_json: bool, executor: str, ray_address: str | None, allow_code: bool, requantize: bool) -> None:
    """Calibrate MODEL once, lower it for every --target, run the checks, write a manifest and report.

    Writes OUT/canonical.qdq.onnx (+ .calib.json, + .fp32.onnx), OUT/<target>/<artifact>,
    OUT/manifest.json and OUT/report.md. A target whose backend is unavailable here is
    skipped with the reason; the others still build. Exit code 1 when a check fails its
    threshold or a target errors, 2 for bad input, 3 for an unexpected fault, 130 on Ctrl-C,
    143 on SIGTERM.

    OUT is locked while a build runs (a second build into it fails at once). Each step is
    journaled in OUT/.deploykit: after an interruption, rerunning the same command keeps the
    finished steps and redoes the rest; the new outputs replace the old ones only at the end.
    """
    from deploykit import progress, signals

    with signals.deferred():  # before any vendor SDK starts a thread: they inherit the blocked mask
        _build(model, targets, calib, eval_, method, percentile, samples, eval_samples, task, calib_batch_size,
               preprocess, targets_file, out_dir, no_baseline, db, as_json, allow_code, progress,
               activations, keep_float, recipe, accuracy_target, executor, ray_address, requantize)


def _percentile(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= 100):
        raise click.BadParameter(f"{value} is not in (0, 100]", param_hint="'--percentile'")
    return value


def _build(model: Path, targets: str, calib: str | None, eval_: str | None, method: str | None,
           percentile: float | None, samples: int | None, eval_samples: int, task: str, calib_batch_size: int | None,
           preprocess: str | None, targets_file: str | None, out_dir: Path, no_baseline: bool, db: Path | None,
           as_json: bool, allow_code: bool, progress: Any, activations: str | None = None,
           keep_float: str | None = None, recipe: str | None = None, accuracy_target: str | None = None,
           executor: str = "local", ray_address: str | None = None, requantize: bool = False) -> None:
    from deploykit.pipeline import BuildOptions, build as run_build
    from deploykit.report import terminal_table

    if as_json:
        progress.set_enabled(False)
    names = list(dict.fromkeys(t.strip() for t in targets.split(",") if t.strip()))  # a target given twice builds once
    if not names:
        raise ConfigError("--target: give at least one target name")
    opts = BuildOptions(
        targets=names, out_dir=out_dir, targets_file=_targets_file(targets_file), calib=calib, eval=eval_,
        method=method, percentile=percentile, samples=samples, eval_samples=eval_samples,
        batch_size=calib_batch_size, preprocess=_parse_preprocess(preprocess) if preprocess else None,
        baseline=not no_baseline, task=task, allow_code=allow_code, activations=activations, recipe=recipe,
        accuracy_target=accuracy_target, requantize=requantize,
        keep_float=[p.strip() for p in keep_float.split(",") if p.strip()] if keep_float is not None else None,
        on_event=(lambda msg: None) if as_json else progress.echo)
    if ray_address and executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    checks_on = None
    if executor == "ray":
        from deploykit.rayexec import RayExecutor
        from deploykit.targets import load_targets

        # a local instance stands for this machine's devices: those of targets.toml without an address
        here = [d.name for d in load_targets(opts.targets_file).devices.values() if not d.address]
        checks_on = RayExecutor(ray_address, devices=here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_build(model, opts, executor=checks_on)
    _record_build(result.manifest, db, out_dir, quiet=as_json)
    if as_json:
        _echo_json(result.manifest)
    else:
        click.echo(terminal_table(result.manifest))
        click.echo(f"\nwrote {out_dir / 'manifest.json'} and {out_dir / 'report.md'}")
    if not result.accuracy_target_met:
        search = result.manifest["quantization"]["accuracy_target"]
        raise CheckFailed(f"--accuracy-target {search['target']} not met: the best found keeps "
                          f"{len(search['float_layers'])} layer(s) float and reaches {search['measured']:.4f}; "
                          f"that model was written (see {out_dir / 'report.md'})")
    if not result.ok:
        from deploykit.pipeline import SUCCESS

        bad = [t.target.name for t in result.targets if t.status not in SUCCESS]
        raise CheckFailed(f"targets with failed checks or errors: {', '.join(bad)} (see {out_dir / 'report.md'})")


def _record_build(manifest: dict[str, Any], db: Path | None, out_dir: Path, quiet: bool) -> None:
    """Every build goes to the results history; a history that cannot be written costs a
    warning, never the build."""
    from deploykit.history import record_build

    try:
        run_id = record_build(manifest, db, str(out_dir.resolve()))
    except DeploykitError as exc:
        click.echo(f"deploykit: warning: build not recorded in the results history: {exc}", err=True)
        return
    if not quiet:
        click.echo(f"recorded as run {run_id} in the results history ('deploykit results')", err=True)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", metavar="SRC", required=True, help="Calibration data (.npy/.npz, image folder, module:function).")
@click.option("--eval", "eval_", metavar="SRC", help="Evaluation data [default: the calibration data].")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="Calibration method.")
@click.option("--activations", type=click.Choice(["symmetric", "asymmetric"]), default="asymmetric",
              show_default=True, help="Activation profile (symmetric if you ship to TensorRT).")
@click.option("--recipe", default="auto", show_default=True, metavar="STEPS",
              help="Accuracy-recovering recipe, as for build (none, bias_correction, smoothquant:0.9, ...).")
@click.option("--samples", type=int, default=512, show_default=True, help="Calibration samples.")
@click.option("--eval-samples", type=int, default=512, show_default=True, help="Evaluation samples.")
@click.option("--task", type=click.Choice(["auto", "classification", "other"]), default="auto", show_default=True,
              help="classification: top-1 agreement; other (encoders): cosine; auto: as for build (an [N, C] output "
              "from a linear head; an embedding is other).")
@click.option("--only-float", is_flag=True, help="Measure only the 'this layer float' variant (half the time).")
@click.option("--top", type=int, default=None, help="Rows to print [default: all].")
@click.option("-o", "--out", "out_dir", default="deploykit-analyze", show_default=True, type=click.Path(path_type=Path),
              help="Folder for analysis.json, analysis.md and sensitivity.png/.svg.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON on stdout.")
def analyze(model: Path, calib: str, eval_: str | None, method: str, activations: str, recipe: str, samples: int,
            eval_samples: int, task: str, only_float: bool, top: int | None, out_dir: Path, as_json: bool) -> None:
    """Per-layer quantization sensitivity of MODEL: for every layer the canonical model runs in
    int8, the metric against FP32 (top-1 agreement or cosine) and the SQNR with only that layer
    float and with only that layer int8. One calibration: every variant is placed again from
    the observed ranges. Ranked, most sensitive first; writes OUT/analysis.json, analysis.md and
    sensitivity.png/.svg.
    """
    from deploykit import analyze as an, data, model as modelmod, progress
    from deploykit.quantize import quantize
    from deploykit.tables import render

    if as_json:
        progress.set_enabled(False)
    fp32 = modelmod.normalise(modelmod.load_onnx(model), str(model))
    specs = modelmod.input_specs(fp32)
    calib_src = data.open_source(calib, specs, None, samples)
    eval_src = data.open_source(eval_ or calib, specs, None, eval_samples)
    if calib_src is None or eval_src is None:  # pragma: no cover - open_source returns None only without a spec
        raise ConfigError("--calib: give calibration data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(fp32, calib_src, method, activations=activations, recipe=recipe)
        evaluation = an.prepare_eval(fp32, eval_src, task=task)
        analysis = an.analyze(an.Quantized(fp32, result), evaluation, both=not only_float)
    analysis.settings = {"model": str(model), "method": method, "activations": activations, "recipe": result.recipe,
                         "calibration_samples": result.samples, "evaluation_samples": evaluation.samples}
    paths = an.write_outputs(analysis, out_dir)
    if as_json:
        _echo_json(analysis.to_json())
        return
    header, rows = an.format_table(analysis, top)
    base = analysis.baseline
    click.echo(f"every layer int8: {analysis.metric} {base[analysis.metric]:.4f}, SQNR {base['sqnr']:.1f} dB "
               f"({len(analysis.layers)} layers, {evaluation.samples} samples, {analysis.seconds:.0f} s)")
    click.echo(render(header, rows))
    click.echo(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def _parse_preprocess(text: str) -> Preprocess:
    from deploykit.targets import parse_preprocess

    raw: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--preprocess: '{part}' is not key=value")
        key = key.strip()
        try:
            if key in ("mean", "std"):
                raw[key] = [_finite(v) for v in value.split("/")]
            elif key in ("resize", "crop"):
                raw[key] = int(value)
            elif key == "scale":
                raw[key] = _finite(value)
            else:
                raw[key] = value.strip()
        except ValueError:
            raise ConfigError(f"--preprocess: '{part}': {value!r} is not a valid number for '{key}'") from None
    return parse_preprocess(raw, "--preprocess")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backends(as_json: bool) -> None:
    """List every registered backend: can this machine lower and run it, and if not, why and
    how to install what is missing."""
    from deploykit.plugins import load_registry
    from deploykit.testing import make_target

    registry = load_registry()
    rows: list[dict[str, Any]] = []
    for name in registry.names():
        cls = registry.backends[name]
        try:
            av = cls().probe(make_target(cls))
        except Exception as exc:  # a plugin bug shows up here, named, instead of crashing the list
            from deploykit.backend import Availability

            av = Availability.missing(f"probe failed: {type(exc).__name__}: {exc}", cls.install_hint)
        rows.append({"backend": name, "plugin": registry.owner(name), "can_lower": av.can_lower, "can_run": av.can_run,
                     "reason": av.reason, "install_hint": av.install_hint if not av.can_run else "",
                     "versions": dict(av.versions), "description": cls.description})
    if as_json:
        _echo_json(rows)
        return
    from deploykit.tables import render

    table = []
    for r in rows:
        state = "ready" if r["can_run"] else ("lower only" if r["can_lower"] else "unavailable")
        notes = [r["description"]] + ([", ".join(f"{k} {v}" for k, v in r["versions"].items())] if r["versions"] else [])
        if r["reason"]:
            notes.append(f"why: {r['reason']}")
        if r["install_hint"]:
            notes.append(f"install: {r['install_hint']}")
        table.append([r["backend"], state, "; ".join(notes)])
    click.echo(render(["backend", "state", "what / why / install"], table))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List loaded plugins (entry points of the 'deploykit' group) and the backends each registers."""
    from deploykit.plugins import load_registry

    registry = load_registry()
    rows: list[dict[str, Any]] = [
        {"name": p.name, "module": p.module, "distribution": p.distribution, "version": p.version,
         "backends": p.backends} for p in registry.plugins.values()]
    if as_json:
        _echo_json(rows)
        return
    from deploykit.tables import render

    click.echo(render(["plugin", "distribution", "version", "module", "backends"],
                      [[r["name"], r["distribution"], r["version"], r["module"], ", ".join(r["backends"])] for r in rows]))


@cli.command()
@click.option("--targets-file", metavar="FILE", help="Targets file [default: ./targets.toml].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets(targets_file: str | None, as_json: bool) -> None:
    """List and validate the targets in targets.toml (every key is checked)."""
    from deploykit.plugins import load_registry
    from deploykit.targets import load_targets

    path = _targets_file(targets_file)
    if path is None:
        raise ConfigError(f"no {DEFAULT_TARGETS_FILE} here; pass --targets-file")
    tf = load_targets(path)
    registry = load_registry()
    resolved = registry.all_targets(tf)
    rows: list[dict[str, Any]] = [{"name": t.name, "backend": t.backend, "device": t.device.name, "device_kind": t.device.kind,
             "address": t.device.address, "batch_sizes": list(t.batch_sizes), "options": dict(t.options), "thresholds": dict(t.thresholds),
             "description": t.description} for t in resolved]
    if as_json:
        _echo_json({"file": str(path), "targets": rows, "devices": sorted(tf.devices)})
        return
    from deploykit.tables import render

    table = [[r["name"], r["backend"], r["device"] + (f" ({r['address']})" if r["address"] else ""), ", ".join(map(str, r["batch_sizes"])),
              ", ".join(f"{k}={v:g}" for k, v in r["thresholds"].items()) or "-"] for r in rows]
    click.echo(render(["target", "backend", "device", "batch sizes", "thresholds"], table,
                      title=f"{path}: {len(rows)} targets, {len(tf.devices)} devices, valid"))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--lint", "run_lint", is_flag=True, help="Check the canonical-model contract; exit 1 on any violation.")
@click.option("--tensorrt", is_flag=True, help="With --lint: only the rules TensorRT's parser enforces.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: Path, run_lint: bool, tensorrt: bool, as_json: bool) -> None:
    """Show what MODEL really declares: ONNX IR version, the opset domains its nodes use, inputs and
    outputs with dtype and shape, ops, Q/DQ counts and metadata (control characters escaped);
    --lint checks the canonical-model contract and names each offending node and rule."""
    import onnx

    from deploykit.canonical import META_TABLE, lint
    from deploykit.modelinfo import describe, render_text
    from deploykit.quantize.saturation import META_SATURATION
    from deploykit.tables import escape

    if not model.is_file():
        raise ConfigError(f"{model}: model file not found")
    try:
        m = onnx.load(str(model))
    except Exception as exc:
        raise ConfigError(f"{model}: not a valid ONNX model ({type(exc).__name__})") from None
    info = describe(m, model, meta_skip=(META_TABLE, META_SATURATION))  # long per-tensor / per-layer JSON
    violations = lint(m, tensorrt_only=tensorrt) if run_lint else []
    if run_lint:
        info["lint"] = [{"rule": v.rule, "node": v.node, "message": v.message, "tensorrt": v.tensorrt} for v in violations]
    if as_json:
        _echo_json(info)
    else:
        click.echo(render_text(info))
        if run_lint:
            if violations:
                for v in violations:
                    click.echo(f"lint: {escape(str(v))}")
            else:
                click.echo("lint: clean (" + ("TensorRT rules" if tensorrt else "every canonical rule") + ")")
    if violations:
        raise CheckFailed(f"{model}: {len(violations)} lint violation(s)")


@cli.command("compare-layers")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--eval", "eval_", metavar="SRC", help="Inputs to compare on [default: the build's evaluation data].")
@click.option("--samples", type=int, default=32, show_default=True, help="Samples to run (every layer of each).")
@click.option("-t", "--target", "targets", metavar="NAME[,NAME]", help="Only these targets of the build.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the per-layer plot here [default: OUT_DIR/layers.png].")
@click.option("--all-layers", is_flag=True, help="List every layer in graph order instead of the 10 worst.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every layer of every target).")
def compare_layers(out_dir: Path, eval_: str | None, samples: int, targets: str | None, plot_path: Path | None,
                   all_layers: bool, as_json: bool) -> None:
    """Compare each target's artifact in OUT_DIR with the canonical model, layer by layer.

    The model is cut at every quantized tensor; each layer is fed the canonical model's own
    inputs (so errors do not compound) and its int8 output compared with the canonical one:
    the fraction of values within one int8 step, the exact fraction, the largest difference,
    the gain, and a verdict: exact, rounding (the runtime's integer rounding), wrong_scale (the
    lowering's), beyond_rounding (right scale, more than one step off). Writes
    OUT_DIR/layers.json and a plot.
    """
    from deploykit import layers

    names = [n.strip() for n in targets.split(",") if n.strip()] if targets else None
    reports = layers.compare_out_dir(out_dir, eval_, samples, names)
    layers.save_json(reports, out_dir / "layers.json")
    plotted = layers.plot(reports, plot_path or out_dir / "layers.png") if any(r.layers for r in reports) else None
    if as_json:
        _echo_json({"layers": [r.to_json() for r in reports]})
        return
    for report in reports:
        click.echo(report.summary())
        if report.layers:
            click.echo(layers.table(report, None if all_layers else layers.WORST_LISTED, worst_first=not all_layers))
        click.echo("")
    click.echo(f"wrote {out_dir / 'layers.json'}" + (f" and {plotted}" if plotted else ""))


@cli.command("run-job")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of a table.")
def run_job(folder: Path, as_json: bool) -> None:
    """Run the check job saved in FOLDER (job.json + arrays.npz) in this process.

    The artifact the job names must be readable here. Writes FOLDER/result.json; exit code 1
    when a check fails its threshold, 2 when FOLDER is not a check job. See docs/check-jobs.md.
    """
    from deploykit import progress
    from deploykit.fileio import atomic_output
    from deploykit.jobs import RESULT_FILE, CheckJob, LocalExecutor
    from deploykit.outdir import dumps

    if as_json:
        progress.set_enabled(False)
    job = CheckJob.load(folder)
    result = LocalExecutor().run(job)
    payload = result.to_json()
    with atomic_output(folder / RESULT_FILE) as tmp:
        tmp.write_text(dumps(payload), encoding="utf-8")  # strict JSON: a NaN metric becomes null
    if as_json:
        _echo_json(payload)
    else:
        from deploykit.tables import render

        click.echo(render(["check", "status", "value", "threshold"], [
            [c.name, c.status, "-" if c.value is None else f"{c.value:.6g}",
             "-" if c.threshold is None else f"{c.bound} {c.threshold:g}"] for c in result.checks]))
        click.echo(f"\nwrote {folder / RESULT_FILE}")
    failed = [c.name for c in result.checks if c.status == "fail"]
    if failed:
        raise CheckFailed(f"{job.target.name}: failed checks: {', '.join(failed)}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (then prefer --cert/--key or a trusted network).")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="Port to listen on.")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path),
              help="Where uploaded files and running jobs live; nothing is written outside it "
                   "[default: ~/.cache/deploykit/agent].")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the token clients must send [default: $DEPLOYKIT_AGENT_TOKEN]; at least 16 characters.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=1024.0, show_default=True,
              help="Largest file accepted (413 past it).")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="TLS certificate (PEM): serve https.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="TLS private key (PEM) for --cert.")
def agent(host: str, port: int, folder: Path | None, token_file: Path | None, max_upload_mb: float,
          cert: Path | None, key: Path | None) -> None:
    """Run check jobs sent to this device over HTTP, with the backends installed here.

    A device in targets.toml with `address = "http://HOST:PORT"` sends its targets' check jobs
    here: `deploykit build` lowers on the build machine, uploads the artifact (only files the
    agent does not hold yet) and gets back the same results as a local check. Every call needs
    `Authorization: Bearer TOKEN`; without a token the agent does not start. Jobs run one at a
    time, so timings never overlap. See docs/agent.md.

    \b
    Example:
      export DEPLOYKIT_AGENT_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
      deploykit agent --host 0.0.0.0 --port 8765
    """
    from deploykit import agent as agent_server

    token = agent_server.read_token(token_file)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    agent_server.serve(host, port, folder or cache / "deploykit" / "agent", token, max_upload_mb, cert, key,
                       announce=lambda line: click.echo(line, err=True))


def _register_matrix_commands() -> None:
    """Add ``matrix``/``results``/``compare``. Called from :func:`main`, not at import: their
    imports (numpy, onnx) start threads, which must inherit the signal mask main() sets first."""
    from deploykit.matrix.cli import compare, matrix, results

    for command in (matrix, results, compare):
        cli.add_command(command)


def _on_sigterm(signo: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every outcome is an exit code and at most one error line (``-v``: tracebacks)."""
    from deploykit import signals, vendorlog

    mask = signals.block()  # before numpy/SDK threads exist: they inherit it (see deploykit/signals.py)
    vendorlog.install()  # before any vendor import: quiet start-up logs (see deploykit/vendorlog.py)
    try:
        _register_matrix_commands()
        return _main(argv)
    finally:
        vendorlog.stop()
        signals.restore(mask)


def _main(argv: list[str] | None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="deploykit", standalone_mode=False)
    except BuildFault as exc:
        if _VERBOSE["on"]:
            import traceback

            traceback.print_exception(exc.original, file=sys.stderr)
        click.echo(f"deploykit: error: {exc}", err=True)
        return exc.exit_code
    except DeploykitError as exc:
        click.echo(f"deploykit: error: {exc}", err=True)
        return exc.exit_code
    except Terminated:
        click.echo("deploykit: terminated (SIGTERM)", err=True)
        return Terminated.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("deploykit: interrupted (finished steps are kept: rerun the same command to continue)", err=True)
        return 130
    except click.ClickException as exc:  # usage errors too: one line, like every handled error
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"deploykit: error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        if _VERBOSE["on"]:
            import traceback

            traceback.print_exc()
        click.echo(f"deploykit: error: {BuildFault('running the command', exc)}", err=True)
        return BuildFault.exit_code
    return 0


#: vendor SDKs whose native threads can crash Python's own teardown (seen: SIGSEGV at exit)
_NATIVE_SDKS = ("tensorflow", "openvino", "ai_edge_litert", "tensorrt", "coremltools")


def entry() -> None:
    """The console script: ``main``, then leave without interpreter teardown once a vendor SDK
    is loaded (its threads may still be running native code; results are already on disk)."""
    code = main()
    if any(name in sys.modules for name in _NATIVE_SDKS):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
