"""The matrix's outputs: terminal table (rich), matrix.md, matrix.csv, matrix.json (an object
with a ``cells`` list) and one self-contained matrix.html (plotly inlined: opens offline)."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploykit.fileio import atomic_output
from deploykit.matrix.cell import SPEEDUP_DEFINITION, Cell

COLUMNS = ("model", "target", "device", "batch", "precision", "status", "p50 ms", "spread", "p90 ms", "p99 ms",
           "samples/s", "speed-up", "fp32 p50 ms", "top-1 agr", "accuracy", "memory MiB", "rebuilt", "note")


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def row(c: Cell) -> list[str]:
    note = c.guard and ("GUARD: " + c.guard) or (c.error if c.status != "ok" else c.note)
    speed = "-" if c.speedup is None else (f"{c.speedup:.2f}x" + (f" ±{c.speedup_spread * 50:.0f}%"
                                                                  if c.speedup_spread and c.precision != "fp32" else ""))
    rebuilt = c.artifact.get("rebuilt")
    return [c.model, c.target, c.device, str(c.batch_size), c.precision, c.status, _f(c.p50_ms, ".3f"),
            "-" if c.spread is None else f"±{c.spread * 50:.0f}%", _f(c.p90_ms, ".3f"), _f(c.p99_ms, ".3f"),
            _f(c.throughput, ".1f"), speed, _f(c.fp32_p50_ms, ".3f") if c.precision != "fp32" else "-",
            _pct(c.top1_agreement), _pct(c.accuracy), _f(c.memory_mb, ".1f"),
            "-" if rebuilt is None else ("yes" if rebuilt else "no"), note]


def footer(cells: Sequence[Cell], meta: Mapping[str, Any]) -> list[str]:
    lines = [SPEEDUP_DEFINITION + "; spread = half the range of the round medians over p50."]
    guarded = [c for c in cells if c.guard]
    if guarded:
        lines.append(f"performance guard: {len(guarded)} INT8 cell(s) not faster than FP32: "
                     + "; ".join(f"{c.key}: {c.guard}" for c in guarded[:6]) + (" ..." if len(guarded) > 6 else ""))
    errors = [c for c in cells if c.status == "error"]
    if errors:
        lines.append(f"{len(errors)} cell(s) errored (the others completed): "
                     + "; ".join(f"{c.key}: {c.error}" for c in errors[:4]))
    not_run = sorted({f"{c.target}: {c.error}" for c in cells if c.status == "not_run"})
    for n in not_run[:6]:
        lines.append(f"not run: {n}")
    env = meta.get("env") or {}
    if env.get("cpu"):
        lines.append(f"environment: {env.get('cpu')} ({env.get('int8_dot_product', '?')}), {env.get('cores')} cores, "
                     f"{env.get('os')}; load average "
                     f"{meta.get('load_average')}")
    return lines


def markdown(cells: Sequence[Cell], meta: Mapping[str, Any]) -> str:
    out = [f"# Benchmark matrix (run {meta.get('run_id')})", ""]
    if meta.get("summary"):
        out += [meta["summary"], ""]
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for c in cells:
        out.append("| " + " | ".join(v.replace("|", "\\|") for v in row(c)) + " |")
    out.append("")
    out += [f"- {line}" for line in footer(cells, meta)]
    versions = meta.get("env", {}).get("versions", {})
    if versions:
        out.append("- toolchain: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(out) + "\n"


def csv_text(cells: Sequence[Cell]) -> str:
    fields = ["model", "target", "backend", "device", "batch_size", "precision", "status", "p50_ms", "spread",
              "p90_ms", "p99_ms", "throughput", "speedup", "speedup_spread", "fp32_p50_ms", "cpu_ms", "cpu_speedup", "top1_agreement",
              "cosine", "accuracy", "fp32_accuracy", "eval_samples", "memory_mb", "guard", "note", "error", "rebuilt",
              "load_average", "threads"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for c in cells:
        raw = c.to_json()
        rec = {k: raw.get(k) for k in fields if k in raw}
        rec["rebuilt"] = c.artifact.get("rebuilt")
        rec["load_average"] = " ".join(str(x) for x in c.env.get("load_average", []))
        rec["threads"] = c.env.get("threads")
        w.writerow(rec)
    return buf.getvalue()


def json_doc(cells: Sequence[Cell], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"run": dict(meta), "speedup_definition": SPEEDUP_DEFINITION, "cells": [c.to_json() for c in cells]}


def terminal(cells: Sequence[Cell], meta: Mapping[str, Any], plain: bool = False) -> str:
    """The table (rich, fitted to the terminal; plain aligned text when ``plain``), then the footer.
    Each INT8 speed-up has the FP32 p50 it is relative to beside it."""
    from deploykit.tables import escape, render

    short = ("model", "target", "batch", "precision", "status", "p50 ms", "spread", "p99 ms", "speed-up",
             "fp32 p50 ms", "top-1 agr", "accuracy", "rebuilt", "note")
    idx = [COLUMNS.index(c) for c in short]
    rows = [[escape(row(c)[i]) for i in idx] for c in cells]
    right = [short.index(n) for n in ("batch", "p50 ms", "spread", "p99 ms", "speed-up", "fp32 p50 ms", "top-1 agr",
                                      "accuracy")]
    return render(short, rows, tty=not plain, right=right) + "\n\n" + "\n".join(footer(cells, meta))


# --------------------------------------------------------------------------------- HTML
def html_report(cells: Sequence[Cell], meta: Mapping[str, Any]) -> str:
    """One file, no network: plotly's JavaScript is inlined."""
    import plotly.graph_objects as go  # type: ignore[import-untyped]
    from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]
    from plotly.subplots import make_subplots  # type: ignore[import-untyped]

    ok = [c for c in cells if c.status == "ok" and c.p50_ms is not None]
    figures: list[tuple[str, str, Any]] = []

    # 1. latency vs accuracy, one panel per device
    devices = sorted({c.device for c in ok}) or ["(none)"]
    fig = make_subplots(rows=1, cols=len(devices), subplot_titles=devices, shared_yaxes=True)
    first_batch = min((x.batch_size for x in ok), default=1)
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
    colour = {t: palette[i % len(palette)] for i, t in enumerate(sorted({c.target for c in ok}))}
    for i, dev in enumerate(devices, 1):
        for target in sorted({c.target for c in ok if c.device == dev}):
            for prec, symbol in (("fp32", "circle-open"), ("fp16", "square"), ("int8", "diamond")):
                pts = [c for c in ok if c.device == dev and c.target == target and c.precision == prec
                       and c.batch_size == first_batch]
                if not pts:
                    continue
                y = [c.accuracy if c.accuracy is not None else c.top1_agreement for c in pts]
                fig.add_trace(go.Scatter(
                    x=[c.p50_ms for c in pts], y=y, mode="markers", name=f"{target} {prec}",
                    text=[c.model for c in pts], marker={"symbol": symbol, "size": 12, "color": colour[target],
                                                         "line": {"width": 2, "color": colour[target]}},
                    hovertemplate="%{text}<br>p50 %{x:.3f} ms<br>accuracy %{y:.4f}<extra>" + f"{target} {prec}</extra>"),
                    row=1, col=i)
        fig.update_xaxes(title_text=f"p50 latency, ms (batch {min((x.batch_size for x in ok), default=1)}, log)",
                         type="log", row=1, col=i)
    fig.update_yaxes(title_text="accuracy (labels; else top-1 agreement with FP32)", row=1, col=1)
    figures.append(("latency-accuracy", "Latency vs accuracy per device", fig))

    # 2. INT8 speed-up per target
    fig = go.Figure()
    int8 = [c for c in ok if c.precision == "int8" and c.speedup is not None]
    for b in sorted({c.batch_size for c in int8}):
        pts = [c for c in int8 if c.batch_size == b]
        fig.add_trace(go.Bar(
            x=[f"{c.target}<br>{c.model}" for c in pts], y=[c.speedup for c in pts], name=f"batch {b}",
            error_y={"type": "data", "array": [(c.speedup or 0) * (c.speedup_spread or 0) / 2 for c in pts]},
            marker_color=None, hovertemplate="%{x}<br>%{y:.2f}x<extra>batch " + str(b) + "</extra>"))
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="FP32 (1.0x)")
    fig.update_layout(barmode="group", yaxis_title="INT8 speed-up over the same runtime's FP32 (x)")
    figures.append(("speedup", "INT8 speed-up per target", fig))

    # 3. latency by batch size
    fig = go.Figure()
    series: dict[tuple[str, str, str], list[Cell]] = {}
    for c in ok:
        series.setdefault((c.model, c.target, c.precision), []).append(c)
    for (model, target, prec), pts in sorted(series.items()):
        pts.sort(key=lambda c: c.batch_size)
        fig.add_trace(go.Scatter(
            x=[c.batch_size for c in pts], y=[c.p50_ms / c.batch_size for c in pts if c.p50_ms is not None],
            mode="lines+markers", name=f"{model} / {target} / {prec}",
            line={"dash": "solid" if prec == "int8" else "dot"}))
    fig.update_layout(xaxis_title="batch size", yaxis_title="p50 latency per sample, ms (log)", yaxis_type="log")
    figures.append(("batch", "Latency by batch size", fig))

    parts = []
    for div_id, title, f in figures:
        f.update_layout(template="plotly_white", height=460, margin={"t": 60, "l": 60, "r": 20, "b": 60},
                        legend={"font": {"size": 10}})
        parts.append(f"<section><h2>{html.escape(title)}</h2>"
                     + f.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                 config={"displaylogo": False, "responsive": True}) + "</section>")
    table_rows = "".join(
        "<tr class='{}'>{}</tr>".format("guard" if c.guard else c.status,
                                        "".join(f"<td>{html.escape(v)}</td>" for v in row(c)))
        for c in cells)
    foot = "".join(f"<li>{html.escape(line)}</li>" for line in footer(cells, meta))
    title = f"deploykit benchmark matrix, run {meta.get('run_id')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ddd; padding: 3px 6px; }}
