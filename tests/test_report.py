"""Status words that do not mislead, one speed-up definition with its FP32 time, time per stage."""

from __future__ import annotations

from deploykit.report import SPEEDUP_DEFINITION, markdown_report, status_summary, terminal_table


def _target(name: str, backend: str, status: str, reason: str = "", latency: list | None = None,
            seconds: dict | None = None) -> dict:
    checks = [{"name": "top1_agreement", "status": "pass" if status == "ok" else "not_run",
               "value": 0.995 if status == "ok" else None, "threshold": None, "bound": None, "message": ""}]
    return {"name": name, "backend": backend, "status": status, "reason": reason, "checks": checks,
            "latency": latency or [], "device": {"name": "x86-cpu"}, "artifact": None, "seconds": seconds or {}}


def _manifest() -> dict:
    lat = {"batch_size": 1, "p50_ms": 0.2, "p90_ms": 0.25, "p99_ms": 0.3, "throughput": 5000.0}
    return {
        "model": {"path": "m.onnx", "sha256": "0" * 64}, "deploykit": "0.1.0", "created": "now",
        "calibration": {"method": "minmax", "samples": 8, "data": "c.npz", "random_data": False, "warning": ""},
        "evaluation": {"data": "e.npz", "note": "", "fp32_accuracy": 0.98},
        "canonical": {"path": "canonical.qdq.onnx", "qdq_nodes": 4, "tensors_in_table": 2},
        "baseline": {"latency": [{"batch_size": 1, "p50_ms": 0.5}]},
        "stages": {"calibrate": 1.5, "targets": 3.0, "total": 5.0},
        "targets": [
            _target("tflite", "tflite", "ok", latency=[{**lat, "fp32_p50_ms": 0.46, "speedup": 2.3,
                                                        "speedup_vs": "tflite fp32"}],
                    seconds={"preflight": 0.1, "lower": 1.0, "load": 0.1, "accuracy": 0.5, "latency": 0.4, "total": 2.1}),
            _target("ort", "onnxruntime", "ok", latency=[{**lat, "fp32_p50_ms": 0.5, "speedup": 2.5,
                                                          "speedup_vs": "onnxruntime fp32"}]),
            _target("edge", "openvino", "ok", latency=[{**lat, "fp32_p50_ms": 0.5, "speedup": 2.5,
                                                        "speedup_vs": "onnxruntime fp32"}]),
            _target("coreml", "coreml", "lowered", "lowered and verified; checks not run: needs macOS"),
            _target("trt", "tensorrt", "skipped", "no GPU"),
            _target("bad", "openvino", "error", "boom"),
        ],
    }


def test_status_line_says_what_was_and_was_not_checked():
    line = status_summary(_manifest())
    assert line == ("checked here (accuracy, fidelity, latency): tflite, ort, edge; lowered, checks not run: coreml; "
                    "skipped (backend not available here): trt; errors: bad")
    m = _manifest()
    m["targets"][3]["status"] = "failed"  # lowered here, and its verification failed: not "checked here"
    m["targets"][3]["checks"].append({"name": "scales_match", "status": "fail", "value": 9.0, "threshold": None,
                                      "bound": None, "message": ""})
    line = status_summary(m)
    assert "checked here (accuracy, fidelity, latency): tflite, ort, edge;" in line
    assert "lowered, checks not run: coreml" in line and "FAILED: coreml (scales_match)" in line
    m["targets"][2]["device"] = {"name": "orin", "address": "http://orin.local:8765"}  # checked by a device agent
    line = status_summary(m)
    assert "checked here (accuracy, fidelity, latency): tflite, ort;" in line
    assert "checked on the device by its agent: edge (orin at http://orin.local:8765)" in line


def test_terminal_table_speedup_beside_its_fp32_time_and_lowered_is_not_ok():
    text = terminal_table(_manifest(), tty=False)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line and not line.startswith(" ")}
    assert rows["tflite"][-2:] == ["2.30x", "0.460"]  # the runtime's own FP32
    assert rows["edge"][-3:] == ["2.50x", "0.500", "(onnxruntime)"]  # FP32 from another runtime is named
    assert rows["coreml"][2] == "lowered" and "ok" not in rows["coreml"]
    assert SPEEDUP_DEFINITION in text
    assert all(line == line.rstrip() for line in text.splitlines())


def test_markdown_report_has_definition_fp32_columns_and_time_per_stage():
    md = markdown_report(_manifest())
    assert SPEEDUP_DEFINITION in md
    assert "| batch | p50 ms | p90 ms | p99 ms | throughput /s | FP32 p50 ms | FP32 runtime | speed-up |" in md
    assert "| 1 | 0.200 | 0.250 | 0.300 | 5000.0 | 0.460 | tflite | 2.30x |" in md
    assert "## Where the time went" in md and "| calibrate | 1.50 |" in md
    assert "| tflite | 0.10 | 1.00 | 0.10 | 0.50 | 0.40 | 2.10 |" in md
    assert "| coreml | coreml | lowered |" in md
