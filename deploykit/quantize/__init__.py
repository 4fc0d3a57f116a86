"""FP32 model -> the canonical QDQ model: observe ranges (streaming), pick thresholds by the
calibration method, place Q/DQ by the canonical rules, lint. See canonical.py for the rules."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import onnx

from deploykit import canonical as rules
from deploykit._version import __version__
from deploykit.canonical import CanonicalModel
from deploykit.data import DataSource
from deploykit.errors import ConfigError, DeploykitError
from deploykit.fileio import atomic_output
from deploykit.model import fixed_batch, input_specs
from deploykit.progress import bar
from deploykit.quantize.islands import resolve_keep_float
from deploykit.quantize.observe import METHODS, Observer, TensorStats, needs_histograms
from deploykit.quantize.place import build_table, insert_qdq
from deploykit.quantize.recipes import META_RECIPE

log = logging.getLogger("deploykit")


@dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    table: rules.CalibrationTable
    method: str
    samples: int
    data_hash: str
    random_data: bool
    activations: str = rules.SYMMETRIC  # the activation profile
    float_layers: tuple[str, ...] = ()  # declared float islands (node names)
    percentile: float = 99.99
    source_hash: str = ""
    #: The observed statistics of every float tensor: :func:`requantize` places Q/DQ again from
    #: these (another profile, method or set of float layers) without calibrating again.
    stats: Mapping[str, TensorStats] = field(default_factory=dict, repr=False, compare=False)
    #: The accuracy-recovering recipe (deploykit/quantize/recipes.py), "none" when there is none.
    recipe: str = "none"
    #: What the recipe's post-placement steps changed (bias deltas, AdaRound weights): re-applied
    #: by :func:`requantize` to every placement, skipping float layers.
    edits: Any = field(default=None, repr=False, compare=False)
    #: The FP32 graph the statistics belong to when the recipe rewrote it (SmoothQuant, CLE;
    #: same function as the source): :func:`requantize` places on this one.
    calibrated: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    recipe_summary: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: int16 pair-sum saturation of each dense Conv and weighted MatMul on the calibration data (CPUs without VNNI,
    #: deploykit/quantize/saturation.py): {"profile", "samples", "relative_error": {conv: error}};
    #: written into every placement of the same activation profile.
    saturation: Mapping[str, Any] = field(default_factory=dict, compare=False)


def quantize(fp32: onnx.ModelProto, calib: DataSource, method: str = "minmax", percentile: float = 99.99,
             batch_size: int = 8, source_hash: str = "", activations: str = rules.SYMMETRIC,
             keep_float: Sequence[str] = (), recipe: str | None = None) -> QuantizeResult:
    """Calibrate the normalised FP32 model on ``calib`` and return the canonical QDQ model.

    ``recipe``: accuracy-recovering steps (``bias_correction``, ``smoothquant:0.9``, ``cle``,
    ``adaround:300``, comma-separated; ``auto`` picks by network kind; None/"none": no recipe),
    see :mod:`deploykit.quantize.recipes`.

    ``activations``: the activation profile, ``symmetric`` (every backend lowers it, the default
    here) or ``asymmetric`` (``deploykit build`` picks it when all its targets support it: more
    accurate after ReLU, where half the symmetric range is never used). ``keep_float``:
    patterns (node name, op type or glob) of layers to keep float; one that matches nothing is
    a ConfigError. Histogram statistics are gathered only when ``method`` needs them.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    _check_profile(activations)
    from deploykit.quantize import recipes

    steps = recipes.parse_recipe(recipes.resolve_auto(recipe, fp32))
    float_layers = resolve_keep_float(fp32, keep_float) if keep_float else []
    batch_size = fixed_batch(input_specs(fp32)) or batch_size
    source = fp32
    fp32, summary = recipes.pre_calibration(fp32, [s for s in steps if s.name in recipes.PRE_STEPS], calib, batch_size)
    observer = Observer(fp32)
    with bar(calib.expected_samples(), "calibrate: ranges", "sample") as b:
        observer.observe_ranges(calib.batches(batch_size), b.update)
    if needs_histograms(method):
        with bar(observer.samples, f"calibrate: {method} histograms", "sample") as b:
            observer.observe_histograms(calib.batches(batch_size), b.update)
    observed = QuantizeResult(fp32, rules.CalibrationTable(), method, observer.samples, observer.data_hash(),
                              calib.is_random, percentile=percentile, source_hash=source_hash, stats=observer.stats,
                              recipe=recipes.format_recipe(steps), calibrated=None if fp32 is source else fp32,
                              recipe_summary=summary)
    placed = requantize(observed, fp32, activations=activations, float_layers=float_layers)
    post = [s for s in steps if s.name not in recipes.PRE_STEPS]
    if post:
        edits = recipes.post_placement(fp32, placed.model, post, calib, batch_size, placed.float_layers)
        placed = requantize(dataclasses.replace(placed, edits=edits, recipe_summary={**summary, **edits.summary}), fp32)
    return _with_saturation(placed, calib, batch_size)


