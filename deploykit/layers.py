"""Layer-by-layer fidelity: where does a backend's artifact depart from the canonical model?

Comparing final outputs cannot tell a wrong scale in layer 3 from one-step rounding differences
compounded over 49 layers. So the model is **cut at every quantized tensor** (every activation
QuantizeLinear output of the canonical model): each one becomes both an output (what this layer
computed) and an input (what the next layer reads). The canonical model run in onnxruntime
without optimisations (float-simulated QDQ, the definition of the canonical result) gives the
reference integers; the backend's :class:`LayerRunner` then computes every layer **from the
canonical model's own inputs to that layer**, so errors do not compound, and each layer's
integers are compared with the reference in int8 steps.

Values cross this interface as ``q - zero_point`` (int32), whatever the artifact stores
(onnxruntime's uint8 activations, a backend's own zero points): steps mean the same for all.

Per layer: the fraction of values within one int8 step, the exact fraction, the largest
difference in steps, the gain (the median ratio of the backend's values to the reference's, over
values well above rounding; a least-squares slope when there are too few)
and a verdict:

- ``exact``: every value equal;
- ``rounding``: the runtime's integer rounding, at least ``ROUNDING_FRACTION`` of the values
  within one step and no scale error;
- ``wrong_scale``: the lowering's: the layer's values are scaled (|gain - 1| > ``GAIN_TOLERANCE``);
- ``beyond_rounding``: scale right, but more values more than one step off than rounding explains
  (a kernel that saturates, a wrong op, a wrong zero point).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import onnx

from deploykit.canonical import QdqGraph
from deploykit.ortsession import session_options

if TYPE_CHECKING:  # pragma: no cover
    from deploykit.results import CheckResult

VERDICTS = ("exact", "rounding", "wrong_scale", "beyond_rounding")
#: At least this fraction within one step is what integer rounding does (the default threshold too).
ROUNDING_FRACTION = 0.99
#: A gain further than this from 1 is a scale error, not rounding (a 2% scale error moves a
#: value of 50 steps by one step; rounding moves values in both directions and keeps the gain).
GAIN_TOLERANCE = 0.02
#: Layers whose reference is this small (steps) carry no scale information.
MIN_SIGNAL_STEPS = 4.0
OUTPUT_PREFIX = "deploykit_layer_out/"
WORST_LISTED = 10


@dataclass(frozen=True)
class CutTensor:
    """One quantized tensor of the canonical model: where the model is cut."""

    name: str  # the QuantizeLinear output (int8)
    quantize_node: str
    layer: str  # the op that computes it (the first non Q/DQ producer upstream), for people
    scale: float
    zero_point: int
    dtype: str  # "int8" / "uint8" in the canonical model


@dataclass(frozen=True)
class Cut:
    """Every quantized activation tensor of a canonical model, in graph order."""

    tensors: tuple[CutTensor, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)


def find_cut(model: onnx.ModelProto) -> Cut:
    """The tensors to cut at: outputs of per-tensor activation QuantizeLinear nodes."""
    g = QdqGraph(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    out = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in graph_outputs:
            continue
        p = g.params(node)
        if p.axis is not None and p.scale.size > 1:
            continue
        layer, seen = node.input[0], 0
        src = producers.get(layer)
        while src is not None and src.op_type in ("QuantizeLinear", "DequantizeLinear") and seen < 8:
            layer, src, seen = src.input[0], producers.get(src.input[0]), seen + 1
        label = src.name if src is not None else f"input {layer}"
        out.append(CutTensor(node.output[0], node.name, label, float(p.scale.reshape(-1)[0]),
                             int(p.zero_point.reshape(-1)[0]), str(p.zero_point.dtype)))
    return Cut(tuple(out))


def cut_model(model: onnx.ModelProto, tensors: Iterable[str], types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` cut at ``tensors``: each one's producer writes the graph output
    ``OUTPUT_PREFIX + name``, and its consumers read a new graph input of the same name.

    ``types`` gives each tensor's element type (default: the type of its QuantizeLinear's zero
    point; int8 when the producer is another op)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    tensors = list(tensors)  # iterated twice
    wanted = set(tensors)
    elem = dict(types or {})
    for node in cut.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in wanted and node.output[0] not in elem:
            elem[node.output[0]] = _zero_point_type(cut, node)
    found = set()
    for node in cut.graph.node:
        for i, name in enumerate(node.output):
            if name in wanted:
                node.output[i] = OUTPUT_PREFIX + name
                found.add(name)
    missing = wanted - found
    if missing:
        raise ValueError(f"{len(missing)} tensors to cut at are produced by no node, e.g. {sorted(missing)[0]!r}")
    shapes = tensor_shapes(model)
    keep_info = [v for v in cut.graph.value_info if v.name not in wanted]
    del cut.graph.value_info[:]
    cut.graph.value_info.extend(keep_info)
    for name in [t for t in tensors if t in found]:
        kind = elem.get(name, onnx.TensorProto.INT8)
        shape = shapes.get(name)  # some runtimes (OpenVINO) want the rank of every graph input
        cut.graph.input.append(onnx.helper.make_tensor_value_info(name, kind, shape))
        cut.graph.output.append(onnx.helper.make_tensor_value_info(OUTPUT_PREFIX + name, kind, shape))
    return cut


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Every tensor's shape by ONNX shape inference (a dim is an int, a symbol or None); empty
    when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are a courtesy to the runtimes; the cut works without them
        return {}
    out: dict[str, list[int | str | None]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def _zero_point_type(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    if len(node.input) > 2 and node.input[2]:
        for init in model.graph.initializer:
            if init.name == node.input[2]:
                return int(init.data_type)
        for other in model.graph.node:
            if other.op_type == "Constant" and other.output[0] == node.input[2]:
                return int(other.attribute[0].t.data_type)
    return onnx.TensorProto.UINT8 if len(node.input) < 3 else onnx.TensorProto.INT8


def reference(model: onnx.ModelProto, cut: Cut, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The canonical model's own integers (``q - zero_point``, int32) at every cut tensor, per batch:
    the model run whole in onnxruntime without optimisations (float-simulated QDQ)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t.name) for t in cut.tensors
                                if t.name not in have)
    run = onnxruntime_runner(exposed)
    inits = {i.name for i in exposed.graph.initializer}
    inputs = {i.name for i in exposed.graph.input if i.name not in inits}
    out = []
    for feeds in batches:
        values = run({k: v for k, v in feeds.items() if k in inputs})
        out.append({t.name: values[t.name].astype(np.int32) - t.zero_point for t in cut.tensors})
    return out


class LayerRunner(Protocol):
    """What a backend with ``Capability.LAYER_RUNNER`` returns from ``layer_runner()``.

    ``run(feeds)`` takes the model's inputs plus, for every cut tensor, the canonical model's
    value (``q - zero_point``, int32), and returns, for every cut tensor, the value the artifact
    computes for it from those inputs (``q - zero_point``, int32)."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]: ...

    def close(self) -> None: ...


