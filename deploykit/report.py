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
    return ", ".join(f"b{l['batch_size']} {l['p50_ms']:.3f}" for l in target["latency"])


#: The one definition of speed-up, said under every table that shows one (terminal, report, docs).
SPEEDUP_DEFINITION = ("speed-up = FP32 p50 / INT8 p50 at the target's first batch size, on the same runtime and "
                      "device, measured in the same run (FP32 onnxruntime where the backend has no FP32 mode)")


def speedup_text(entry: dict[str, Any]) -> str:
    """``2.30x``, or ``-`` when there was no FP32 time to compare with."""
    return "-" if entry.get("speedup") is None else f"{entry['speedup']:.2f}x"


def fp32_text(entry: dict[str, Any], backend: str) -> str:
    """The FP32 p50 a speed-up is relative to, with its runtime when it is not the target's own."""
    if entry.get("speedup") is None:
        return "-"
    runtime = str(entry.get("speedup_vs") or "").removesuffix(" fp32")
    return f"{entry['fp32_p50_ms']:.3f}" + ("" if runtime == backend else f" ({runtime})")


def summary_rows(manifest: dict[str, Any]) -> list[list[str]]:
    base = {l["batch_size"]: l["p50_ms"] for l in manifest.get("baseline", {}).get("latency", [])}
    rows = []
    if base:
        rows.append(["fp32 reference", "onnxruntime", "reference", "-", "-", "-", "-", "-",
                     ", ".join(f"b{b} {v:.3f}" for b, v in base.items()), "-", "-"])
    for t in manifest["targets"]:
        first = t["latency"][0] if t["latency"] else {}
        rows.append([t["name"], t["backend"], t["status"],
                     _fmt(t, "top1_agreement"), _fmt(t, "cosine"), _fmt(t, "accuracy_drop"), _fmt(t, "fidelity_rel_l2"),
                     _verification(t),
                     _latency(t), speedup_text(first), fp32_text(first, t["backend"])])
    return rows


def status_summary(manifest: dict[str, Any]) -> str:
    """One line: which targets were checked here, only lowered, skipped, failed or errored."""
    def measured(t: dict[str, Any]) -> bool:  # accuracy/latency actually ran here
        return bool(t["latency"]) or any(c["name"] == "top1_agreement" and c["status"] != "not_run"
                                         for c in t["checks"])

    targets = manifest["targets"]
    checked_all = [t for t in targets if t["status"] in ("ok", "failed") and measured(t)]
    checked = [t["name"] for t in checked_all if not t["device"].get("address")]
    on_device = [f"{t['name']} ({t['device']['name']} at {t['device']['address']})" for t in checked_all
                 if t["device"].get("address")]
    lowered = [t["name"] for t in targets
               if t["status"] == "lowered" or (t["status"] == "failed" and not measured(t))]
    parts = []
    if checked:
        parts.append("checked here (accuracy, fidelity, latency): " + ", ".join(checked))
    if on_device:
        parts.append("checked on the device by its agent: " + ", ".join(on_device))
    if lowered:
        parts.append("lowered, checks not run: " + ", ".join(lowered))
    failed = [f"{t['name']} ({', '.join(c['name'] for c in t['checks'] if c['status'] == 'fail')})"
              for t in targets if t["status"] == "failed"]
    if failed:
        parts.append("FAILED: " + ", ".join(failed))
    skipped = [t["name"] for t in targets if t["status"] == "skipped"]
    if skipped:
        parts.append("skipped (backend not available here): " + ", ".join(skipped))
    errors = [t["name"] for t in targets if t["status"] == "error"]
    if errors:
        parts.append("errors: " + ", ".join(errors))
    return "; ".join(parts) or "no targets"


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
          "p50 ms", "speed-up", "fp32 p50 ms"]


def terminal_table(manifest: dict[str, Any], tty: bool | None = None) -> str:
    """The build's table (rich on a terminal, plain aligned text when piped), the status line,
    the speed-up definition, and one note per reason, failed check or warning."""
    from deploykit.tables import escape, render

    rows = summary_rows(manifest)
    table = render(HEADER, [[escape(c) for c in r] for r in rows], tty=tty)
    lines = [table, "", status_summary(manifest)]
    if any(r[-2] != "-" for r in rows):
        lines.append(SPEEDUP_DEFINITION)
    notes = []
    cal = manifest["calibration"]
    if cal.get("random_data"):
        notes.append("WARNING: " + cal["warning"])
    for t in manifest["targets"]:
        if t["reason"]:
            notes.append(f"{t['name']}: {t['reason']}")
        for c in t["checks"]:
            if c["status"] == "fail":
                value = "n/a" if c["value"] is None else f"{c['value']:.6g}"
                if c.get("threshold") is None:  # a verification the backend failed on its own terms
                    notes.append(f"{t['name']}: {c['name']} failed ({value}): {c['message']}")
                else:
                    bound = "<" if c["bound"] == "min" else ">"
                    notes.append(f"{t['name']}: {c['name']} = {value} {bound} threshold {c['threshold']:g}: "
                                 f"{c['message']}")
    return "\n".join(lines + ([""] + [escape(n) for n in notes] if notes else []))


