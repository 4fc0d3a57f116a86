"""FP32 model -> the canonical QDQ model: observe ranges (streaming), pick thresholds by the
calibration method, place Q/DQ by the canonical rules, lint. See canonical.py for the rules."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

import deploykit
from deploykit.backend import CanonicalModel
from deploykit.data import DataSource
from deploykit.errors import ConfigError, DeploykitError
from deploykit.fileio import atomic_output
from deploykit.progress import bar
from deploykit.quantize import canonical as rules
from deploykit.quantize.observe import METHODS, Observer, needs_histograms
from deploykit.quantize.place import build_table, insert_qdq

log = logging.getLogger("deploykit")


@dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    table: rules.CalibrationTable
    method: str
    samples: int
    data_hash: str
    random_data: bool
    lint_violations: tuple[str, ...] = ()  # always empty: quantize() refuses a model that breaks the contract


def quantize(fp32: onnx.ModelProto, calib: DataSource, method: str = "entropy", percentile: float = 99.99,
             batch_size: int = 8, source_hash: str = "") -> QuantizeResult:
    """Calibrate the normalised FP32 model on ``calib`` and return the canonical QDQ model."""
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    from deploykit.model import fixed_batch, input_specs  # local: deploykit.model imports this package

    batch_size = fixed_batch(input_specs(fp32)) or batch_size
    observer = Observer(fp32)
    with bar(calib.expected_samples(), "calibrate: ranges", "sample") as b:
        observer.observe_ranges(calib.batches(batch_size), b.update)
    if needs_histograms(method):
        with bar(observer.samples, f"calibrate: {method} histograms", "sample") as b:
            observer.observe_histograms(calib.batches(batch_size), b.update)
    choose = METHODS[method]
    amax = {t: choose(s, percentile=percentile) for t, s in observer.stats.items()}
    table = build_table(fp32, observer.stats, amax)
    qdq = insert_qdq(fp32, table)
    meta = {
        rules.META_VERSION: deploykit.__version__,
        rules.META_METHOD: method if method != "percentile" else f"percentile:{percentile}",
        rules.META_DATA_HASH: observer.data_hash(),
        rules.META_SOURCE_HASH: source_hash,
        rules.META_TABLE: table.to_json(),
        rules.META_RANDOM: json.dumps(calib.is_random),
    }
    existing = {p.key for p in qdq.metadata_props}
    for key, value in meta.items():
        if key in existing:
            next(p for p in qdq.metadata_props if p.key == key).value = value
        else:
            qdq.metadata_props.add(key=key, value=value)
    qdq.producer_name, qdq.producer_version = "deploykit", deploykit.__version__
    violations = rules.lint(qdq)
    if violations:  # a bug in placement, never the user's fault: say so
        raise DeploykitError("internal error: the canonical model breaks its contract:\n" + rules.format_violations(violations))
    return QuantizeResult(qdq, table, method, observer.samples, observer.data_hash(), calib.is_random,
                          tuple(str(v) for v in violations))


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