#: Runs one ONNX model: feeds by input name -> outputs by name (an onnxruntime session, an
#: OpenVINO compiled model, ...).
ModelRunner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class OnnxLayerRunner:
    """A LayerRunner for a backend that runs ONNX, or lowers it: the ``artifact`` (or the
    canonical model, for a backend that lowers it) cut at the same tensors, run by
    ``make_runner(cut_model) -> ModelRunner`` the way the backend runs its artifacts.
    The artifact's Q/DQ nodes must keep the canonical tensor names."""

    def __init__(self, artifact: onnx.ModelProto, cut: Cut, make_runner: Callable[[onnx.ModelProto], ModelRunner]) -> None:
        self.zero_points, types = _artifact_zero_points(artifact, cut)
        self.names = [t.name for t in cut.tensors if t.name in self.zero_points]
        model = cut_model(artifact, self.names, types)
        inits = {i.name for i in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in inits]
        self.dtypes = {name: onnx.helper.tensor_dtype_to_np_dtype(types[name]) for name in self.names}
        self.runner: ModelRunner | None = make_runner(model)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.runner is None:
            raise RuntimeError("layer runner is closed")
        given = {}
        for name in self.inputs:
            value = feeds[name]
            if name in self.zero_points:
                value = (np.asarray(value, np.int32) + self.zero_points[name]).astype(self.dtypes[name])
            given[name] = value
        values = self.runner(given)
        return {n: np.asarray(values[OUTPUT_PREFIX + n]).astype(np.int32) - self.zero_points[n] for n in self.names}

    def close(self) -> None:
        self.runner = None


def onnxruntime_runner(model: onnx.ModelProto, options: Any = None, providers: Sequence[str] = ("CPUExecutionProvider",)
                       ) -> ModelRunner:
    """A ModelRunner on an onnxruntime session (``options``: SessionOptions; default no optimisation)."""
    import onnxruntime as ort

    if options is None:
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, dict(feeds))))


