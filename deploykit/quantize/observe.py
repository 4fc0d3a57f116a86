"""Streaming range observation and the four calibration methods.

Memory stays flat in the number of samples: each batch's activations are reduced to a running
min/max (pass 1) and a fixed-range histogram of |x| (pass 2), then dropped. Both passes give
the same result whatever the batch size: min/max are exact, and pass 2's histogram range is
fixed by pass 1, so bin counts are exact integers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx

from deploykit.data import Batch
from deploykit.ortsession import exposing

HIST_BINS = 2048  # docs/toolchain-facts.md: onnxruntime's 128-bin entropy path collapses to minmax
QUANT_LEVELS = 128  # |x| maps onto 128 levels of symmetric int8 (0..127)


@dataclass
class TensorStats:
    min: float = np.inf
    max: float = -np.inf
    hist: np.ndarray | None = None
    nonfinite: bool = False  # saw inf/NaN (the attention mask's -inf): pass 2 must filter them out

    @property
    def absmax(self) -> float:
        if not np.isfinite(self.min) and not np.isfinite(self.max):
            return 0.0
        return float(max(abs(self.min), abs(self.max)))


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float32 activation tensor (graph inputs and node outputs) in topological order."""
    types: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(o for o in node.output if o)
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]


class Observer:
    """Runs the FP32 model in onnxruntime with every float tensor exposed as an output."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str] | None = None) -> None:
        self.tensors = tensors if tensors is not None else float_tensors(model)
        self.session = exposing(model, self.tensors)  # no fusion: every tensor of the normalised model exists
        self.stats = {name: TensorStats() for name in self.tensors}
        self.samples = 0
        self._hashers: dict[str, "hashlib._Hash"] = {}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.tensors, self.session.run(self.tensors, feeds)))

    def observe_ranges(self, batches: Iterable[Batch], progress: Callable[[int], None] | None = None) -> None:
        """Pass 1: exact running min/max of every tensor; also hashes the data."""
        for batch in batches:
            for k in sorted(batch.feeds):  # one hasher per input: batch size does not change the hash
                a = np.ascontiguousarray(batch.feeds[k])
                self._hashers.setdefault(k, hashlib.sha256(f"{k}:{a.dtype}:{a.shape[1:]}".encode())).update(a.tobytes())
            n = len(next(iter(batch.feeds.values())))
            for name, value in self._run(batch.feeds).items():
                if not value.size:
                    continue
                s = self.stats[name]
                lo, hi = float(value.min()), float(value.max())
                if not (np.isfinite(lo) and np.isfinite(hi)):  # rare: only then pay for a mask
                    s.nonfinite = True
                    finite = value[np.isfinite(value)]
                    if not finite.size:
                        continue
                    lo, hi = float(finite.min()), float(finite.max())
                s.min, s.max = min(s.min, lo), max(s.max, hi)
            self.samples += n
            if progress:
                progress(n)

    def observe_histograms(self, batches: Iterable[Batch], progress: Callable[[int], None] | None = None) -> None:
        """Pass 2: histogram of |x| over [0, absmax from pass 1] with HIST_BINS bins."""
        for batch in batches:
            for name, value in self._run(batch.feeds).items():
                s = self.stats[name]
                top = s.absmax
                if s.hist is None:
                    s.hist = np.zeros(HIST_BINS, np.int64)
                if top <= 0:
                    continue
                mag = np.abs(value, dtype=np.float32).ravel()
                if s.nonfinite:
                    mag = mag[np.isfinite(mag)]
                # bincount of bin indices: several times faster than np.histogram, same bins
                idx = np.minimum((mag * np.float32(HIST_BINS / top)).astype(np.int64), HIST_BINS - 1)
                s.hist += np.bincount(idx, minlength=HIST_BINS)
            if progress:
                progress(len(next(iter(batch.feeds.values()))))

    def data_hash(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self._hashers):
            h.update(self._hashers[k].digest())
        return h.hexdigest()


# --------------------------------------------------------------------------------------
# calibration methods: |x| threshold (amax) from the observed statistics
# --------------------------------------------------------------------------------------
def amax_minmax(stats: TensorStats, **_: object) -> float:
    return stats.absmax


def amax_percentile(stats: TensorStats, percentile: float = 99.99, **_: object) -> float:
    hist, top = stats.hist, stats.absmax
    if hist is None or top <= 0 or hist.sum() == 0:
        return top
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(min(idx + 1, HIST_BINS) * top / HIST_BINS)


def amax_entropy(stats: TensorStats, stride: int = 4, **_: object) -> float:
    """TensorRT-style KL-divergence threshold search over the 2048-bin |x| histogram.

    For each candidate threshold bin i: P = hist[:i] with the outliers folded into its last
    bin; Q = hist[:i] merged into 128 levels and spread back over its non-empty bins. The
    threshold with the smallest KL(P || Q) wins. As in NVIDIA's pytorch-quantization, the
    zero bin is flattened to its neighbour first: after a ReLU half the values are exactly 0,
    and that spike would otherwise drag the threshold far down.
    """
    hist, top = stats.hist, stats.absmax
    if hist is None or top <= 0 or hist.sum() == 0:
        return top
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    candidates = np.arange(QUANT_LEVELS, HIST_BINS + 1, stride)
    # Every candidate's KL at once from prefix sums (:func:`_kl_rows`), instead of ~15 numpy
    # calls over up to 2048 bins per candidate. Its sums run in another order than _kl's, so the candidates
    # within a hair of the smallest are scored again by _kl, in the original order with a strict
    # "<": the chosen threshold is exactly the one-candidate-at-a-time search's.
    approx = _kl_rows(hist, tail, candidates)
    finite = np.isfinite(approx)
    if not finite.any():
        return float(HIST_BINS * top / HIST_BINS)
    near = candidates[approx <= approx[finite].min() * (1 + 1e-6) + 1e-12]
    total = hist.sum()
    best_kl, best_i = np.inf, HIST_BINS
    for i in near:
        kl = _kl(*_p_q(hist, tail, int(i), total))
        if kl < best_kl:
            best_kl, best_i = kl, int(i)
    return float(best_i * top / HIST_BINS)


def _p_q(hist: np.ndarray, tail: np.ndarray, i: int, total: float) -> tuple[np.ndarray, np.ndarray]:
    """P (hist[:i], outliers folded into its last bin, over ``total``) and Q (hist[:i] merged
    into 128 levels, spread back over its non-empty bins) for threshold bin ``i``."""
    sliced = hist[:i]
    p = sliced.copy()
    p[-1] += tail[i]
    nonzero = sliced > 0
    level = np.minimum((np.arange(i) * QUANT_LEVELS) // i, QUANT_LEVELS - 1)
    level_sum = np.bincount(level, weights=sliced, minlength=QUANT_LEVELS)
    level_nz = np.bincount(level, weights=nonzero.astype(np.float64), minlength=QUANT_LEVELS)
    q = np.where(nonzero, level_sum[level] / np.maximum(level_nz[level], 1.0), 0.0)
    return p / total, q


def _kl_rows(hist: np.ndarray, tail: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """KL(P || Q) of :func:`_p_q` for every threshold bin in ``bins`` from prefix sums.

    Q is constant over the bins of one level, so the sum over bins is a sum over the 128 levels
    of (P's mass in the level) x log(Q's value there), plus P log P from a prefix sum: O(128)
    per candidate instead of O(bins). The last bin carries the folded outliers and is scored
    on its own. As :func:`_kl`: inf where Q misses P's mass."""
    total = hist.sum()
    nonzero = hist > 0
    zero = np.zeros(1)
    cum_h = np.concatenate([zero, np.cumsum(hist)])
    cum_n = np.concatenate([zero, np.cumsum(nonzero.astype(np.float64))])
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(nonzero, (hist / total) * np.log(np.where(nonzero, hist, 1.0) / total), 0.0)
    cum_plogp = np.concatenate([zero, np.cumsum(plogp)])
    i = bins[:, None].astype(np.int64)
    levels = np.arange(QUANT_LEVELS)[None, :]
    start = (levels * i + QUANT_LEVELS - 1) // QUANT_LEVELS
    end = np.minimum(((levels + 1) * i + QUANT_LEVELS - 1) // QUANT_LEVELS, i)
    level_sum = cum_h[end] - cum_h[start]  # Q's mass per level (all of hist[:i])
    level_nz = cum_n[end] - cum_n[start]
    last = bins - 1
    in_p = level_sum.copy()
    in_p[:, -1] -= hist[last]  # P's mass per level without the last bin (scored below)
    covered = cum_h[bins]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_value = level_sum / np.maximum(level_nz, 1.0) / covered[:, None]  # Q normalised, per bin
        cross = np.where(in_p > 0, (in_p / total) * np.log(np.where(in_p > 0, q_value, 1.0)), 0.0).sum(axis=1)
        p_last = (hist[last] + tail[bins]) / total
        q_last = q_value[:, -1]
        last_term = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0) / q_last), 0.0)
    kl: np.ndarray = cum_plogp[last] - cross + last_term
    kl[(covered == 0) | ((hist[last] == 0) & (tail[bins] > 0))] = np.inf
    return kl


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) after normalising both (as scipy.stats.entropy); inf where Q misses P's mass."""
    if q.sum() == 0 or p.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def amax_mse(stats: TensorStats, candidates: int = 256, **_: object) -> float:
    """Threshold minimising the expected squared quantization error over the histogram."""
    hist, top = stats.hist, stats.absmax
    if hist is None or top <= 0 or hist.sum() == 0:
        return top
    centres = (np.arange(HIST_BINS) + 0.5) * top / HIST_BINS
    thresholds = np.linspace(top / candidates, top, candidates)
    scales = thresholds / 127.0
    q = np.clip(np.round(centres[None, :] / scales[:, None]), -127, 127) * scales[:, None]
    err = ((centres[None, :] - q) ** 2 * hist[None, :]).sum(axis=1)
    return float(thresholds[int(np.argmin(err))])


METHODS: dict[str, Callable[..., float]] = {
    "minmax": amax_minmax,
    "percentile": amax_percentile,
    "entropy": amax_entropy,
    "mse": amax_mse,
}


def needs_histograms(method: str) -> bool:
    return method != "minmax"
