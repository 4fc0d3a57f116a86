"""TensorRT backend checks that need neither TensorRT nor a GPU: pre-flight lint and op table,
build settings and the trtexec command, option validation, the engine-mismatch refusal, probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import deploykit_tensorrt
from deploykit.backend import CanonicalModel
from deploykit.canonical import CalibrationTable
from deploykit.errors import BackendUnavailable, LoweringError
from deploykit.plugins import Registry
from deploykit.targets import load_targets
from deploykit.testing import imported_by_plugins, make_target
from deploykit_tensorrt import TensorRTBackend, audit, backend as backend_module, device
from deploykit_tensorrt.device import EngineFacts, EngineMismatch, GpuInfo, check_compatible, check_sidecar
from deploykit_tensorrt.settings import build_settings

HAVE_TENSORRT = device.tensorrt_version()[0] is not None


# ----------------------------------------------------------------------------------------------
# a tiny hand-made Q/DQ model (x -> Q -> DQ -> Conv with a per-channel int8 weight) and its breakages
# ----------------------------------------------------------------------------------------------
def tiny_qdq(zero_point: int = 0, bias_dq: bool = False, weight_axis: int = 0, opset: int = 18,
             extra_op: str | None = None, input_shape: tuple = ("N", 3, 8, 8)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    channels = w.shape[weight_axis]
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_qt"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_qt", "x_scale", "x_zp"], ["x_dqt"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq", axis=weight_axis),
    ]
    if bias_dq:
        inits += [numpy_helper.from_array(np.arange(4, dtype=np.int32), "b_q"),
                  numpy_helper.from_array(np.full(4, 2e-4, np.float32), "b_scale"),
                  numpy_helper.from_array(np.zeros(4, np.int32), "b_zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="b_dq", axis=0))
    else:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    nodes.append(helper.make_node("Conv", ["x_dqt", "w", "b"], ["y"], name="conv0", pads=[1, 1, 1, 1]))
    out = "y"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["y"], ["z"], name="odd_node"))
        out = "z"
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def canonical_of(model: onnx.ModelProto, path: Path) -> CanonicalModel:
    onnx.save(model, str(path))
    return CanonicalModel(path, model, CalibrationTable(), path)


PROFILE = {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [16, 3, 8, 8]}}


def lint_check(canonical: CanonicalModel, **options):
    checks, meta = TensorRTBackend().preflight(canonical, make_target(TensorRTBackend, **options))
    return {c.name: c for c in checks}, meta


def test_handmade_model_passes(tmp_path):
    checks, meta = lint_check(canonical_of(tiny_qdq(), tmp_path / "ok.onnx"), profiles=PROFILE)
    assert checks["tensorrt_lint"].status == "pass", checks["tensorrt_lint"].message
    assert "tensorrt_profiles" not in checks
    assert {o["op"] for o in meta["onnx_ops"]} == {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert all(o["supported"] for o in meta["onnx_ops"])


@pytest.mark.parametrize("breakage, node, rule", [
    ({"zero_point": 3}, "x_q", "zero-point"),
    ({"bias_dq": True}, "conv0", "float-bias"),
    ({"bias_dq": True}, "b_dq", "dq-input-type"),
    ({"weight_axis": 1}, "w_dq", "weight-axis"),
    ({"opset": 12}, "tiny", "opset"),
    ({"extra_op": "Unique"}, "odd_node", "not supported by TensorRT's ONNX parser"),
    ({"extra_op": "NotAnOnnxOp"}, "odd_node", "not in TensorRT's ONNX operator table"),
])
def test_violations_are_caught_and_name_the_node(tmp_path, breakage, node, rule):
    checks, _ = lint_check(canonical_of(tiny_qdq(**breakage), tmp_path / "bad.onnx"), profiles=PROFILE)
    lint = checks["tensorrt_lint"]
    assert lint.status == "fail"
    found = lint.details["violations"] + lint.details["unsupported_nodes"]
    assert any(f"'{node}'" in f and rule in f for f in found), found
    assert f"'{node}'" in lint.message


def test_unsupported_op_is_marked_in_the_op_list(tmp_path):
    _, meta = lint_check(canonical_of(tiny_qdq(extra_op="Unique"), tmp_path / "u.onnx"), profiles=PROFILE)
    assert {o["op"]: o["supported"] for o in meta["onnx_ops"]}["Unique"] is False


def test_lower_refuses_custom_domain_op_naming_it(tmp_path):
    model = tiny_qdq()
    model.graph.node.append(helper.make_node("Fancy", ["y"], ["z"], name="plugin_node", domain="acme"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("acme", 1))
    with pytest.raises(LoweringError, match="plugin_node") as exc:
        TensorRTBackend().lower(canonical_of(model, tmp_path / "c.onnx"),
                                make_target(TensorRTBackend, profiles=PROFILE), tmp_path / "c.engine")
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------
# the canonical models of the test suite pass the TensorRT pre-flight
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def canonicals(tmp_path_factory):
    from deploykit.testing import make_canonical

    root = tmp_path_factory.mktemp("canonical")
    return {kind: make_canonical(kind, root / kind) for kind in ("resnet", "mobilenet", "encoder")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_canonical_models_pass_preflight(canonicals, kind):
    canonical = canonicals[kind]
    profiles = {}
    for value in canonical.model.graph.input:
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        profiles[value.name] = {"min": shape, "opt": [4] + shape[1:], "max": [8] + shape[1:]}
    checks, meta = lint_check(canonical, profiles=profiles, batch_sizes=(1, 8))
    assert checks["tensorrt_lint"].status == "pass", checks["tensorrt_lint"].message
    assert "tensorrt_profiles" not in checks
    assert meta["trtexec"].startswith(f"trtexec --onnx={canonical.path} ")
    assert all(o["supported"] for o in meta["onnx_ops"])


# ----------------------------------------------------------------------------------------------
# build settings and the trtexec command
# ----------------------------------------------------------------------------------------------
def _pretend_host(monkeypatch, gpu: GpuInfo | None, version: str | None) -> None:
    """Fix what the pre-flight sees of this host so the command is the same on any machine."""
    monkeypatch.setattr(backend_module, "tensorrt_version", lambda: (version, "" if version else "absent"))
    monkeypatch.setattr(backend_module, "cuda_driver_present", lambda: gpu is not None)
    monkeypatch.setattr(backend_module, "query_gpu", lambda index=0: gpu)
    import deploykit_tensorrt.lowering as lowering

    monkeypatch.setattr(lowering, "parser_supports", lambda path, ops: None)


def test_trtexec_command_for_dynamic_batch_on_jetson(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", "/var/cache/dk")
    _pretend_host(monkeypatch, GpuInfo("Orin", "8.7", "CUDA 12.6", "12.6"), "10.3.0")
    canonical = canonical_of(tiny_qdq(), tmp_path / "model.qdq.onnx")
    target = make_target(TensorRTBackend, name="orin", batch_sizes=(1, 16), profiles=PROFILE, workspace_mib=2048,
                         builder_optimization_level=5, dla_core=0, gpu_fallback=True)
    _, meta = TensorRTBackend().preflight(canonical, target)
    assert meta["trtexec"] == (
        f"trtexec --onnx={tmp_path}/model.qdq.onnx --saveEngine=orin.engine --stronglyTyped "
        "--minShapes=x:1x3x8x8 --optShapes=x:4x3x8x8 --maxShapes=x:16x3x8x8 --memPoolSize=workspace:2048M "
        "--builderOptimizationLevel=5 --hardwareCompatibilityLevel=none --profilingVerbosity=detailed "
        "--useDLACore=0 --allowGPUFallback --timingCacheFile=/var/cache/dk/tensorrt/timing-Orin-sm8.7-trt10.3.0.cache")
    assert meta["profiles"] == PROFILE


def test_trtexec_command_without_gpu_weakly_typed_portable(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", "/c")
    _pretend_host(monkeypatch, None, None)
    model = tiny_qdq()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # static: no shape flags
    canonical = canonical_of(model, tmp_path / "m.onnx")
    target = make_target(TensorRTBackend, name="a100", batch_sizes=(2,), hardware_compatibility_level="ampere_plus",
                         strongly_typed=False, timing_cache=False)
    _, meta = TensorRTBackend().preflight(canonical, target)
    assert meta["trtexec"] == (
        f"trtexec --onnx={tmp_path}/m.onnx --saveEngine=a100.engine --int8 --memPoolSize=workspace:1024M "
        "--builderOptimizationLevel=3 --hardwareCompatibilityLevel=ampere+ --profilingVerbosity=detailed")


def test_timing_cache_is_keyed_by_gpu_and_tensorrt(monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", "/k")
    a = device.timing_cache_path(GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", "550.54", "12.4"), "10.7.0")
    b = device.timing_cache_path(GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", "550.54", "12.4"), "11.0.0")
    assert a == Path("/k/tensorrt/timing-NVIDIA-A100-SXM4-80GB-sm8.0-trt10.7.0.cache") and a != b
    monkeypatch.delenv("DEPLOYKIT_CACHE")
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert device.cache_dir() == Path("/home/u/.cache/deploykit/tensorrt")


def test_batch_only_dynamic_input_gets_a_profile_from_batch_sizes():
    settings = build_settings(tiny_qdq(), make_target(TensorRTBackend, name="gpu", batch_sizes=(2, 1, 8)))
    (profile,) = settings.profiles
    assert (profile.min, profile.opt, profile.max) == ((1, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))


def test_missing_profile_error_names_input_and_keys(tmp_path):
    canonical = canonical_of(tiny_qdq(input_shape=("N", 3, "H", 8)), tmp_path / "m.onnx")
    target = make_target(TensorRTBackend, name="gpu", batch_sizes=(1, 8))
    with pytest.raises(LoweringError) as exc:
        TensorRTBackend().lower(canonical, target, tmp_path / "m.engine")
    msg = str(exc.value)
    assert "input 'x'" in msg and "profiles.x.min" in msg and "profiles.x.opt" in msg and "profiles.x.max" in msg
    assert "[targets.gpu.options]" in msg
    assert "max = [8, 3, N, 8]" in msg  # a profile to paste, batch from the target's batch sizes
    assert not (tmp_path / "m.engine").exists()
    checks, meta = lint_check(canonical)
    assert checks["tensorrt_profiles"].status == "fail" and "profiles.x.min" in checks["tensorrt_profiles"].message
    assert meta["trtexec"] is None


@pytest.mark.parametrize("profile, words", [
    ({"x": {"min": [1, 3, 8, 8], "max": [8, 3, 8, 8]}}, "exactly min, opt, max"),
    ({"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 9, 8]}}, "changes static dimension(s) [2]"),
    ({"x": {"min": [4, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [8, 3, 8, 8]}}, "min <= opt <= max"),
    ({"x": {"min": [1, 3, 8], "opt": [2, 3, 8, 8], "max": [8, 3, 8, 8]}}, "must list 4 positive integers"),
    ({"y": PROFILE["x"]}, "no model input named 'y'"),
    ({"x": {"min": [2, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}, "batch sizes [1]"),
])
def test_bad_profiles_are_explained(tmp_path, profile, words):
    model = tiny_qdq()
    with pytest.raises(LoweringError, match="profiles") as exc:
        build_settings(model, make_target(TensorRTBackend, name="t", batch_sizes=(1, 8), profiles=profile))
    assert words in str(exc.value)


def test_options_validate_through_targets_toml(tmp_path):
    registry = Registry()
    registry.add_plugin(deploykit_tensorrt)
    good = tmp_path / "targets.toml"
    good.write_text("""
