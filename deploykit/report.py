"""Human reports from the manifest: a terminal table and a Markdown report. Numbers are
formatted by their metric's definition (:data:`deploykit.results.METRICS`)."""

from __future__ import annotations

from typing import Any

from deploykit.results import metric

_STATUS = {"pass": "ok", "fail": "FAIL", "info": "", "not_run": "not run"}


def _check(target: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in target["checks"] if c["name"] == name), None)


def _fmt(target: dict[str, Any], name: str) -> str:
    c = _check(target, name)
    if c is None:
        return "-"
    if c["status"] == "not_run" or c["value"] is None:
        return "not run"
    return metric(name).format(c["value"]) + (" FAIL" if c["status"] == "fail" else "")


def _latency(target: dict[str, Any]) -> str:
    if not target["latency"]:
        c = _check(target, "latency_p50_ms")
        return "not run" if c is not None and c["status"] == "not_run" else "-"
    return ", ".join(f"b{l['batch_size']}: {l['p50_ms']:.3f}" for l in target["latency"])


def summary_rows(manifest: dict[str, Any]) -> list[list[str]]:
    base = {l["batch_size"]: l["p50_ms"] for l in manifest.get("baseline", {}).get("latency", [])}
    rows = []
    if base:
        rows.append(["fp32 reference", "onnxruntime", "ref", "-", "-", "-", "-", "-",
                     ", ".join(f"b{b}: {v:.3f}" for b, v in base.items()), "1.00x"])
    for t in manifest["targets"]:
        first = t["latency"][0] if t["latency"] else {}
        speed = f"{first['speedup']:.2f}x vs {first['speedup_vs']}" if "speedup" in first else "-"
        status = t["status"]
        rows.append([t["name"], t["backend"], status,
                     _fmt(t, "top1_agreement"), _fmt(t, "cosine"), _fmt(t, "accuracy_drop"), _fmt(t, "fidelity_rel_l2"),
                     _verification(t),
                     _latency(t), speed])
    return rows


def _verification(target: dict[str, Any]) -> str:
    """int8 share of compute layers (where the backend audits it) and the stored-scale check."""
    parts = []
    frac = _check(target, "int8_fraction")
    if frac is not None and frac["value"] is not None:
        parts.append(metric("int8_fraction").format(frac["value"]) + " int8" + (" FAIL" if frac["status"] == "fail" else ""))
    scales = _check(target, "scales_match")
    if scales is not None:
        parts.append({"pass": "scales ok", "fail": "scales FAIL"}.get(scales["status"], "scales ?"))
    return ", ".join(parts) or "-"


HEADER = ["target", "backend", "status", "top-1 agr", "cosine", "acc drop", "fid rel-L2", "int8 / scales",
          "p50 ms", "speed-up"]


def terminal_table(manifest: dict[str, Any]) -> str:
    rows = [HEADER] + summary_rows(manifest)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    cal = manifest["calibration"]
    if cal.get("random_data"):
        notes.append("WARNING: " + cal["warning"])
    for t in manifest["targets"]:
        if t["reason"]:
            notes.append(f"{t['name']}: {t['reason']}")
        for c in t["checks"]:
            if c["status"] == "fail":
                bound = "<" if c["bound"] == "min" else ">"
                value = "n/a" if c["value"] is None else f"{c['value']:.6g}"
                notes.append(f"{t['name']}: {c['name']} = {value} {bound} threshold {c['threshold']}: {c['message']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def _quantization_lines(q: dict | None) -> list[str]:
    if not q:
        return []
    out = [f"- activations: {q['activations']} ({q['activations_reason']})"]
    cmp = q.get("profile_comparison") or {}
    if cmp.get("message"):
        out.append(f"- activation profiles: {cmp['message']}")
    floats = q.get("float_layers") or []
    if floats:
        names = ", ".join(f"`{f['name']}`" for f in floats[:10]) + (f" and {len(floats) - 10} more" if len(floats) > 10 else "")
        out.append(f"- float layers ({len(floats)}): {names}; int8 share of MACs {q['int8_mac_share'] * 100:.1f}%")
    return out


def markdown_report(manifest: dict[str, Any]) -> str:
    cal, ev, can = manifest["calibration"], manifest["evaluation"], manifest["canonical"]
    out = ["# deploykit build report", "",
           f"- model: `{manifest['model']['path']}` (sha256 `{manifest['model']['sha256'][:16]}…`)",
           f"- canonical model: `{can['path']}` ({can['qdq_nodes']} Q/DQ nodes, {can['tensors_in_table']} tensors "
           f"in the calibration table, lint: clean)",
           f"- calibration: {cal['method']} on {cal['samples']} samples of `{cal['data']}`",
           *_quantization_lines(manifest.get("quantization")),
           f"- evaluation: `{ev['data']}`" + (f" ({ev['note']})" if ev["note"] else "")
           + (f"; FP32 accuracy {ev['fp32_accuracy'] * 100:.2f}%" if ev.get("fp32_accuracy") is not None else ""),
           f"- deploykit {manifest['deploykit']}, {manifest['created']}", ""]
    if cal.get("random_data"):
        out += [f"> **WARNING: {cal['warning']}**", ""]
    rows = [HEADER] + summary_rows(manifest)
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|" + "---|" * len(HEADER))
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    out.append("")
    for t in manifest["targets"]:
        out += [f"## {t['name']} ({t['backend']} on {t['device']['name']})", "", f"status: **{t['status']}**"
                + (f": {t['reason']}" if t["reason"] else ""), ""]
        if t["artifact"]:
            out += [f"artifact: `{t['artifact']['path']}` (sha256 `{t['artifact']['sha256'][:16]}…`)", ""]
        if t["checks"]:
            out += ["| check | status | value | threshold | note |", "|---|---|---|---|---|"]
            for c in t["checks"]:
                value = "-" if c["value"] is None else f"{c['value']:.6g}"
                thr = "-" if c["threshold"] is None else f"{c['bound']} {c['threshold']:g}"
                out.append(f"| {c['name']} | {c['status']} | {value} | {thr} | {c['message']} |")
            out.append("")
        if t["latency"]:
            out += ["| batch | p50 ms | p90 ms | p99 ms | throughput /s |", "|---|---|---|---|---|"]
            for l in t["latency"]:
                out.append(f"| {l['batch_size']} | {l['p50_ms']:.3f} | {l['p90_ms']:.3f} | {l['p99_ms']:.3f} | {l['throughput']:.1f} |")
            out.append("")
        for key, value in (t.get("preflight") or {}).items():
            if isinstance(value, str) and ("\n" in value or len(value) > 60):
                out += [f"{key}:", "", "```", value, "```", ""]
            else:
                out += [f"- {key}: `{value}`"]
        if t.get("preflight"):
            out.append("")
    return "\n".join(out)