def _worst_layers(check: dict[str, Any] | None) -> list[str]:
    """The per-layer check's worst layers (each fed the canonical model's inputs), for report.md."""
    worst = (check or {}).get("details", {}).get("worst") or []
    if not worst:
        return []
    out = ["Worst layers (each fed the canonical model's own inputs; `rounding` is the runtime's integer "
           "rounding, `wrong_scale` the lowering's, `beyond_rounding` more than one step off with the right "
           "scale; all layers: `deploykit compare-layers OUT`):", "",
           "| layer | tensor | within one step | exact | max steps | gain | verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in worst:
        out.append(f"| `{r['layer']}` | `{r['tensor']}` | {r['within_one_step']:.2%} | {r['exact']:.2%} | "
                   f"{r['max_steps']} | {r['gain']:.3f} | {r['verdict']} |")
    return out + [""]


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
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
    search = q.get("accuracy_target")
    if search:
        line = (f"- accuracy target {search['target']}: {'met' if search['met'] else 'NOT met'}, {search['measured']:.4f} "
                f"(worst of {', '.join(search.get('judged_on') or ['canonical'])}) with {len(search['float_layers'])} "
                f"float layer(s); {len(search.get('tried') or [])} prefixes of the ranking judged")
        pruned = search.get("pruned") or []
        if pruned:
            back = [f"`{p['layer']}`" for p in pruned if p["int8"]]
            line += f"; prune-back: {len(back)} of {len(pruned)} tried back in int8" + (f" ({', '.join(back)})" if back else "")
        out.append(line)
    return out


def _calibration_line(manifest: dict[str, Any]) -> str:
    cal = manifest["calibration"]
    if (manifest.get("quantization") or {}).get("adoption"):  # built as given: nothing was calibrated here
        return f"- calibration: none in this build; the quantized model's own scales ({cal['method']}) are kept"
    return f"- calibration: {cal['method']} on {cal['samples']} samples of `{cal['data']}`"


def markdown_report(manifest: dict[str, Any]) -> str:
    cal, ev, can = manifest["calibration"], manifest["evaluation"], manifest["canonical"]
    out = ["# deploykit build report", "",
           f"- model: `{manifest['model']['path']}` (sha256 `{manifest['model']['sha256'][:16]}…`)",
           f"- canonical model: `{can['path']}` ({can['qdq_nodes']} Q/DQ nodes, {can['tensors_in_table']} tensors "
           f"in the calibration table, lint: clean)",
           _calibration_line(manifest),
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
    out += ["", status_summary(manifest) + ".", "", f"*{SPEEDUP_DEFINITION}.*", ""]
    out += _time_table(manifest)
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
            out += _worst_layers(_check(t, "layer_within_one_step"))
        if t["latency"]:
            out += ["| batch | p50 ms | p90 ms | p99 ms | throughput /s | FP32 p50 ms | FP32 runtime | speed-up |",
                    "|---|---|---|---|---|---|---|---|"]
            for l in t["latency"]:
                fp32 = (f"{l['fp32_p50_ms']:.3f} | {str(l['speedup_vs']).removesuffix(' fp32')} | {l['speedup']:.2f}x"
                        if l.get("speedup") is not None else "- | - | -")
                out.append(f"| {l['batch_size']} | {l['p50_ms']:.3f} | {l['p90_ms']:.3f} | {l['p99_ms']:.3f} "
                           f"| {l['throughput']:.1f} | {fp32} |")
            out.append("")
        for key, value in (t.get("preflight") or {}).items():
            if isinstance(value, str) and ("\n" in value or len(value) > 60):
                out += [f"{key}:", "", "```", value, "```", ""]
            else:
                out += [f"- {key}: `{value}`"]
        if t.get("preflight"):
            out.append("")
    return "\n".join(out)


STAGES = ("preflight", "lower", "load", "accuracy", "latency")


def _time_table(manifest: dict[str, Any]) -> list[str]:
    """Where the time went: the build's stages, then each target's."""
    stages = manifest.get("stages") or {}
    out = ["## Where the time went", ""]
    if stages:
        out += ["| stage | seconds |", "|---|---|"]
        out += [f"| {name.replace('_', ' ')} | {sec:.2f} |" for name, sec in stages.items()]
        out.append("")
    timed = [t for t in manifest["targets"] if t.get("seconds")]
    if timed:
        out += ["| target | " + " | ".join(STAGES) + " | total |", "|---" * (len(STAGES) + 2) + "|"]
        for t in timed:
            sec = t["seconds"]
            cells = [f"{sec[k]:.2f}" if k in sec else "-" for k in STAGES]
            out.append(f"| {t['name']} | " + " | ".join(cells) + f" | {sec.get('total', sum(sec.values())):.2f} |")
        out.append("")
    return out if len(out) > 2 else []