def _artifact_zero_points(artifact: onnx.ModelProto, cut: Cut) -> tuple[dict[str, int], dict[str, int]]:
    """Each cut tensor's zero point and element type as the artifact stores it, read from the
    DequantizeLinear nodes that consume it (the producer may be an integer op, e.g. a Clip)."""
    g = QdqGraph(artifact)
    zero_points, types = {}, {}
    for t in cut.tensors:
        readers = [n for n in g.consumers.get(t.name, []) if n.op_type == "DequantizeLinear"]
        producer = next((n for n in artifact.graph.node if t.name in n.output), None)
        node = readers[0] if readers else producer if producer is not None and producer.op_type == "QuantizeLinear" else None
        if node is None:
            continue
        p = g.params(node)
        zero_points[t.name] = int(p.zero_point.reshape(-1)[0])
        types[t.name] = int(onnx.helper.np_dtype_to_tensor_dtype(p.zero_point.dtype))
    return zero_points, types


@dataclass
class LayerResult:
    tensor: str
    layer: str
    values: int
    within_one_step: float
    exact: float
    max_steps: int
    gain: float
    verdict: str
    scale: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def judge_layer(tensor: CutTensor, got: np.ndarray, want: np.ndarray) -> LayerResult:
    """Compare one layer's integers (``q - zero_point``) with the reference's."""
    got = np.asarray(got, np.int64).reshape(-1)
    want = np.asarray(want, np.int64).reshape(-1)
    if got.shape != want.shape:
        return LayerResult(tensor.name, tensor.layer, int(want.size), 0.0, 0.0, -1, 0.0, "beyond_rounding",
                           tensor.scale)
    steps = np.abs(got - want)
    n = max(int(want.size), 1)
    within = float(np.count_nonzero(steps <= 1) / n)
    exact = float(np.count_nonzero(steps == 0) / n)
    max_steps = int(steps.max(initial=0))
    energy = float(want.astype(np.float64) @ want)
    large = np.abs(want) >= 2 * MIN_SIGNAL_STEPS
    if np.count_nonzero(large) >= 16:
        # the median ratio over values well above rounding: a scale error moves nearly all of them,
        # a kernel that saturates a few large values (or rounding) leaves it at 1
        gain = float(np.median(got[large] / want[large]))
    else:
        gain = float(got.astype(np.float64) @ want / energy) if energy > 0 else 1.0
    signal = math.sqrt(energy / n) >= MIN_SIGNAL_STEPS
    if max_steps == 0:
        verdict = "exact"
    elif signal and abs(gain - 1.0) > GAIN_TOLERANCE and max_steps > 1:
        verdict = "wrong_scale"
    elif within >= ROUNDING_FRACTION:
        verdict = "rounding"
    else:
        verdict = "beyond_rounding"
    return LayerResult(tensor.name, tensor.layer, int(want.size), within, exact, max_steps, gain, verdict, tensor.scale)


@dataclass
class LayerReport:
    """Every layer of one artifact against the canonical model."""

    target: str
    layers: list[LayerResult]
    samples: int
    not_compared: list[str] = field(default_factory=list)  # cut tensors the artifact does not expose
    note: str = ""

    @property
    def worst(self) -> LayerResult | None:
        return min(self.layers, key=lambda r: (r.within_one_step, -r.max_steps), default=None)

    @property
    def min_within_one_step(self) -> float | None:
        return None if not self.layers else min(r.within_one_step for r in self.layers)

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.layers) for v in VERDICTS}

    def flagged(self) -> list[LayerResult]:
        return [r for r in self.layers if r.verdict in ("wrong_scale", "beyond_rounding")]

    def ranked(self) -> list[LayerResult]:
        return sorted(self.layers, key=lambda r: (r.within_one_step, -r.max_steps))

    def summary(self) -> str:
        worst = self.worst
        if worst is None:
            return f"{self.target}: no layer compared" + (f" ({self.note})" if self.note else "")
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items() if v)
        return (f"{self.target}: {len(self.layers)} layers ({counts}); worst '{worst.layer}' ({worst.tensor}) "
                f"{worst.within_one_step:.2%} within one step, max {worst.max_steps} steps, gain {worst.gain:.3f}, "
                f"{worst.verdict}")

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {"target": self.target, "samples": self.samples, "layers": [r.to_json() for r in self.layers],
                "counts": self.counts(), "min_within_one_step": self.min_within_one_step,
                "worst": None if worst is None else worst.to_json(), "not_compared": self.not_compared,
                "note": self.note}