def _with_saturation(result: QuantizeResult, calib: DataSource, batch_size: int) -> QuantizeResult:
    """``result`` with the int16 pair-sum saturation of its dense convolutions and weighted
    MatMuls measured on the first calibration samples and recorded in its model's metadata."""
    from deploykit.quantize import saturation

    record = saturation.measure_and_record(result.model, calib, batch_size, result.activations)
    if not record:
        return result
    errors = record["relative_error"]
    log.debug("int16 pair-sum saturation on %d calibration samples: %d of %d layers above 1%%", record["samples"],
              sum(e > 0.01 for e in errors.values()), len(errors))
    return dataclasses.replace(result, saturation=record)


def requantize(result: QuantizeResult, fp32: onnx.ModelProto, *, activations: str | None = None,
               method: str | None = None, percentile: float | None = None,
               float_layers: Iterable[str] | None = None) -> QuantizeResult:
    """Place Q/DQ again from ``result``'s observed statistics: no calibration pass.

    Anything not given is kept from ``result``. ``float_layers`` are exact node names (see
    :func:`deploykit.quantize.islands.resolve_keep_float` for patterns). A histogram method
    needs statistics gathered with one (``quantize(method=...)`` with percentile/entropy/mse).
    """
    if result.calibrated is not None:  # the recipe rewrote the graph the statistics were observed on
        fp32 = result.calibrated
    method = method or result.method
    activations = activations or result.activations
    percentile = result.percentile if percentile is None else percentile
    floats = tuple(result.float_layers if float_layers is None else float_layers)
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    _check_profile(activations)
    if not result.stats:
        raise ConfigError("requantize: this result carries no observed statistics (it was loaded, not calibrated)")
    if needs_histograms(method) and any(s.hist is None for s in result.stats.values()):
        raise ConfigError(f"requantize: method '{method}' needs histograms, and the statistics were gathered "
                          f"for '{result.method}'; calibrate with a histogram method first")
    nodes = {n.name for n in fp32.graph.node}
    unknown = [f for f in floats if f not in nodes]
    if unknown:
        raise ConfigError(f"float layers {unknown[:3]} are not nodes of the model")
    choose = METHODS[method]
    amax = {t: choose(s, percentile=percentile) for t, s in result.stats.items()}
    table = build_table(fp32, result.stats, amax, activations)
    qdq = insert_qdq(fp32, table, frozenset(floats))
    if result.edits:
        from deploykit.quantize.recipes import apply_edits

        qdq = apply_edits(qdq, result.edits, floats)
    meta = {
        rules.META_VERSION: __version__,
        rules.META_METHOD: method if method != "percentile" else f"percentile:{percentile}",
        rules.META_DATA_HASH: result.data_hash,
        rules.META_SOURCE_HASH: result.source_hash,
        rules.META_TABLE: table.to_json(),
        rules.META_RANDOM: json.dumps(result.random_data),
        rules.META_PROFILE: activations,
        rules.META_FLOAT_LAYERS: json.dumps(list(floats)),
        META_RECIPE: result.recipe,
    }
    for key, value in meta.items():
        rules.set_metadata(qdq, key, value)
    if result.saturation and result.saturation.get("profile") == activations:  # measured on this profile's grid
        from deploykit.quantize import saturation

        saturation.record(qdq, result.saturation["relative_error"], activations, int(result.saturation["samples"]))
    qdq.producer_name, qdq.producer_version = "deploykit", __version__
    violations = rules.lint(qdq)
    if violations:  # a bug in placement, never the user's fault: say so
        raise DeploykitError("internal error: the canonical model breaks its contract:\n" + rules.format_violations(violations))
    return QuantizeResult(qdq, table, method, result.samples, result.data_hash, result.random_data,
                          activations, floats, percentile, result.source_hash, result.stats, result.recipe,
                          result.edits, result.calibrated, result.recipe_summary, result.saturation)


def _check_profile(activations: str) -> None:
    if activations not in rules.PROFILES:
        raise ConfigError(f"unknown activation profile '{activations}'; use one of {', '.join(rules.PROFILES)}")


def write_canonical(result: QuantizeResult, fp32: onnx.ModelProto, out_dir: Path, stem: str = "canonical") -> CanonicalModel:
    """Write ``<stem>.qdq.onnx``, its ``.calib.json`` sidecar and the FP32 reference atomically."""
    out_dir = Path(out_dir)
    paths = {"qdq": out_dir / f"{stem}.qdq.onnx", "calib": out_dir / f"{stem}.calib.json",
             "fp32": out_dir / f"{stem}.fp32.onnx"}
    with atomic_output(paths["fp32"]) as tmp:
        onnx.save(fp32, str(tmp))
    with atomic_output(paths["calib"]) as tmp:
        result.table.save(tmp)
    with atomic_output(paths["qdq"]) as tmp:
        onnx.save(result.model, str(tmp))
    return CanonicalModel(paths["qdq"], result.model, result.table, paths["fp32"])


def load_canonical(path: Path | str) -> CanonicalModel:
    """Load a canonical model written by deploykit (the FP32 reference beside it if present)."""
    path = Path(path)
    model = onnx.load(str(path))
    table = rules.CalibrationTable.from_model(model)
    fp32 = path.with_name(path.name.replace(".qdq.onnx", ".fp32.onnx"))
    return CanonicalModel(path, model, table, fp32)
