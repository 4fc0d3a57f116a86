"""On-target checks shared by every backend, driven through the Runner: latency, accuracy
against the FP32 reference (and labels), fidelity against the canonical model in onnxruntime."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from deploykit.results import CheckResult, LatencyStats

if TYPE_CHECKING:  # annotations only: importing deploykit.checks does not import onnx (~1.2 s of CPU)
    import onnx

    from deploykit.backend import Runner


def measure_latency(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int = 10, runs: int = 100) -> LatencyStats:
    """Warm up, then time ``runs`` calls of ``runner.run(feeds)`` one by one."""
    for _ in range(warmup):
        runner.run(feeds)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        runner.run(feeds)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    p50 = float(np.percentile(ms, 50))
    return LatencyStats(batch, runs, p50, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                        float(ms.mean()), batch / (p50 / 1e3) if p50 > 0 else 0.0)


# ---------------------------------------------------------------------------------------
# accuracy and fidelity
# ---------------------------------------------------------------------------------------
def run_all(runner: Runner, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run every batch, concatenating each output over the batches."""
    outs: list[list[np.ndarray]] = []
    for feeds in batches:
        result = runner.run(feeds)
        if not outs:
            outs = [[] for _ in result]
        for acc, value in zip(outs, result):
            acc.append(np.asarray(value))
    return [np.concatenate(o) if o and o[0].ndim else np.asarray(o) for o in outs]


def is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1


TASKS = ("auto", "classification", "other")

# what lies between a classifier's last linear layer and its output: shape ops, activations,
# pooling, and elementwise ops with a constant (a bias)
_HEAD_PASS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout", "Softmax", "LogSoftmax",
              "Sigmoid", "Relu", "Clip", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ReduceMean",
              "Add", "Sub", "Mul"}
_LINEAR = {"Gemm", "MatMul", "Conv", "ConvTranspose"}
_EMBEDDING_NAMES = ("embed", "feature", "pool", "hidden", "vector", "encod")
_SCORE_NAMES = ("logit", "prob", "score", "class", "pred")


def head_kind(model: onnx.ModelProto) -> str:
    """``"scores"`` or ``"embedding"`` for the model's first output, from its name and the graph.

    A name says it first (``*embed*``, ``*feature*``, ``*pool*``, ``*hidden*`` -> embedding;
    ``*logit*``, ``*prob*``, ``*score*``, ``*class*``, ``*pred*`` -> scores). Otherwise the graph: walking back
    from the output through shape ops, activations, pooling and elementwise ops with a constant
    operand, class scores reach a linear layer (Gemm, MatMul, Conv); an embedding reaches something
    else first (a mean pooling's division by the mask sum, a normalization, a LayerNormalization).
    """
    name = model.graph.output[0].name.lower()
    if any(k in name for k in _EMBEDDING_NAMES):
        return "embedding"
    if any(k in name for k in _SCORE_NAMES):
        return "scores"
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    tensor = model.graph.output[0].name
    for _ in range(len(model.graph.node)):
        node = producer.get(tensor)
        if node is None:  # a graph input
            return "embedding"
        if node.op_type in _LINEAR:
            return "scores"
        if node.op_type not in _HEAD_PASS:
            return "embedding"
        varying = [i for i in node.input if i and i not in constants]
        if node.op_type in ("Add", "Sub", "Mul") and len(varying) != 1:
            return "embedding"  # two computed operands: a residual, a gate, a mask product
        tensor = varying[0] if varying else node.input[0]
    return "embedding"


