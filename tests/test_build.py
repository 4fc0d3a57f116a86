"""`deploykit build` end to end with the onnxruntime backend, and every kind of bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit.backend import Availability, Backend
from deploykit.canonical import lint
from deploykit.cli import main
from deploykit.jobs import LocalExecutor
from deploykit.pipeline import BuildOptions, build
from deploykit.plugins import PluginInfo
from deploykit.remote import DeviceRouter

METHODS = ["minmax", "percentile", "entropy", "mse"]


def _build(files, registry, out: Path, **kw):
    opts = BuildOptions(targets=kw.pop("targets", ["onnxruntime"]), out_dir=out, calib=str(files.calib),
                        eval=str(files.eval), baseline=False, **kw)
    return build(files.model, opts, registry)


def _check(target_result, name):
    return next(c for c in target_result.checks if c.name == name)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_digits_cnn_loses_at_most_one_point(method, digits_files, ort_registry, tmp_path):
    result = _build(digits_files, ort_registry, tmp_path / "out", method=method)
    (target,) = result.targets
    assert target.status == "ok", target.reason
    drop = _check(target, "accuracy_drop").value
    acc = _check(target, "accuracy").value
    print(f"\n{method}: FP32 {result.manifest['evaluation']['fp32_accuracy']:.4f} INT8 {acc:.4f} drop {drop * 100:.2f} points")
    assert drop <= 0.01
    assert _check(target, "top1_agreement").value >= 0.97
    assert _check(target, "scales_match").status == "pass"
    # the uint8 rewrite is lossless: the artifact agrees with the canonical model
    assert _check(target, "fidelity_cosine").value > 0.9999
    assert lint(onnx.load(str(result.canonical.path))) == []
    m = result.manifest
    assert m["calibration"]["method"] == method and m["calibration"]["random_data"] is False
    assert m["targets"][0]["artifact"]["sha256"] and m["canonical"]["sha256"]
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_latency_and_manifest_contents(digits_files, ort_registry, tmp_path):
    toml = tmp_path / "targets.toml"
    toml.write_text('[targets.ort]\nbackend = "onnxruntime"\nbatch_sizes = [1, 4]\nruns = 20\nwarmup = 2\n'
                    '[targets.ort.options]\nthreads = 1\n[targets.ort.thresholds]\nmin_top1_agreement = 0.9\n')
    opts = BuildOptions(targets=["ort"], out_dir=tmp_path / "out", targets_file=toml, calib=str(digits_files.calib),
                        eval=str(digits_files.eval), method="minmax")
    result = build(digits_files.model, opts, ort_registry)
    t = result.manifest["targets"][0]
    assert [l["batch_size"] for l in t["latency"]] == [1, 4]
    assert all(l["p50_ms"] > 0 and l["p99_ms"] >= l["p50_ms"] and l["runs"] == 20 for l in t["latency"])
    assert [l["batch_size"] for l in result.manifest["baseline"]["latency"]] == [1, 4]
    top1 = next(c for c in t["checks"] if c["name"] == "top1_agreement")
    assert top1["status"] == "pass" and top1["threshold"] == 0.9
    assert t["options"]["threads"] == 1 and t["device_info"]["onnxruntime"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| ort | onnxruntime | ok |" in report


class _Unavailable(Backend):
    name = "unavailable"

    def probe(self, target):
        return Availability.missing("the vendor SDK is not installed", "pip install vendor-sdk")


class _Broken(Backend):
    name = "broken"
    artifact_suffix = ".bin"

    def probe(self, target):
        return Availability.ready()

    def lower(self, canonical, target, dest):
        raise RuntimeError("lowering exploded")


class _TestBackends:
    import deploykit

    @deploykit.hookimpl
    def deploykit_register_backends(self, register):
        register(_Unavailable)
        register(_Broken)


def test_one_failing_target_never_loses_the_others(digits_files, ort_registry, tmp_path):
    ort_registry.add_plugin(_TestBackends(), PluginInfo("test-backends", "tests"))
    result = _build(digits_files, ort_registry, tmp_path / "out", method="minmax",
                    targets=["unavailable", "broken", "onnxruntime"])
    status = {t.target.name: (t.status, t.reason) for t in result.targets}
    assert status["unavailable"] == ("skipped", "the vendor SDK is not installed (install: pip install vendor-sdk)")
    assert status["broken"] == ("error", "RuntimeError: lowering exploded")
    assert status["onnxruntime"][0] == "ok"
    assert not result.ok
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [t["status"] for t in manifest["targets"]] == ["skipped", "error", "ok"]
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_random_data_is_loud(digits_files, ort_registry, tmp_path):
    opts = BuildOptions(targets=["onnxruntime"], out_dir=tmp_path / "out", method="minmax", baseline=False)
    with pytest.warns(UserWarning, match="calibrated on random data"):
        result = build(digits_files.model, opts, ort_registry)
    assert result.manifest["calibration"]["random_data"] is True
    assert "calibrated on random data" in (tmp_path / "out" / "report.md").read_text()
    meta = {p.key: p.value for p in result.canonical.model.metadata_props}
    assert meta["deploykit.calibrated_on_random_data"] == "true"


# --------------------------------------------------------------------------------------
# the CLI: bad input is one line, a non-zero exit, and no partial artifact
# --------------------------------------------------------------------------------------
def _cli(args, capsys, monkeypatch, cwd: Path):
    monkeypatch.chdir(cwd)
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("calibrating", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("deploykit: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _no_artifacts(out: Path) -> None:
    assert not out.exists(), list(out.rglob("*"))


def _write_bad_data(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.npz"
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    if name == "shape":
        np.savez(path, x=x[:, :, :4])
    elif name == "dtype":
        np.savez(path, x=(x * 10).astype(np.int32))
    elif name == "input_name":
        np.savez(path, image=x, other=x)
    elif name == "nan":
        x[3, 0, 2, 2] = np.nan
        np.savez(path, x=x)
    elif name == "inf":
        x[0, 0, 0, 0] = np.inf
        np.savez(path, x=x)
    return path


@pytest.mark.parametrize("case, needles", [
    ("shape", ["shape.npz", "input 'x'", "shape"]),
    ("dtype", ["dtype.npz", "input 'x'", "int32"]),
    ("input_name", ["input_name.npz", "['image', 'other']", "['x']"]),
    ("nan", ["nan.npz", "input 'x'", "NaN/Inf"]),
    ("inf", ["inf.npz", "input 'x'", "NaN/Inf"]),
])
def test_bad_calibration_data(case, needles, digits_files, tmp_path, capsys, monkeypatch):
    data = _write_bad_data(tmp_path, case)
    code, _, err = _cli(["build", digits_files.model, "-t", "onnxruntime", "--calib", data, "--out", tmp_path / "out"],
                        capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, *needles)
    _no_artifacts(tmp_path / "out")


def test_empty_image_folder(digits_files, tmp_path, capsys, monkeypatch):
    (tmp_path / "images" / "cats").mkdir(parents=True)
    code, _, err = _cli(["build", digits_files.model, "-t", "onnxruntime", "--calib", tmp_path / "images",
                         "--out", tmp_path / "out"], capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "images", "no images found")
    _no_artifacts(tmp_path / "out")


@pytest.mark.parametrize("case", ["missing", "corrupt", "directory"])
def test_bad_model_file(case, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model.onnx"
    if case == "corrupt":
        model.write_bytes(b"\x08\x07this is not protobuf" * 10)
    elif case == "directory":
        model.mkdir()
    code, _, err = _cli(["build", model, "-t", "onnxruntime", "--out", tmp_path / "out"], capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "model.onnx")
    _no_artifacts(tmp_path / "out")


def test_external_data_outside_folder(tmp_path, capsys, monkeypatch):
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (tmp_path / "models").mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    init = model.graph.initializer[0]
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "../secret.bin", "offset": "0", "length": "16"}.items():
        init.external_data.add(key=k, value=v)
    onnx.save(model, str(tmp_path / "models" / "m.onnx"))
    code, _, err = _cli(["build", tmp_path / "models" / "m.onnx", "-t", "onnxruntime", "--out", tmp_path / "out"],
                        capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "m.onnx", "tensor 'w'", "outside the model's folder")
    _no_artifacts(tmp_path / "out")


@pytest.mark.parametrize("toml, needles", [
    ('[targets.a\nbackend = "onnxruntime"\n', ["targets.toml", "not valid TOML"]),
    ('[targets.a]\nbackend = "onnxruntime"\ncolour = "red"\n', ["targets.toml", "[targets.a]", "'colour'"]),
    ('[targets.a]\nbackend = "onnxruntime"\n[targets.a.options]\nthreads = "two"\n',
     ["targets.toml", "[targets.a.options]", "'threads'"]),
    ('[targets.a]\nbackend = "nonesuch"\n', ["targets.toml", "[targets.a]", "'backend'", "nonesuch"]),
])
def test_bad_targets_file(toml, needles, digits_files, tmp_path, capsys, monkeypatch):
    (tmp_path / "targets.toml").write_text(toml)
    code, _, err = _cli(["build", digits_files.model, "-t", "a", "--out", tmp_path / "out"], capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, *needles)
    _no_artifacts(tmp_path / "out")


def test_unknown_target(digits_files, tmp_path, capsys, monkeypatch):
    code, _, err = _cli(["build", digits_files.model, "-t", "onnxruntime,jetson-nano", "--out", tmp_path / "out"],
                        capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "unknown target 'jetson-nano'", "backends:")
    _no_artifacts(tmp_path / "out")


def test_output_folder_with_foreign_files_is_left_alone(digits_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = _cli(["build", digits_files.model, "-t", "onnxruntime", "--calib", digits_files.calib,
                         "--out", out], capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "out", "thesis.tex", "did not write")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_rebuild_into_own_output_and_failed_threshold_exit_code(digits_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["build", digits_files.model, "-t", "onnxruntime", "--calib", digits_files.calib, "--eval",
            digits_files.eval, "--method", "minmax", "--out", out, "--no-baseline"]
    code, stdout, _ = _cli(args, capsys, monkeypatch, tmp_path)
    assert code == 0 and "onnxruntime" in stdout
    # a second build may overwrite what deploykit wrote; a failing threshold exits 1 and still writes
    (tmp_path / "targets.toml").write_text('[targets.onnxruntime]\nbackend = "onnxruntime"\nruns = 5\n'
                                           '[targets.onnxruntime.thresholds]\nmax_latency_p50_ms = 0.000001\n')
    code, stdout, err = _cli(args + ["--json"], capsys, monkeypatch, tmp_path)
    assert code == 1
    manifest = json.loads(stdout)
    assert manifest["targets"][0]["status"] == "failed"
    assert "latency_p50_ms" in manifest["targets"][0]["reason"]
    assert json.loads((out / "manifest.json").read_text())["targets"][0]["status"] == "failed"
    _one_line_error(err, "failed checks")


@pytest.mark.slow
def test_python_api_builds_from_a_torch_module(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import deploykit
    from deploykit.testing.models import resnet_cnn

    monkeypatch.setenv("DEPLOYKIT_DISABLE_PLUGINS", "openvino,tflite,coreml,tensorrt")
    torch.manual_seed(0)
    calib = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    result = deploykit.build(resnet_cnn(), "onnxruntime", example_inputs=(torch.from_numpy(calib[:2]),),
                             input_names=["x"], calib=lambda: [{"x": calib}], method="minmax",
                             out_dir=tmp_path / "out", baseline=False)
    assert result.ok and result.targets[0].status == "ok"
    assert (tmp_path / "out" / "source.onnx").is_file() and "source.onnx" in result.manifest["files"]
    assert lint(onnx.load(str(result.canonical.path))) == []  # the manifest no longer carries an always-empty list


def test_remote_device_is_lowered_here_and_its_unreachable_agent_named_not_faked(digits_files, ort_registry,
                                                                                 tmp_path, monkeypatch):
    """A device with an address is checked by its agent (tests/test_agent.py); when the agent
    cannot be reached the target is an error naming the address, with its artifact kept."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DK_EDGE_TOKEN", "edge-token-0123456789")
    toml = tmp_path / "targets.toml"
    toml.write_text(f'[devices.edge]\nkind = "cpu"\naddress = "127.0.0.1:{port}"\ntoken_env = "DK_EDGE_TOKEN"\n'
                    '[targets.edge-ort]\nbackend = "onnxruntime"\ndevice = "edge"\n')
    opts = BuildOptions(targets=["edge-ort"], out_dir=tmp_path / "out", targets_file=toml,
                        calib=str(digits_files.calib), method="minmax", baseline=False)
    (t,) = build(digits_files.model, opts, ort_registry, DeviceRouter(LocalExecutor(ort_registry), retries=1,
                                                                       backoff=0.01)).targets
    assert t.status == "error" and t.artifact is not None and t.artifact.path.is_file()
    assert f"device 'edge' (http://127.0.0.1:{port}) unreachable: connection refused" in t.reason
    assert all(c.name == "scales_match" for c in t.checks) and t.latency == []  # nothing measured, nothing made up