tr.error td {{ background: #fde2e2; }} tr.guard td {{ background: #fff4d6; }} tr.not_run td {{ color: #888; }}
#dk-errors {{ color: #b00; }}
</style>
<script>window.dkErrors = []; window.addEventListener('error', function (e) {{ window.dkErrors.push(String(e.message)); }});</script>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(meta.get('summary', '')))}</p>
{''.join(parts)}
<section><h2>All cells</h2><table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in COLUMNS)}</tr>{table_rows}</table>
<ul>{foot}</ul></section>
<div id="dk-status" data-plots="{len(figures)}"></div><div id="dk-errors"></div>
<script>
// for people and for the headless-browser test: how many plots drew data, and any script error
function dkCheck(tries) {{
  var plots = document.querySelectorAll('.js-plotly-plot');
  var drawn = Array.prototype.filter.call(plots, function (d) {{ return d.querySelector('svg.main-svg .trace') !== null; }});
  if (drawn.length < plots.length && tries > 0) {{ setTimeout(function () {{ dkCheck(tries - 1); }}, 100); return; }}
  var s = document.getElementById('dk-status');
  s.setAttribute('data-rendered', String(drawn.length));
  s.setAttribute('data-errors', String(window.dkErrors.length));
  document.getElementById('dk-errors').textContent = window.dkErrors.join(' | ');
}}
window.addEventListener('load', function () {{ dkCheck(50); }});
</script>
</body></html>
"""


def write_outputs(out_dir: Path, cells: Sequence[Cell], meta: Mapping[str, Any]) -> list[Path]:
    """Write matrix.md/.csv/.json/.html atomically; returns their paths."""
    out_dir = Path(out_dir)
    docs = {"matrix.md": markdown(cells, meta), "matrix.csv": csv_text(cells),
            "matrix.json": json.dumps(json_doc(cells, meta), indent=1, allow_nan=False, default=str) + "\n",
            "matrix.html": html_report(cells, meta)}
    written = []
    for name, text in docs.items():
        with atomic_output(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written