def classifies(task: str, output: np.ndarray, model: onnx.ModelProto | None = None) -> bool:
    """Whether the first output is class scores. ``auto``: its shape is [N, C] with C > 1 and, when
    the model is given, :func:`head_kind` says scores (a sentence embedding is [N, 384] too); say
    ``classification`` or ``other`` to decide it yourself."""
    if task == "classification":
        return True
    return task == "auto" and is_classifier(output) and (model is None or head_kind(model) == "scores")


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], prefix: str = "",
            classification: bool | None = None) -> dict[str, float]:
    """Cosine, relative L2 and max abs error over all outputs; top-1/top-5 agreement for a
    classifier's first output (top-5: the reference's top-1 is among the candidate's top 5).
    ``classification`` None: guess from the output's shape."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs, expected {len(reference)}")
    ref = np.concatenate([r.astype(np.float64).reshape(-1) for r in reference])
    cand = np.concatenate([c.astype(np.float64).reshape(-1) for c in candidate])
    if ref.shape != cand.shape:
        raise ValueError(f"outputs have {cand.size} values, expected {ref.size}")
    # numpy's own pairwise sums, not BLAS (``@``, ``linalg.norm``): a threaded BLAS adds in another
    # order with another thread count (a Ray worker runs it on one thread), and the same outputs
    # must give the same figures in any process
    ref_norm, cand_norm = float(np.sqrt(np.sum(ref * ref))), float(np.sqrt(np.sum(cand * cand)))
    denom = ref_norm * cand_norm
    metrics = {
        f"{prefix}cosine": float(np.sum(ref * cand)) / denom if denom > 0 else float(np.array_equal(ref, cand)),
        f"{prefix}rel_l2": float(np.sqrt(np.sum((ref - cand) ** 2))) / max(ref_norm, 1e-12),
        f"{prefix}max_abs" + ("" if prefix else "_error"): float(np.abs(ref - cand).max(initial=0.0)),
    }
    if classification is None:
        classification = is_classifier(reference[0])
    if not prefix and classification:
        r, c = reference[0], candidate[0]
        top1 = r.argmax(1)
        metrics["top1_agreement"] = float((c.argmax(1) == top1).mean())
        k = min(5, c.shape[1])
        topk = np.argsort(-c, axis=1)[:, :k]
        metrics["top5_agreement"] = float((topk == top1[:, None]).any(1).mean())
    return metrics


def task_accuracy(output: np.ndarray, labels: np.ndarray) -> float:
    return float((output.argmax(1) == labels.reshape(-1)).mean())


def judge(name: str, value: float | None, thresholds: Mapping[str, float], message: str = "",
          details: Mapping[str, Any] | None = None) -> CheckResult:
    """A CheckResult for ``value``, pass/fail when targets.toml has min_/max_<name> (both are
    judged when both are set). A NaN or infinite value never passes: it is a failure even
    without a threshold, since it means the target computed garbage."""
    lo, hi = thresholds.get(f"min_{name}"), thresholds.get(f"max_{name}")
    if value is None:
        return CheckResult(name, "not_run", None, message=message, details=details or {})
    if not math.isfinite(value):
        bound, kind = (lo, "min") if lo is not None else (hi, "max") if hi is not None else (None, None)
        return CheckResult(name, "fail", float(value), bound, kind,
                           f"{value} is not a finite number" + (f"; {message}" if message else ""), details or {})
    if lo is not None and value < lo:
        return CheckResult(name, "fail", value, lo, "min", message, details or {})
    if hi is not None and value > hi:
        return CheckResult(name, "fail", value, hi, "max", message, details or {})
    if lo is not None:
        return CheckResult(name, "pass", value, lo, "min", message, details or {})
    if hi is not None:
        return CheckResult(name, "pass", value, hi, "max", message, details or {})
    return CheckResult(name, "info", value, message=message, details=details or {})


def apply_thresholds(check: CheckResult, thresholds: Mapping[str, float]) -> CheckResult:
    """Judge a backend's own check (e.g. int8_fraction) against the target's thresholds;
    a backend's "fail" (scales do not match) stays a fail."""
    if check.status in ("fail", "not_run") or check.value is None:
        return check
    judged = judge(check.name, check.value, thresholds, check.message, check.details)
    if judged.status == "info" and check.status == "pass":
        return check
    return judged
