"""``deploykit compare RUN_A RUN_B``: per-cell changes between two stored runs, and the
regressions that are larger than the measured noise (exit 1 when any is flagged).

The decision is a statistical test per cell, corrected for the number of cells, and a change
must also be large enough to matter. Figures are compared in log space (a ratio), and a cell's
figure is the median of its interleaved rounds (deploykit.timing).

Noise has two layers, and a test that knows only the first raises false alarms:

- **within a run**: round-to-round scatter. Its standard error comes from the rounds
  themselves: 1.2533 x s / sqrt(rounds), s a robust spread of the rounds (1.4826 x MAD, floored
  at range / 4.66 so five rounds that happen to tie do not claim precision they lack).
- **between runs**: a new process lands in another memory layout, thread placement or load
  regime, and every round of that run moves together; the rounds cannot see it. Its variance
  tau^2 is estimated two ways and the larger one is used: (a) across the cells of this
  comparison, per figure and precision (most cells did not change: tau solves median |d| / sqrt(se^2 + 2 tau^2) =
  0.6745, a robust method of moments that a few real regressions do not move), floored at
  ``TAU_FLOOR``; (b) per cell, from that cell's earlier runs of the same spec in the history
  (the spread of its run medians, when at least ``HISTORY_MIN`` earlier runs exist): a cell that
  has flipped between two modes before is not convicted for flipping again.

Per cell, z = d / sqrt(se_a^2 + se_b^2 + 2 tau^2); the one-sided p-values of all the cells
tested are corrected with Holm's step-down method at family-wise ``ALPHA``. Flagged:

- **speed-up** (INT8 vs the same runtime's FP32, per round in the same rounds: a load burst
  hits both): Holm-significant and a drop of more than ``SPEEDUP_FLOOR``.
- **absolute p50** (catches a slowdown that hits INT8 and FP32 alike): the run-wide median
  move is taken off first (a run that got slower everywhere is the machine), then
  Holm-significant, a rise of more than ``P50_FLOOR`` beyond that and more than ``P50_MIN_MS``.
- **CPU time on an oversubscribed machine**: when the load average exceeded the cores in either
  run, other processes stretch wall-clock time (a call that outlasts its time slice waits for
  them), but not the CPU time the process spends per call (measured in the same rounds). A
  wall-clock flag is then kept only if the same figure in CPU time also got worse beyond its
  floor; otherwise it is reported inside the noise, saying so. On a quiet machine the wall
  clock alone decides. (A regression that costs no CPU, e.g. one thread instead of two, is
  then not caught on an oversubscribed machine.)
- **accuracy and top-1 agreement**: counts over the evaluation samples, a one-sided
  two-proportion test at p < ``ALPHA``.
- **status**: a cell that was ``ok`` and now errors.

A ``noise:`` line says what got worse inside the noise, the two tau estimates and the drift,
so a reader can see what was ignored and why. ``bench/matrix_figures.py reruns`` measures the
false alarms over unchanged reruns (docs/matrix.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploykit.matrix.cell import Cell

SPEEDUP_FLOOR = 0.10  # a speed-up drop smaller than this is never a regression
P50_FLOOR = 0.25  # nor a p50 rise (beyond the run-wide move) smaller than this
P50_MIN_MS = 0.05
ALPHA = 0.01  # family-wise, over the cells of one comparison (Holm)
TAU_FLOOR = 0.02  # between-run scatter assumed at least (log units: ~2%)
HISTORY_MIN = 3  # earlier runs of a cell before its own between-run spread is trusted
HISTORY_RUNS = 10  # at most this many earlier runs are read

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
    tau_speedup: float = 0.0  # between-run spread across the cells (log units)
    tau_p50: float = 0.0
    drift: float = 0.0  # the run-wide median p50 move (log units), taken off every p50
    history_runs: int = 0  # earlier runs read for each cell's own between-run spread

    @property
    def flagged(self) -> list[Change]:
        return [c for c in self.changes if c.flags]

    def to_json(self) -> dict[str, Any]:
        return {"run_a": self.run_a, "run_b": self.run_b, "regressions": len(self.flagged),
                "changes": [c.to_json() for c in self.changes], "only_in_a": self.only_a, "only_in_b": self.only_b,
                "noise": self.noise, "tau_speedup": self.tau_speedup, "tau_p50": self.tau_p50, "drift": self.drift,
                "history_runs": self.history_runs}


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


def compare_cells(cells_a: Sequence[Cell], cells_b: Sequence[Cell], run_a: int = 0, run_b: int = 0,
                  history: Sequence[Sequence[Cell]] = ()) -> Comparison:
    """Compare run B with run A. ``history``: earlier runs of the same matrix (each a list of
    cells, run B excluded), whose spread per cell is its between-run noise."""
    by_a = {c.key: c for c in cells_a}
    by_b = {c.key: c for c in cells_b}
    common = [k for k in by_a if k in by_b]
    changes = [Change(k, by_a[k], by_b[k]) for k in common]
    past = [{c.key: c for c in run} for run in history]
    for ch in changes:
        a, b = ch.a, ch.b
        ch.p50_change = _rel(b.p50_ms, a.p50_ms)
        ch.speedup_change = _rel(b.speedup, a.speedup) if a.precision != "fp32" else None
        ch.sp_a, ch.sp_b = _speedup_stats(a, by_a), _speedup_stats(b, by_b)
        if a.accuracy is not None and b.accuracy is not None:
            ch.accuracy_change = b.accuracy - a.accuracy
        if a.top1_agreement is not None and b.top1_agreement is not None:
            ch.agreement_change = b.top1_agreement - a.top1_agreement
    ok = [ch for ch in changes if ch.a.status == ch.b.status == "ok"]
    for ch in changes:
        _status_and_accuracy(ch)
    # speed-up: d = ln(speed-up A / speed-up B) > 0 is a drop
    sp = [(ch, ch.sp_a[0] - ch.sp_b[0], ch.sp_a[1] ** 2 + ch.sp_b[1] ** 2) for ch in ok
          if ch.sp_a is not None and ch.sp_b is not None]
    tau_sp = _tau([d for _, d, _ in sp], [v for _, _, v in sp])
    sp_tests = [(ch, d, v + 2 * max(tau_sp, _history_tau(ch, past, "speedup")) ** 2) for ch, d, v in sp]
    # absolute p50: ln(p50 B / p50 A) less the run-wide median move
    lat = []
    for ch in ok:
        if ch.a.p50_ms and ch.b.p50_ms:
            (ca, sa), (cb, sb) = _log_stats(ch.a.round_ms, ch.a.p50_ms, ch.a.spread), \
                _log_stats(ch.b.round_ms, ch.b.p50_ms, ch.b.spread)
            lat.append((ch, cb - ca, sa ** 2 + sb ** 2))
    drift = statistics.median([d for _, d, _ in lat]) if len(lat) >= 4 else 0.0
    lat = [(ch, d - drift, v) for ch, d, v in lat]
    # per precision: INT8 and FP32 kernels scatter differently from run to run
    taus = {p: _tau([d for ch, d, _ in lat if ch.a.precision == p], [v for ch, _, v in lat if ch.a.precision == p])
            for p in {ch.a.precision for ch, _, _ in lat}}
    tau_p50 = max(taus.values(), default=TAU_FLOOR)
    lat_tests = [(ch, d, v + 2 * max(taus[ch.a.precision], _history_tau(ch, past, "p50")) ** 2) for ch, d, v in lat]
    significant = _holm([_p_worse(d, v) for _, d, v in sp_tests] + [_p_worse(d, v) for _, d, v in lat_tests])
    for (ch, d, v), sig in zip(sp_tests, significant[:len(sp_tests)]):
        _judge_speedup(ch, d, v, sig)
    for (ch, d, v), sig in zip(lat_tests, significant[len(sp_tests):]):
        _judge_p50(ch, d, v, sig, drift)
    noise = _noise_line(changes, tau_sp, tau_p50, drift, len(past), len(sp_tests) + len(lat_tests))
    return Comparison(run_a, run_b, changes, [k for k in by_a if k not in by_b], [k for k in by_b if k not in by_a],
                      noise, tau_sp, tau_p50, drift, len(past))


def _status_and_accuracy(ch: Change) -> None:
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


def _judge_speedup(ch: Change, drop: float, var: float, significant: bool) -> None:
    if drop <= 0 or ch.a.speedup is None or ch.b.speedup is None:
        return
    pct = -math.expm1(-drop) * 100
    what = f"speed-up {ch.a.speedup:.2f}x -> {ch.b.speedup:.2f}x (-{pct:.0f}%, z = {drop / math.sqrt(var):.1f})"
    if significant and drop > math.log1p(SPEEDUP_FLOOR):
        held = _cpu_held(ch, "speedup")
        (ch.within_noise if held else ch.flags).append(what + (f"; {held}" if held else ""))
    elif pct >= 1:
        ch.within_noise.append(what)


def oversubscribed(cell: Cell) -> float:
    """The 1-minute load average per core when the cell was timed, if above 1 (else 0)."""
    load, cores = (cell.env.get("load_average") or [0.0])[0], cell.env.get("cores") or 1
    per_core = float(load) / max(int(cores), 1)
    return per_core if per_core > 1 else 0.0


def _cpu_held(ch: Change, what: str) -> str:
    """Why a wall-clock change is the machine's, not the artifact's: it was timed on an
    oversubscribed machine (load above the cores, in either run) and the same figure in CPU time
    per call, which other processes cannot stretch, did not get worse beyond its floor. '' when
    that cannot be said (a quiet machine, or no CPU figures)."""
    a, b = ch.a, ch.b
    load = max(oversubscribed(a), oversubscribed(b))
    if not load:
        return ""
    if what == "speedup" and a.cpu_speedup and b.cpu_speedup:
        if b.cpu_speedup >= a.cpu_speedup / (1 + SPEEDUP_FLOOR):
            return (f"CPU-time speed-up held ({a.cpu_speedup:.2f}x -> {b.cpu_speedup:.2f}x) at load {load:.1f} per core: "
                    f"the wall clock measured the load")
    if what == "p50" and a.cpu_ms and b.cpu_ms:
        if b.cpu_ms <= a.cpu_ms * (1 + P50_FLOOR):
            return (f"CPU time per call held ({a.cpu_ms:.3f} -> {b.cpu_ms:.3f} ms) at load {load:.1f} per core: "
                    f"the wall clock measured the load")
    return ""


def _judge_p50(ch: Change, rise: float, var: float, significant: bool, drift: float) -> None:
    a, b = ch.a.p50_ms, ch.b.p50_ms
    if rise <= 0 or a is None or b is None:
        return
    what = (f"p50 {a:.3f} -> {b:.3f} ms (+{math.expm1(rise) * 100:.0f}% beyond the run's "
            f"{math.expm1(drift) * 100:+.0f}%, z = {rise / math.sqrt(var):.1f})")
    if significant and rise > math.log1p(P50_FLOOR) and b - a * math.exp(drift) > P50_MIN_MS:
        held = _cpu_held(ch, "p50")
        (ch.within_noise if held else ch.flags).append(what + (f"; {held}" if held else ""))
    elif rise > math.log1p(0.05):
        ch.within_noise.append(what)


def _p_worse(d: float, var: float) -> float:
    """One-sided p-value of a change d this large in the bad direction (normal, variance var)."""
    if var <= 0:
        return 0.0 if d > 0 else 1.0
    return 0.5 * math.erfc(d / math.sqrt(2 * var))


def _holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down: which hypotheses are rejected at family-wise ``alpha``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected


def _tau(ds: Sequence[float], variances: Sequence[float]) -> float:
    """The between-run spread common to the cells (log units): tau solving
    median(|d| / sqrt(v + 2 tau^2)) = 0.6745 (the median of |N(0, 1)|); TAU_FLOOR at least."""
    if len(ds) < 4:
        return TAU_FLOOR

    def med(tau: float) -> float:
        return statistics.median(abs(d) / math.sqrt(v + 2 * tau * tau) if v + tau > 0 else math.inf
                                 for d, v in zip(ds, variances))

    if med(TAU_FLOOR) <= 0.6745:
        return TAU_FLOOR
    lo, hi = TAU_FLOOR, 1.0
    while med(hi) > 0.6745 and hi < 64:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if med(mid) > 0.6745 else (lo, mid)
    return hi


def _history_tau(ch: Change, past: Sequence[Mapping[str, Cell]], what: str) -> float:
    """This cell's own between-run spread (log units) from its earlier runs and run A; 0 when
    fewer than HISTORY_MIN runs hold it."""
    values = []
    for cell in [run[ch.key] for run in past if ch.key in run] + [ch.a]:
        if cell.status != "ok":
            continue
        v = cell.speedup if what == "speedup" else cell.p50_ms
        if v and v > 0:
            values.append(math.log(v))
    if len(values) < HISTORY_MIN:
        return 0.0
    return _robust_sd(values)


def _robust_sd(values: Sequence[float]) -> float:
    """1.4826 x MAD, floored at range / 4.66 (a range's expectation is ~2.33 sd at n = 5)."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    return max(1.4826 * mad, (max(values) - min(values)) / 4.66)


def _log_stats(rounds: Sequence[float], p50: float | None, spread: float | None) -> tuple[float, float]:
    """(median, standard error of the median) of ln(round figures); from the stored p50 and
    spread when the rounds are missing (a build's single measurement)."""
    vals = [math.log(x) for x in rounds if x and x > 0]
    if len(vals) >= 3:
        return statistics.median(vals), 1.2533 * _robust_sd(vals) / math.sqrt(len(vals))
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


def _noise_line(changes: Sequence[Change], tau_sp: float, tau_p50: float, drift: float, history: int,
                tests: int) -> str:
    inside = [c for c in changes if c.within_noise and not c.flags]
    parts = []
    if inside:
        worst = sorted(inside, key=lambda c: -(c.p50_change or 0.0))[:3]
        parts.append(f"{len(inside)} cell(s) worse inside the noise, e.g. "
                     + "; ".join(f"{c.key}: {', '.join(c.within_noise)}" for c in worst))
    else:
        parts.append("nothing worse inside the noise")
    parts.append(f"between-run spread {math.expm1(tau_sp) * 100:.0f}% (speed-up) and {math.expm1(tau_p50) * 100:.0f}% "
                 f"(p50) across the cells" + (f", per cell from {history} earlier run(s) where larger" if history else ""))
    if drift:
        parts.append(f"the whole run moved {math.expm1(drift) * 100:+.0f}% (median p50 change), taken off every p50")
    parts.append(f"{tests} tests, Holm at family-wise {ALPHA}")
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