[targets.orin]
backend = "tensorrt"
batch_sizes = [1, 8]
[targets.orin.options]
workspace_mib = 512
dla_core = 0
hardware_compatibility_level = "same_compute_capability"
profiles = { x = { min = [1, 3, 8, 8], opt = [8, 3, 8, 8], max = [8, 3, 8, 8] } }
[targets.orin.thresholds]
min_int8_fraction = 0.9
""")
    (target,) = registry.resolve(load_targets(good), ["orin"])
    settings = build_settings(tiny_qdq(), target)
    assert settings.profiles[0].max == (8, 3, 8, 8) and settings.dla_core == 0 and settings.workspace_mib == 512
    assert settings.hardware_compatibility_level == "same_compute_capability" and settings.strongly_typed
    bad = tmp_path / "bad.toml"
    bad.write_text('[targets.t]\nbackend = "tensorrt"\n[targets.t.options]\nhardware_compatibility_level = "turing"\n')
    from deploykit.errors import ConfigError

    with pytest.raises(ConfigError, match="hardware_compatibility_level"):
        registry.resolve(load_targets(bad), ["t"])


# ----------------------------------------------------------------------------------------------
# engines only run on the TensorRT version and GPU family that built them
# ----------------------------------------------------------------------------------------------
ORIN = EngineFacts("10.3.0", "Orin", "8.7", "CUDA 12.6")


def test_sidecar_refuses_other_tensorrt_version(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    device.sidecar_path(engine).write_text(ORIN.to_json())
    with pytest.raises(EngineMismatch) as exc:
        check_sidecar(engine, EngineFacts("10.7.0", "Orin", "8.7", "CUDA 12.6"))
    assert "TensorRT 10.3.0" in str(exc.value) and "TensorRT 10.7.0" in str(exc.value)
    assert isinstance(exc.value, BackendUnavailable)  # the core skips the target with this reason
    assert check_sidecar(engine, ORIN) == ORIN


def test_sidecar_refuses_other_gpu_family(tmp_path):
    with pytest.raises(EngineMismatch, match=r"compute capability 8\.7.*NVIDIA GeForce RTX 4090.*8\.9"):
        check_compatible(ORIN, EngineFacts("10.3.0", "NVIDIA GeForce RTX 4090", "8.9", "550"))
    portable = EngineFacts("10.3.0", "NVIDIA A100", "8.0", "550", "ampere_plus")
    check_compatible(portable, EngineFacts("10.3.0", "NVIDIA GeForce RTX 4090", "8.9", "550"))
    with pytest.raises(EngineMismatch, match="Ampere or newer"):
        check_compatible(portable, EngineFacts("10.3.0", "Tesla T4", "7.5", "550"))
    same_cc = EngineFacts("10.3.0", "NVIDIA A10", "8.6", "550", "same_compute_capability")
    check_compatible(same_cc, EngineFacts("10.3.0", "NVIDIA RTX A6000", "8.6", "550"))
    with pytest.warns(UserWarning, match="timed on the other GPU"):
        check_compatible(EngineFacts("10.3.0", "NVIDIA A10", "8.6", "550"),
                         EngineFacts("10.3.0", "NVIDIA RTX A6000", "8.6", "550"))


def test_engine_without_sidecar_and_broken_sidecar(tmp_path):
    engine = tmp_path / "trtexec.engine"
    assert check_sidecar(engine, ORIN) is None  # built by trtexec: TensorRT checks on deserialisation
    device.sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineMismatch, match="not a valid engine description"):
        check_sidecar(engine, ORIN)


# ----------------------------------------------------------------------------------------------
# the int8 layer audit reads the engine inspector's JSON
# ----------------------------------------------------------------------------------------------
def _layer(name, ptype, ltype, fmt):
    return {"Name": name, "LayerType": ltype, "ParameterType": ptype,
            "Inputs": [{"Name": f"{name}_in", "Dimensions": [1, 16, 8, 8], "Format/Datatype": fmt}],
            "Outputs": [{"Name": f"{name}_out", "Dimensions": [1, 16, 8, 8], "Format/Datatype": fmt}]}


def test_int8_audit_counts_compute_layers_by_input_type():
    info = {"Layers": [
        _layer("x_q", "Scale", "Scale", "Row major linear FP32"),
        _layer("conv0 + relu", "Convolution", "CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format"),
        _layer("conv1 + add", "Convolution", "CaskGemmConvolution", "Channel major Int8 format where channel % 4 == 0"),
        _layer("fc", "Convolution", "CaskConvolution", "Row major linear FP32"),
        _layer("conv0 + relu [profile 1]", "Convolution", "CaskConvolution", "Row major linear FP32"),
        _layer("pool", "Reduce", "CaskPooling", "Row major Int8 format"),
        {"Name": "{ForeignNode[attn]}", "LayerType": "Myelin", "Inputs": [], "Outputs": []},
    ], "Bindings": ["x", "y"]}
    result = audit.int8_audit(json.dumps(info))
    assert result.name == "int8_fraction" and result.status == "info"
    assert result.value == pytest.approx(2 / 3)
    assert result.message.startswith("2 of 3 compute layers run in int8; float: fc (Convolution, fp32)")
    assert result.details["myelin_layers"] == ["{ForeignNode[attn]}"]


def test_int8_audit_needs_detailed_verbosity():
    with pytest.raises(ValueError, match="DETAILED"):
        audit.compute_layers({"Layers": ["conv0", "fc"], "Bindings": []})


# ----------------------------------------------------------------------------------------------
# availability on a machine without TensorRT
# ----------------------------------------------------------------------------------------------
def test_importing_the_plugin_never_imports_tensorrt():
    assert "tensorrt" not in imported_by_plugins()["deploykit_tensorrt"]


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here: the missing-SDK report cannot be seen")
def test_probe_says_tensorrt_is_missing_and_how_to_install(tmp_path):
    backend = TensorRTBackend()
    target = make_target(TensorRTBackend)
    av = backend.probe(target)
    assert not av.can_lower and not av.can_run
    assert "tensorrt Python package is not installed" in av.reason
    if not device.cuda_driver_present():
        assert "CUDA driver" in av.reason and "NVIDIA GPU" in av.reason
    assert "pip install 'deploykit[tensorrt]'" in av.install_hint and "Jetson" in av.install_hint
    info = backend.device_info(target)
    assert info["tensorrt_version"] is None and info["missing"] == av.reason
    canonical = canonical_of(tiny_qdq(), tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        backend.lower(canonical, make_target(TensorRTBackend, profiles=PROFILE), tmp_path / "m.engine")


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here: test_tensorrt_gpu.py runs the full suite")
def test_conformance_suite_reports_why_it_cannot_lower(tmp_path):
    from deploykit.testing.conformance import run_conformance

    report = run_conformance(TensorRTBackend, tmp_path, profiles=PROFILE)
    assert not report.lowered and not report.ran
    assert report.notes == [f"not lowered: {report.availability.reason}"]
    assert "tensorrt" in report.availability.reason
