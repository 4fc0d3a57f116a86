"""Per-layer quantization sensitivity (``deploykit analyze``) and the float-layer search behind
``deploykit build --accuracy-target``.

Both start from ONE calibration: every variant (one layer float, one layer int8, a prefix of
the ranking float) is placed again from the observed statistics by ``requantize`` and the
recipe's edits are re-applied, so no variant calibrates again. Variants run on the canonical
semantics (onnxruntime, graph optimizations off: exact Q/DQ arithmetic) over the evaluation
data, streamed batch by batch, against FP32 outputs computed once.

Metrics, against FP32 on the first output: ``top1_agreement`` for classifiers, ``cosine``
(mean over samples) otherwise, and ``sqnr`` (dB, signal over quantization noise, over the whole
evaluation set). ``accuracy_drop`` needs labels: FP32 task accuracy minus the model's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploykit import ortsession
from deploykit.data import DataSource
from deploykit.errors import ConfigError

TARGET_METRICS = ("top1_agreement", "cosine", "accuracy_drop")


@dataclass(frozen=True)
class AccuracyTarget:
    metric: str  # top1_agreement | cosine | accuracy_drop
    value: float

    def met(self, measured: float) -> bool:
        return measured <= self.value if self.metric == "accuracy_drop" else measured >= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def parse_accuracy_target(text: str) -> AccuracyTarget:
    """``top1_agreement=0.95``, ``cosine=0.998``, ``accuracy_drop=0.01`` (fractions, not percent)."""
    name, sep, raw = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or name not in TARGET_METRICS:
        raise ConfigError(f"--accuracy-target '{text}': use top1_agreement=FRACTION, cosine=VALUE or "
                          "accuracy_drop=FRACTION (e.g. top1_agreement=0.95)")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--accuracy-target '{text}': '{raw.strip()}' is not a number") from None
    if not (0.0 <= value <= 1.0) and name != "cosine" or name == "cosine" and not -1.0 <= value <= 1.0:
        raise ConfigError(f"--accuracy-target '{text}': {name} is a fraction within [0, 1] (0.95, not 95)")
    return AccuracyTarget(name, value)


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalData:
    """Evaluation batches kept as the source yields them, FP32 outputs and labels computed once."""

    source: DataSource
    batch_size: int
    reference: np.ndarray  # FP32 first output, all samples
    labels: np.ndarray | None
    classification: bool

    @property
    def samples(self) -> int:
        return len(self.reference)

    def example(self) -> dict[str, np.ndarray]:
        """One real sample, batch of 1 (shapes for the layers' MACs)."""
        return dict(next(iter(self.source.batches(1))).feeds)

    def head(self, n: int) -> EvalData:
        """The first ``n`` samples (ranking layers needs fewer samples than judging the target)."""
        if n >= self.samples:
            return self
        source = copy.copy(self.source)
        source.limit = n if source.limit is None else min(source.limit, n)
        return EvalData(source, self.batch_size, self.reference[:n],
                        None if self.labels is None else self.labels[:n], self.classification)


def prepare_eval(fp32: onnx.ModelProto, source: DataSource, batch_size: int = 32, task: str = "auto") -> EvalData:
    sess = ortsession.session(fp32, exact=True)
    names = [i.name for i in sess.get_inputs()]
    outs, labels = [], []
    for batch in source.batches(batch_size):
        outs.append(sess.run(None, {k: batch.feeds[k] for k in names})[0])
        if batch.labels is not None:
            labels.append(batch.labels)
    ref = np.concatenate(outs)
    from deploykit.checks import classifies

    classification = classifies(task, ref, fp32)  # the build's rule, so analyze and build judge alike
    return EvalData(source, batch_size, ref, np.concatenate(labels) if labels else None, classification)


def run_model(model: onnx.ModelProto, data: EvalData, progress: Callable[[int], None] | None = None) -> np.ndarray:
    sess = ortsession.session(model, exact=True)
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for batch in data.source.batches(data.batch_size):
        outs.append(sess.run(None, {k: batch.feeds[k] for k in names})[0])
        if progress:
            progress(len(outs[-1]))
    return np.concatenate(outs)


def metrics(data: EvalData, got: np.ndarray) -> dict[str, float]:
    ref = data.reference.reshape(len(data.reference), -1).astype(np.float64)
    out = got.reshape(len(got), -1).astype(np.float64)
    noise = float(((ref - out) ** 2).sum())
    m = {
        "cosine": float(np.mean((ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30))),
        "sqnr": float(10 * math.log10(float((ref ** 2).sum()) / noise)) if noise > 0 else float("inf"),
    }
    if data.classification:
        m["top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
        if data.labels is not None:
            m["accuracy_drop"] = float(np.mean(ref.argmax(1) == data.labels) - np.mean(out.argmax(1) == data.labels))
    return m


def primary_metric(data: EvalData) -> str:
    return "top1_agreement" if data.classification else "cosine"


# --------------------------------------------------------------------------- variants


@dataclass
class Quantized:
    """One calibration and what re-places it: ``variant(float_layers)`` -> canonical model."""

    fp32: onnx.ModelProto  # the source FP32 model
    result: Any  # deploykit.quantize.QuantizeResult with observed statistics (and the recipe's edits)

    @property
    def graph(self) -> onnx.ModelProto:
        """The graph the statistics belong to (the recipe may have rewritten the source)."""
        return self.result.calibrated if self.result.calibrated is not None else self.fp32

    def variant(self, float_layers: Iterable[str]) -> onnx.ModelProto:
        """The canonical model with ``float_layers`` float, besides the layers the result already
        keeps float (declared with --keep-float)."""
        from deploykit.quantize import requantize

        floats = tuple(dict.fromkeys([*self.result.float_layers, *float_layers]))
        return requantize(self.result, self.fp32, float_layers=floats).model


def quantized_layers(q: Quantized) -> list[str]:
    """Compute nodes the all-int8 canonical model runs in int8, in graph order."""
    from deploykit.quantize import recipes

    base = q.variant(())
    return recipes.quantized_compute_nodes(base)


@dataclass
class LayerSensitivity:
    name: str
    op_type: str
    macs: int
    only_float: dict[str, float]  # metrics with this layer alone float, the rest int8
    only_int8: dict[str, float]  # metrics with this layer alone int8, the rest float

    def gain(self, metric: str, baseline: Mapping[str, float]) -> float:
        """How much keeping this layer float recovers (positive: better), for ``metric``."""
        sign = -1.0 if metric == "accuracy_drop" else 1.0
        return sign * (self.only_float[metric] - baseline[metric])


@dataclass
class Analysis:
    metric: str
    samples: int
    baseline: dict[str, float]  # every layer int8
    layers: list[LayerSensitivity] = field(default_factory=list)  # ranked, most sensitive first
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "samples": self.samples, "baseline": self.baseline, "seconds": self.seconds,
                "settings": self.settings, "layers": [asdict(x) for x in self.layers]}


def analyze(q: Quantized, data: EvalData, layers: Sequence[str] | None = None, both: bool = True) -> Analysis:
    """Sensitivity of every int8 layer: the metrics with it alone float, and with it alone int8."""
    from deploykit.progress import step
    from deploykit.quantize.islands import layer_macs

    start = time.perf_counter()
    names = list(layers) if layers is not None else quantized_layers(q)
    ops = {n.name: n.op_type for n in q.graph.graph.node}
    macs = layer_macs(q.graph, data.example())
    metric = primary_metric(data)
    runs = 1 + len(names) * (2 if both else 1)
    with step("analyze: per-layer variants", runs * data.samples, "sample") as bar:
        baseline = metrics(data, run_model(q.variant(()), data, bar.update))
        result = []
        for name in names:
            only_float = metrics(data, run_model(q.variant([name]), data, bar.update))
            only_int8 = (metrics(data, run_model(q.variant([n for n in names if n != name]), data, bar.update))
                         if both else {})
            result.append(LayerSensitivity(name, ops.get(name, "?"), int(macs.get(name, 0)), only_float, only_int8))
    result.sort(key=lambda s: (-s.gain(metric, baseline), -s.only_float["sqnr"]))
    return Analysis(metric, data.samples, baseline, result, time.perf_counter() - start)


# --------------------------------------------------------------------------- float-layer search


@dataclass
class SearchResult:
    target: AccuracyTarget
    met: bool
    float_layers: list[str]
    measured: float  # the target's metric for the chosen float layers
    metrics: dict[str, float]
    tried: list[dict[str, Any]]  # every prefix evaluated: size, metric
    int8_mac_share: float
    #: the prune-back trials after the prefix met the target: layer, its MACs, the metric with it
    #: int8 again, and whether it went back to int8
    pruned: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"target": str(self.target), "met": self.met, "float_layers": self.float_layers,
                "measured": self.measured, "metrics": self.metrics, "tried": self.tried,
                "int8_mac_share": self.int8_mac_share, "pruned": self.pruned}


