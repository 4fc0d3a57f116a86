"""``deploykit compare RUN_A RUN_B``: per-cell changes between two stored runs, and the
regressions that are larger than the measured noise (exit 1 when any is flagged).

The noise model, fitted to reruns on a shared 2-core machine where the load average often
exceeds 10 (figures are compared in log space; a figure's error is the standard error of a
median over its rounds, 1.25 x 1.4826 x MAD / sqrt(rounds), robust to one stalled round):

- **speed-up first**: an INT8 cell's per-round speed-ups come from the same rounds as its FP32
  (a load burst hits both); flagged when its median fell by more than max(10%, 3 standard
  errors of the difference), widened by half the load factor.
- **absolute p50 only with a second witness**: flagged when it rose by more than max(25%,
  3 standard errors) beyond the whole run's median move (a run that got slower everywhere is
  the machine), by more than 0.05 ms, its rounds were not stalled (spread under 100%), and a
  witness from another time window agrees: its own speed-up fell, or most cells of the same
  target on other models, or of the same model on other targets, got slower too (a load burst
  hits one model x target group, whose cells are timed together).
- **load widens the bands**: by ``1 + 0.25 * (load per core - 1)`` (at most 3x) using the larger
  1-minute load average of the two cells.
- **accuracy**: top-1 agreement and task accuracy are counts over the evaluation samples: a
  drop is flagged when a one-sided two-proportion test gives p < 0.01.
- **status**: a cell that was ``ok`` and now errors is flagged.

A ``noise:`` line says what got worse inside the noise and which bands were widened, so a
reader can see what was ignored and why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploykit.matrix.cell import Cell

SPEEDUP_BAND = 0.10
P50_BAND = 0.25
P50_MIN_MS = 0.05
STALLED_SPREAD = 1.0
ALPHA = 0.01
Z = 3.0  # standard errors of the difference before a latency change counts


@dataclass
class Change:
    key: str
    a: Cell
    b: Cell
    p50_change: float | None = None  # relative
    speedup_change: float | None = None  # relative
    accuracy_change: float | None = None  # absolute
    agreement_change: float | None = None
    flags: list[str] = field(default_factory=list)
    within_noise: list[str] = field(default_factory=list)
    sp_a: tuple[float, float] | None = None  # (ln speed-up, its standard error)
    sp_b: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "p50_a_ms": self.a.p50_ms, "p50_b_ms": self.b.p50_ms, "p50_change": self.p50_change,
                "speedup_a": self.a.speedup, "speedup_b": self.b.speedup, "speedup_change": self.speedup_change,
                "accuracy_a": self.a.accuracy, "accuracy_b": self.b.accuracy, "accuracy_change": self.accuracy_change,
                "top1_agreement_a": self.a.top1_agreement, "top1_agreement_b": self.b.top1_agreement,
                "status_a": self.a.status, "status_b": self.b.status, "flags": self.flags,
                "within_noise": self.within_noise}


@dataclass
class Comparison:
    run_a: int
    run_b: int
    changes: list[Change]
    only_a: list[str]
    only_b: list[str]
    noise: str
    load_factor: float

    @property
    def flagged(self) -> list[Change]:
        return [c for c in self.changes if c.flags]

    def to_json(self) -> dict[str, Any]:
        return {"run_a": self.run_a, "run_b": self.run_b, "regressions": len(self.flagged),
                "changes": [c.to_json() for c in self.changes], "only_in_a": self.only_a, "only_in_b": self.only_b,
                "noise": self.noise, "load_factor": self.load_factor}


def load_factor(a: Cell, b: Cell) -> float:
    """How much the bands widen for the load the two cells were measured under."""
    worst = 0.0
    for c in (a, b):
        load, cores = c.env.get("load_average") or [0.0], c.env.get("cores") or 1
        worst = max(worst, float(load[0]) / max(int(cores), 1))
    return min(3.0, 1.0 + 0.25 * max(0.0, worst - 1.0))


def worse_proportion(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """One-sided p-value that B's success rate is below A's (two-proportion z test)."""
    if n_a <= 0 or n_b <= 0:
        return 1.0
    pa, pb = k_a / n_a, k_b / n_b
    pooled = (k_a + k_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0 if pb >= pa else 0.0
    z = (pa - pb) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def _rel(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old - 1.0


def compare_cells(cells_a: Sequence[Cell], cells_b: Sequence[Cell], run_a: int = 0, run_b: int = 0) -> Comparison:
    by_a = {c.key: c for c in cells_a}
    by_b = {c.key: c for c in cells_b}
    common = [k for k in by_a if k in by_b]
    changes = [Change(k, by_a[k], by_b[k]) for k in common]
    factors = []
    for ch in changes:
        a, b = ch.a, ch.b
        ch.p50_change = _rel(b.p50_ms, a.p50_ms)
        ch.speedup_change = _rel(b.speedup, a.speedup) if a.precision != "fp32" else None
        ch.sp_a, ch.sp_b = _speedup_stats(a, by_a), _speedup_stats(b, by_b)
        if a.accuracy is not None and b.accuracy is not None:
            ch.accuracy_change = b.accuracy - a.accuracy
        if a.top1_agreement is not None and b.top1_agreement is not None:
            ch.agreement_change = b.top1_agreement - a.top1_agreement
        factors.append(load_factor(a, b))
    # the whole run's drift: when most cells got slower together, that is the machine (load), not
    # a regression; each p50 is judged on how far it moved beyond the run-wide median move
    moves = [math.log(ch.b.p50_ms / ch.a.p50_ms) for ch in changes
             if ch.a.status == ch.b.status == "ok" and ch.a.p50_ms and ch.b.p50_ms]
    drift = max(0.0, statistics.median(moves)) if len(moves) >= 4 else 0.0
    # cells that got slower beyond the drift, for the "most cells of the target/model" witness
    slower = {ch.key for ch in changes if ch.p50_change is not None and ch.a.p50_ms and ch.b.p50_ms
              and math.log(ch.b.p50_ms / ch.a.p50_ms) - drift > math.log1p(SPEEDUP_BAND)}
    for ch, lf in zip(changes, factors):
        _judge(ch, lf, changes, slower, drift)
    noise = _noise_line(changes, factors, drift)
    return Comparison(run_a, run_b, changes, [k for k in by_a if k not in by_b], [k for k in by_b if k not in by_a],
                      noise, max(factors, default=1.0))


def _judge(ch: Change, lf: float, changes: Sequence[Change], slower: set[str], drift: float = 0.0) -> None:
    a, b = ch.a, ch.b
    if a.status == "ok" and b.status == "error":
        ch.flags.append(f"status: ok -> error ({b.error})")
        return
    if a.status != "ok" or b.status != "ok":
        return
    # accuracy and agreement: counts over the evaluation samples
    for name, va, vb in (("accuracy", a.accuracy, b.accuracy), ("top-1 agreement", a.top1_agreement, b.top1_agreement)):
        if va is None or vb is None or vb >= va:
            continue
        n_a, n_b = a.eval_samples or 0, b.eval_samples or 0
        p = worse_proportion(round(va * n_a), n_a, round(vb * n_b), n_b)
        if p < ALPHA:
            ch.flags.append(f"{name} {va * 100:.2f}% -> {vb * 100:.2f}% (p = {p:.1g})")
        else:
            ch.within_noise.append(f"{name} {(vb - va) * 100:+.2f} points (p = {p:.2g})")
    # the speed-up, measured in the same rounds: the main latency signal
    sp_fell = False
    if ch.speedup_change is not None and ch.speedup_change < 0 and ch.sp_a is not None and ch.sp_b is not None:
        (ca, sa), (cb, sb) = ch.sp_a, ch.sp_b
        drop = ca - cb  # log ratio
        band = max(math.log1p(SPEEDUP_BAND), Z * math.hypot(sa, sb)) * lf_speedup(lf)
        if drop > band:
            sp_fell = True
            ch.flags.append(f"speed-up {a.speedup:.2f}x -> {b.speedup:.2f}x ({math.expm1(-drop) * 100:.0f}%, "
                            f"band {-math.expm1(-band) * 100:.0f}%)")
        else:
            if drop > math.log1p(SPEEDUP_BAND / 2):
                sp_fell = True  # a witness for the absolute p50 even inside its own band
            ch.within_noise.append(f"speed-up {math.expm1(-drop) * 100:.0f}% (band {-math.expm1(-band) * 100:.0f}%)")
    # absolute p50: wide band, not stalled, second witness
    if ch.p50_change is not None and ch.p50_change > 0 and a.p50_ms is not None and b.p50_ms is not None:
        (ca, sa), (cb, sb) = _log_stats(a.round_ms, a.p50_ms, a.spread), _log_stats(b.round_ms, b.p50_ms, b.spread)
        band_log = max(math.log1p(P50_BAND), Z * math.hypot(sa, sb)) * lf
        band = math.expm1(band_log)
        rise = ch.p50_change
        if cb - ca - drift > band_log and b.p50_ms - a.p50_ms > P50_MIN_MS:
            stalled = (b.spread or 0.0) >= STALLED_SPREAD
            # witnesses from other time windows: a load burst hits one model x target group (its cells
            # are timed together); a runtime's regression shows on its other models, a model's on
            # its other targets
            same_target = [c for c in changes if c.a.target == a.target and c.a.model != a.model and c.a.status == "ok"]
            same_model = [c for c in changes if c.a.model == a.model and c.a.target != a.target and c.a.status == "ok"]

            def most(group: list[Change]) -> bool:
                return bool(group) and sum(c.key in slower for c in group) > len(group) / 2

            witness = "its speed-up fell" if sp_fell else ("most cells of this target slowed" if most(same_target) else
                                                           "most cells of this model slowed" if most(same_model) else "")
            if stalled:
                ch.within_noise.append(f"p50 +{rise * 100:.0f}% ignored: stalled rounds (spread {b.spread:.0%})")
            elif not witness:
                ch.within_noise.append(f"p50 +{rise * 100:.0f}% ignored: no second witness")
            else:
                ch.flags.append(f"p50 {a.p50_ms:.3f} -> {b.p50_ms:.3f} ms (+{rise * 100:.0f}%, band {band * 100:.0f}%; "
                                f"{witness})")
        elif rise > 0.05:
            ch.within_noise.append(f"p50 +{rise * 100:.0f}% (band {band * 100:.0f}%)")


def lf_speedup(lf: float) -> float:
    """The speed-up is measured in the same rounds as its FP32, so load widens its band less."""
    return 1.0 + (lf - 1.0) / 2


def _log_stats(rounds: Sequence[float], p50: float | None, spread: float | None) -> tuple[float, float]:
    """(median, standard error of the median) of ln(round figures): robust to one stalled round.

    The error is 1.25 x 1.4826 x MAD / sqrt(n) (a median's error for near-normal data); from
    the stored p50 and spread when the rounds are missing (a build's single measurement)."""
    vals = [math.log(x) for x in rounds if x and x > 0]
    if len(vals) >= 3:
        med = statistics.median(vals)
        mad = statistics.median(abs(v - med) for v in vals)
        return med, 1.25 * 1.4826 * mad / math.sqrt(len(vals))
    if p50 is None or p50 <= 0:
        return 0.0, 0.0
    return math.log(p50), math.log1p(spread or 0.0) / 2


def _speedup_stats(cell: Cell, by_key: Mapping[str, Cell]) -> tuple[float, float] | None:
    """ln(speed-up) per round from this cell's and its FP32 partner's round medians (same rounds)."""
    if cell.precision == "fp32" or cell.speedup is None or cell.speedup <= 0:
        return None
    partner = by_key.get(f"{cell.model}/{cell.target}/b{cell.batch_size}/fp32")
    if partner is not None and len(partner.round_ms) == len(cell.round_ms) >= 3:
        ratios = [f / q for f, q in zip(partner.round_ms, cell.round_ms) if f > 0 and q > 0]
        if len(ratios) >= 3:
            return _log_stats(ratios, None, None)
    return math.log(cell.speedup), math.log1p(cell.speedup_spread or 0.0) / 2


def _noise_line(changes: Sequence[Change], factors: Sequence[float], drift: float = 0.0) -> str:
    inside = [c for c in changes if c.within_noise and not c.flags]
    parts = []
    if inside:
        worst = sorted(inside, key=lambda c: -(c.p50_change or 0.0))[:3]
        parts.append(f"{len(inside)} cell(s) worse inside the noise, e.g. "
                     + "; ".join(f"{c.key}: {', '.join(c.within_noise)}" for c in worst))
    else:
        parts.append("nothing worse inside the noise")
    if drift > 0:
        parts.append(f"the whole run moved {math.expm1(drift) * 100:+.0f}% (median p50 change), read as machine load "
                     f"and taken off every cell's p50 change")
    lf = max(factors, default=1.0)
    if lf > 1.0:
        parts.append(f"bands widened up to {lf:.2f}x for the load average")
    return "noise: " + "; ".join(parts)


def render(cmp: Comparison) -> str:
    lines = [(f"compare run {cmp.run_a} -> run {cmp.run_b}: {len(cmp.changes)} cells in both, "
              f"{len(cmp.flagged)} regression(s) flagged")]
    w = max((len(c.key) for c in cmp.changes), default=10)
    lines.append(f"{'cell':<{w}}  {'p50 A ms':>9} {'p50 B ms':>9} {'change':>8} {'speed-up A->B':>15} "
                 f"{'accuracy A->B':>17}  flags")
    for c in cmp.changes:
        pct = "-" if c.p50_change is None else f"{c.p50_change * 100:+.0f}%"
        sp = "-" if c.a.speedup is None or c.b.speedup is None or c.a.precision == "fp32" else \
            f"{c.a.speedup:.2f}x->{c.b.speedup:.2f}x"
        acc = "-" if c.a.accuracy is None or c.b.accuracy is None else \
            f"{c.a.accuracy * 100:.2f}->{c.b.accuracy * 100:.2f}%"
        p50a = "-" if c.a.p50_ms is None else f"{c.a.p50_ms:.3f}"
        p50b = "-" if c.b.p50_ms is None else f"{c.b.p50_ms:.3f}"
        flag = ("REGRESSION: " + "; ".join(c.flags)) if c.flags else ""
        lines.append(f"{c.key:<{w}}  {p50a:>9} {p50b:>9} {pct:>8} {sp:>15} {acc:>17}  {flag}")
    if cmp.only_a:
        lines.append(f"only in run {cmp.run_a} (not compared): {', '.join(cmp.only_a)}")
    if cmp.only_b:
        lines.append(f"only in run {cmp.run_b} (new): {', '.join(cmp.only_b)}")
    lines.append(cmp.noise)
    return "\n".join(lines)


def cells_from_json(raw: Sequence[Mapping[str, Any]]) -> list[Cell]:
    return [Cell.from_json(c) for c in raw]