def compare_layers(target: str, canonical: onnx.ModelProto, runner: LayerRunner,
                   batches: Sequence[Mapping[str, np.ndarray]], cut: Cut | None = None,
                   references: Sequence[Mapping[str, np.ndarray]] | None = None) -> LayerReport:
    """Run ``runner`` on every batch with the canonical inputs at every cut and compare each layer."""
    cut = cut or find_cut(canonical)
    references = references if references is not None else reference(canonical, cut, batches)
    got: dict[str, list[np.ndarray]] = {t.name: [] for t in cut.tensors}
    want: dict[str, list[np.ndarray]] = {t.name: [] for t in cut.tensors}
    for feeds, ref in zip(batches, references):
        values = runner.run({**feeds, **ref})
        for t in cut.tensors:
            if t.name in values:
                got[t.name].append(np.asarray(values[t.name]).reshape(-1))
                want[t.name].append(np.asarray(ref[t.name]).reshape(-1))
    layers, missing = [], []
    for t in cut.tensors:
        if not got[t.name]:
            missing.append(t.name)
            continue
        layers.append(judge_layer(t, np.concatenate(got[t.name]), np.concatenate(want[t.name])))
    samples = sum(int(next(iter(b.values())).shape[0]) for b in batches) if batches else 0
    return LayerReport(target, layers, samples, missing)