RANK_SAMPLES = 128
#: prune-back: at most this many float layers tried back in int8, largest MACs first ...
PRUNE_TRIALS = 8
#: ... of those holding at least this share of the model's MACs (smaller ones gain little)
PRUNE_MIN_SHARE = 0.005

#: Runs a canonical model (a variant) the way one target would and returns its first output
#: over the evaluation data, in order: the search judges prefixes by what the artifacts compute.
Judge = Callable[[onnx.ModelProto], np.ndarray]


def search_float_layers(q: Quantized, data: EvalData, target: AccuracyTarget, analysis: Analysis | None = None,
                        rank_samples: int = RANK_SAMPLES, judges: Mapping[str, Judge] | None = None,
                        prune: int = PRUNE_TRIALS) -> SearchResult:
    """Fewest float layers meeting ``target``: layers ranked by sensitivity per MAC (the recovery
    keeping a layer float buys, divided by the compute it moves to float), prefixes of that
    ranking tried by doubling (1, 2, 4, ...) then bisected between the last miss and the first
    hit. Ships the best prefix found when none meets the target. The ranking runs on the first
    ``rank_samples`` evaluation samples (one pass per layer, canonical semantics); every prefix
    is judged on all of them.

    ``judges``: name -> how a target runs a variant (lowered by its backend, run by its runner).
    With judges a prefix meets the target only when it meets it on every judge (the worst one
    counts; a judge that raises is dropped with a message): the runtimes' integer kernels round, and on CPUs without VNNI saturate, on their
    own, so the canonical semantics alone can pass a prefix that the artifacts then fail.
    Without judges, prefixes are judged on the canonical semantics (onnxruntime, exact Q/DQ).

    Prune-back: the prefix found is the fewest layers of the ranking, not the fewest float MACs
    (the metric is not monotonic in the prefix, and the ranking comes from fewer samples). So
    once a prefix meets the target, its float layers are tried back in int8 one at a time,
    largest MACs first (up to ``prune`` of them, each holding at least PRUNE_MIN_SHARE of the
    MACs); a layer goes back to int8 when the target still holds, judged like the prefixes."""
    from deploykit.progress import echo
    from deploykit.quantize.islands import layer_macs

    if target.metric == "accuracy_drop" and data.labels is None:
        raise ConfigError("--accuracy-target accuracy_drop needs labels in the evaluation data "
                          "(an .npz 'labels' array or class sub-folders)")
    if target.metric == "top1_agreement" and not data.classification:
        raise ConfigError("--accuracy-target top1_agreement needs a classifier (use cosine= for other models, "
                          "or --task classification)")
    macs = layer_macs(q.graph, data.example())
    total = sum(macs.values()) or 1
    metric = target.metric
    cache: dict[int, dict[str, float]] = {}
    per_judge: dict[int, dict[str, float]] = {}  # prefix size -> judge -> the target's metric
    active = dict(judges or {})

    def judged(floats: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics on the worst judge, each judge's value of the target's metric) with ``floats`` float."""
        model = q.variant(floats)
        measured = {}
        for name, judge in list(active.items()):
            try:
                measured[name] = metrics(data, judge(model))
            except Exception as exc:  # noqa: BLE001 -- one target that cannot run a variant must not stop the search
                echo(f"accuracy target: {name} cannot judge the variants ({type(exc).__name__}: {exc}); "
                     "judging without it (its own check still judges the shipped model)")
                del active[name]
        if not measured:
            return metrics(data, run_model(model, data)), {}
        worse = max if metric == "accuracy_drop" else min
        return measured[worse(measured, key=lambda name: measured[name][metric])], \
            {name: m[metric] for name, m in measured.items()}

    def judged_prefix(k: int, names: Sequence[str]) -> dict[str, float]:
        worst, each = judged(names[:k])
        if each:
            per_judge[k] = each
        return worst

    if analysis is None:
        cache[0] = judged_prefix(0, [])
        if target.met(cache[0][metric]):
            return SearchResult(target, True, [], cache[0][metric], cache[0],
                                [{"float_layers": 0, metric: cache[0][metric], **_judges_of(per_judge, 0)}], 1.0)
        analysis = analyze(q, data.head(rank_samples), both=False)
    else:
        cache[0] = judged_prefix(0, []) if judges else analysis.baseline
    baseline = cache[0]
    rank_base = analysis.baseline

    # top-1 agreement moves in whole samples: on a small ranking set many layers tie at 0 gain,
    # so SQNR recovery breaks ties (and ranks the rest)
    def key(s: LayerSensitivity) -> tuple[float, float]:
        cost = max(s.macs, 1) / total
        return (s.gain(metric, rank_base) / cost, (s.only_float["sqnr"] - rank_base["sqnr"]) / cost)

    ranked = sorted(analysis.layers, key=key, reverse=True)
    names = [s.name for s in ranked]

    def evaluate(k: int) -> dict[str, float]:
        if k not in cache:
            cache[k] = judged_prefix(k, names)
            on = ", ".join(f"{j} {v:.4f}" for j, v in per_judge.get(k, {}).items())
            echo(f"accuracy target {target}: {k} float layer(s) -> {metric} {cache[k][metric]:.4f}"
                 + (f" (worst of: {on})" if on else ""))
        return cache[k]

    if target.met(baseline[metric]):
        hit: int | None = 0
    else:
        hit, lo, k = None, 0, 1
        while k <= len(names):
            if target.met(evaluate(k)[metric]):
                hit = k
                break
            lo, k = k, k * 2
        if hit is None and len(names) and target.met(evaluate(len(names))[metric]):
            hit = len(names)
        if hit is not None:
            hi = hit
            while hi - lo > 1:  # invariant: lo misses, hi meets
                mid = (lo + hi) // 2
                if target.met(evaluate(mid)[metric]):
                    hi = mid
                else:
                    lo = mid
            hit = hi
    if hit is None:  # best found: the prefix with the best metric
        better = min if metric == "accuracy_drop" else max
        best_k = better(cache, key=lambda k: cache[k][metric])
        chosen, met = best_k, False
    else:
        chosen, met = hit, True
    floats, chosen_metrics = names[:chosen], cache[chosen]
    tried = [{"float_layers": k, metric: cache[k][metric], **_judges_of(per_judge, k)} for k in sorted(cache)]
    pruned: list[dict[str, Any]] = []
    if met and prune > 0:
        candidates = [n for n in sorted(floats, key=lambda n: -macs.get(n, 0)) if macs.get(n, 0) >= PRUNE_MIN_SHARE * total]
        for name in candidates[:prune]:
            trial = [f for f in floats if f != name]
            got, each = judged(trial)
            back = target.met(got[metric])
            pruned.append({"layer": name, "macs": int(macs.get(name, 0)), metric: got[metric], "int8": back,
                           **({"judges": each} if each else {})})
            on = ", ".join(f"{j} {v:.4f}" for j, v in each.items())
            echo(f"accuracy target {target}: {name} ({macs.get(name, 0) / total:.1%} of MACs) back in int8 -> "
                 f"{metric} {got[metric]:.4f}{f' (worst of: {on})' if on else ''}: {'kept int8' if back else 'stays float'}")
            if back:
                floats, chosen_metrics = trial, got
    share = 1.0 - sum(macs.get(n, 0) for n in floats) / total
    return SearchResult(target, met, list(floats), chosen_metrics[metric], chosen_metrics, tried, share, pruned)


def _judges_of(per_judge: Mapping[int, Mapping[str, float]], k: int) -> dict[str, Any]:
    return {"judges": dict(per_judge[k])} if k in per_judge else {}


# --------------------------------------------------------------------------- output


def format_table(analysis: Analysis, limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    m = analysis.metric
    header = ["rank", "layer", "op", "MMACs", f"{m} (only float)", "SQNR dB (only float)", f"{m} (only int8)",
              "SQNR dB (only int8)"]
    rows = []
    for i, s in enumerate(analysis.layers[:limit] if limit else analysis.layers, 1):
        rows.append([str(i), s.name, s.op_type, f"{s.macs / 1e6:.1f}", _fmt(s.only_float.get(m)),
                     _fmt(s.only_float.get("sqnr"), 1), _fmt(s.only_int8.get(m)), _fmt(s.only_int8.get("sqnr"), 1)])
    return header, rows


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def write_outputs(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    """analysis.json, analysis.md and sensitivity.png/.svg in ``out_dir`` (atomic writes)."""
    import json

    from deploykit.fileio import atomic_output

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "analysis.json", "md": out_dir / "analysis.md"}
    with atomic_output(paths["json"]) as tmp:
        Path(tmp).write_text(json.dumps(analysis.to_json(), indent=2, default=_json_default))
    header, rows = format_table(analysis)
    m = analysis.metric
    base = analysis.baseline
    lines = [
        "# Per-layer quantization sensitivity", "",
        (f"{analysis.samples} evaluation samples; every layer int8: {m} {base[m]:.4f}, SQNR {base['sqnr']:.1f} dB "
         f"({analysis.seconds:.0f} s, one calibration)."),
        ("Ranked by what keeping the layer alone in float recovers. *only float*: that layer float, the others "
         "int8; *only int8*: that layer int8, the others float."), "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    plots = _plot(analysis, out_dir)
    if plots:
        lines += ["", f"![sensitivity]({plots['png'].name})"]
        paths.update(plots)
    with atomic_output(paths["md"]) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _plot(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    from deploykit.fileio import atomic_output

    m = analysis.metric
    layers = analysis.layers
    x = np.arange(len(layers))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(layers) + 2), 7), sharex=True)
    ax1.bar(x, [s.only_float.get(m, np.nan) for s in layers], color="#4c72b0", label=f"{m}, only this layer float")
    ax1.axhline(analysis.baseline[m], color="k", lw=1, ls="--", label="every layer int8")
    if any(s.only_int8 for s in layers):
        ax1.plot(x, [s.only_int8.get(m, np.nan) for s in layers], "o", ms=3, color="#dd8452",
                 label=f"{m}, only this layer int8")
    lo = min([analysis.baseline[m]] + [s.only_float.get(m, 1.0) for s in layers] +
             [s.only_int8.get(m, 1.0) for s in layers if s.only_int8])
    ax1.set_ylim(max(lo - 0.02 * abs(lo), -1.0), 1.0 + 0.002)
    ax1.set_ylabel(m)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.bar(x, [s.only_int8.get("sqnr", np.nan) if s.only_int8 else np.nan for s in layers], color="#dd8452")
    ax2.set_ylabel("SQNR dB, only this layer int8")
    ax2.set_xticks(x, [s.name for s in layers], rotation=90, fontsize=6)
    fig.suptitle(f"Per-layer sensitivity ({analysis.samples} samples), most sensitive first")
    fig.tight_layout()
    paths = {"png": out_dir / "sensitivity.png", "svg": out_dir / "sensitivity.svg"}
    for kind, path in paths.items():
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=kind, dpi=110)
    plt.close(fig)
    return paths