def test_a_build_that_stops_midway_can_reuse_its_folder(digits_files, ort_registry, tmp_path, monkeypatch):
    import deploykit.pipeline as pipeline
    from deploykit.errors import BuildFault

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "_reference_outputs", crash)
    with pytest.raises(BuildFault, match="while computing the reference outputs: RuntimeError: power cut"):
        _build(digits_files, ort_registry, out, method="minmax")
    assert not (out / "manifest.json").exists()  # nothing published, the calibration step journaled
    monkeypatch.undo()
    events = []
    result = _build(digits_files, ort_registry, out, method="minmax", on_event=events.append)
    assert any("calibration kept" in e for e in events)
    assert result.ok and "canonical.qdq.onnx" in result.manifest["files"]
    # a later build with another target replaces the folder's contents: exactly what its manifest lists
    ort_registry.add_plugin(_TestBackends(), PluginInfo("test-backends", "tests"))
    result = _build(digits_files, ort_registry, out, method="minmax", targets=["unavailable"])
    assert "onnxruntime/onnxruntime.onnx" not in result.manifest["files"]
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".deploykit" not in p.parts)
    assert on_disk == result.manifest["files"]


@pytest.mark.slow
def test_speedup_is_against_fp32_on_the_same_runtime(digits_files, tmp_path):
    pytest.importorskip("openvino", reason="needs openvino: pip install 'deploykit[openvino]'")
    from deploykit.plugins import load_registry

    toml = tmp_path / "targets.toml"
    toml.write_text('[defaults]\nruns = 10\nwarmup = 2\n[targets.ov]\nbackend = "openvino"\n'
                    '[targets.ov.thresholds]\nmin_speedup = 0.000001\n')
    opts = BuildOptions(targets=["ov", "onnxruntime"], out_dir=tmp_path / "out", targets_file=toml,
                        calib=str(digits_files.calib), method="minmax")
    result = build(digits_files.model, opts, load_registry())
    ov, ort_ = (t.latency[0].to_json() for t in result.targets)
    assert ov["speedup_vs"] == "openvino fp32" and ov["fp32_p50_ms"] > 0
    assert ov["speedup"] == pytest.approx(ov["fp32_p50_ms"] / ov["p50_ms"])
    assert ort_["speedup_vs"] == "onnxruntime fp32"  # the reference row is onnxruntime itself
    speedup = next(c for c in result.targets[0].checks if c.name == "speedup")
    assert speedup.status == "pass" and speedup.threshold == 0.000001