# ---------------------------------------------------------------------------------------
# presentation: table, markdown, plot
# ---------------------------------------------------------------------------------------
def table(report: LayerReport, limit: int | None = None, worst_first: bool = False) -> str:
    rows = report.ranked() if worst_first else report.layers
    rows = rows[:limit] if limit else rows
    width = max([len(r.layer) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'within 1 step':>13}  {'exact':>8}  {'max':>4}  {'gain':>6}  verdict"]
    for r in rows:
        lines.append(f"{r.layer:<{width}}  {r.within_one_step:>13.2%}  {r.exact:>8.2%}  {r.max_steps:>4d}  "
                     f"{r.gain:>6.3f}  {r.verdict}")
    return "\n".join(lines)


def markdown(report: LayerReport, limit: int = WORST_LISTED) -> str:
    """The worst layers as a markdown table, for report.md."""
    if not report.layers:
        return f"*{report.target}: no per-layer comparison{': ' + report.note if report.note else ''}*\n"
    lines = [f"{report.summary()}", "",
             "| layer | tensor | within one step | exact | max steps | gain | verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report.ranked()[:limit]:
        lines.append(f"| `{r.layer}` | `{r.tensor}` | {r.within_one_step:.2%} | {r.exact:.2%} | {r.max_steps} | "
                     f"{r.gain:.3f} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def plot(reports: Sequence[LayerReport], path: Path) -> Path:
    """Within-one-step fraction per layer (graph order), one line per target, the threshold drawn."""
    try:
        import matplotlib
    except ImportError:
        from deploykit.errors import ConfigError

        raise ConfigError("the per-layer plot needs matplotlib: pip install 'deploykit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for report in reports:
        if report.layers:
            ax.plot(range(len(report.layers)), [100 * r.within_one_step for r in report.layers], marker=".",
                    label=report.target)
            worst = report.worst
            if worst is not None:
                i = report.layers.index(worst)
                ax.annotate(worst.layer[-28:], (i, 100 * worst.within_one_step), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
    ax.axhline(100 * ROUNDING_FRACTION, color="grey", linestyle="--", linewidth=1, label="threshold (99%)")
    ax.set_xlabel("quantized tensor (graph order)")
    ax.set_ylabel("% of values within one int8 step")
    ax.set_title("Per-layer fidelity to the canonical model (each layer fed the canonical inputs)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(reports: Sequence[LayerReport], path: Path) -> None:
    """Written atomically; every number is finite (a shape mismatch is max_steps -1, gain 0)."""
    from deploykit.fileio import atomic_output

    text = json.dumps({"layers": [r.to_json() for r in reports]}, indent=2, allow_nan=False)
    with atomic_output(Path(path)) as tmp:
        Path(tmp).write_text(text)


# ---------------------------------------------------------------------------------------
# the build's check and the compare-layers command
# ---------------------------------------------------------------------------------------
CHECK = "layer_within_one_step"
#: Samples the build's per-layer check runs (every layer of every sample is compared).
CHECK_SAMPLES = 32


def layer_report(backend: Any, artifact: Any, canonical: Any, target: Any,
                 batches: Sequence[Mapping[str, np.ndarray]], samples: int = CHECK_SAMPLES) -> LayerReport:
    """Compare every layer of ``artifact`` with the canonical model on the first ``samples`` inputs.
    Raises BackendUnavailable (with the reason) when the backend cannot run layers here."""
    from deploykit.backend import Capability
    from deploykit.errors import BackendUnavailable

    if Capability.LAYER_RUNNER not in backend.capabilities:
        raise BackendUnavailable(f"backend '{backend.name}' has no per-layer runner")
    chosen = _first_samples(batches, samples)
    cut = find_cut(canonical.model)
    runner = backend.layer_runner(artifact, canonical, target, cut)
    try:
        return compare_layers(target.name, canonical.model, runner, chosen, cut)
    finally:
        runner.close()


def _first_samples(batches: Sequence[Mapping[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    out, have = [], 0
    for feeds in batches:
        if have >= samples:
            break
        n = int(next(iter(feeds.values())).shape[0])
        take = min(n, samples - have)
        out.append({k: np.asarray(v)[:take] for k, v in feeds.items()})
        have += take
    return out


def layer_check(backend: Any, artifact: Any, canonical: Any, target: Any,
                batches: Sequence[Mapping[str, np.ndarray]], samples: int = CHECK_SAMPLES
                ) -> tuple["CheckResult", LayerReport | None]:
    """The build's ``layer_within_one_step`` check: the worst layer's fraction of values within
    one int8 step, judged by ``min_layer_within_one_step``; details name the worst layers."""
    from deploykit.checks import judge
    from deploykit.errors import BackendUnavailable

    try:
        report = layer_report(backend, artifact, canonical, target, batches, samples)
    except BackendUnavailable as exc:
        return judge(CHECK, None, target.thresholds, f"not run: {exc}"), None
    worst = report.worst
    if worst is None:
        return judge(CHECK, None, target.thresholds, "not run: no quantized tensor to compare"), report
    flagged = report.flagged()
    message = (f"worst layer '{worst.layer}' {worst.within_one_step:.2%} within one int8 step ({worst.verdict}); "
               + (f"{len(flagged)} of {len(report.layers)} layers beyond rounding or with a wrong scale"
                  if flagged else f"all {len(report.layers)} layers exact or rounding"))
    details = {"counts": report.counts(), "samples": report.samples, "not_compared": report.not_compared,
               "worst": [r.to_json() for r in report.ranked()[:WORST_LISTED]], "layers": len(report.layers)}
    return judge(CHECK, worst.within_one_step, target.thresholds, message, details), report


def compare_out_dir(out_dir: Path, eval_src: str | None = None, samples: int = CHECK_SAMPLES,
                    names: Sequence[str] | None = None, registry: Any = None) -> list[LayerReport]:
    """Every target of a build folder (its manifest.json) compared layer by layer; a target whose
    backend cannot run layers here gets an empty report saying why."""
    from deploykit import data, model as modelmod
    from deploykit.backend import Artifact, CanonicalModel
    from deploykit.canonical import CalibrationTable
    from deploykit.errors import BackendUnavailable, ConfigError
    from deploykit.plugins import load_registry
    from deploykit.targets import Device, Target

    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{out_dir}: no manifest.json; give the folder a 'deploykit build -o' wrote")
    manifest = json.loads(manifest_path.read_text())
    can = manifest["canonical"]
    path = out_dir / can["path"]
    model = onnx.load(str(path))
    canonical = CanonicalModel(path, model, CalibrationTable.from_model(model), out_dir / can["fp32_path"])
    src_text = eval_src or manifest.get("evaluation", {}).get("data", "")
    if not src_text or not (Path(src_text).exists() or ":" in src_text):
        raise ConfigError(f"{out_dir}: the build's evaluation data ({src_text or 'none'}) is not available here; "
                          "pass --eval with the inputs to compare on")
    source = data.open_source(src_text, modelmod.input_specs(model), limit=samples)
    if source is None:
        raise ConfigError("--eval: no evaluation data")
    batches = [b.feeds for b in source.batches(8)]
    registry = registry or load_registry()
    reports = []
    for t in manifest["targets"]:
        if names and t["name"] not in names:
            continue
        if not t.get("artifact"):
            reports.append(LayerReport(t["name"], [], 0, note=f"no artifact ({t['status']}: {t['reason']})"))
            continue
        device = Device(t["device"]["name"], t["device"].get("kind", "cpu"), "", t["device"].get("address", ""))
        target = Target(t["name"], t["backend"], device, t.get("options", {}), t.get("thresholds", {}),
                        tuple(t.get("batch_sizes", (1,))))
        art = t["artifact"]
        artifact = Artifact(t["backend"], out_dir / art["path"], tuple(out_dir / f for f in art.get("files", {})),
                            art.get("metadata", {}))
        try:
            backend = registry.get(t["backend"])
            reports.append(layer_report(backend, artifact, canonical, target, batches, samples))
        except BackendUnavailable as exc:
            reports.append(LayerReport(t["name"], [], 0, note=f"not run: {exc}"))
    if names and not reports:
        raise ConfigError(f"{manifest_path}: no target named {', '.join(names)}")
    return reports