@pytest.mark.slow
def test_transformer_encoder_as_other_task(ort_registry, tmp_path):
    pytest.importorskip("torch")
    from deploykit.testing import exported_onnx
    from deploykit.testing.models import encoder_inputs

    model = exported_onnx("encoder", tmp_path / "encoder.onnx")
    np.savez(tmp_path / "calib.npz", **encoder_inputs(64, seed=0))
    np.savez(tmp_path / "eval.npz", **encoder_inputs(64, seed=1))
    toml = tmp_path / "targets.toml"
    toml.write_text('[targets.ort]\nbackend = "onnxruntime"\nruns = 5\n'
                    '[targets.ort.thresholds]\nmin_top1_agreement = 0.99\nmin_cosine = 0.99\n')
    opts = BuildOptions(targets=["ort"], out_dir=tmp_path / "out", targets_file=toml, calib=str(tmp_path / "calib.npz"),
                        eval=str(tmp_path / "eval.npz"), method="minmax", baseline=False, task="other")
    result = build(model, opts, ort_registry)
    (t,) = result.targets
    checks = {c.name: c for c in t.checks}
    assert t.status == "ok", t.reason
    assert checks["cosine"].status == "pass" and checks["cosine"].value > 0.99
    assert checks["top1_agreement"].status == "not_run" and "not a classification task" in checks["top1_agreement"].message
    assert result.manifest["evaluation"]["classification"] is False


def test_unknown_task_fails_before_any_work(digits_files, tmp_path, capsys, monkeypatch):
    code, _, err = _cli(["build", digits_files.model, "-t", "onnxruntime", "--task", "segmentation",
                         "--out", tmp_path / "out"], capsys, monkeypatch, tmp_path)
    assert code == 2
    _one_line_error(err, "segmentation", "--task")
    _no_artifacts(tmp_path / "out")
