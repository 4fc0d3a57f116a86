"""The OpenVINO backend against the real OpenVINO runtime: lowering, scale verification,
precision audit, runner fidelity, probe and error messages."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ov = pytest.importorskip("openvino")
ort = pytest.importorskip("onnxruntime")

from deploykit.backend import CanonicalModel, precision_audit  # noqa: E402
from deploykit.canonical import COMPUTE_OPS, CalibrationTable  # noqa: E402
from deploykit.cpu import u8s8_saturates  # noqa: E402
from deploykit.errors import BackendUnavailable, ConfigError, LoweringError  # noqa: E402
from deploykit.ortsession import session  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.targets import Device, Target  # noqa: E402
from deploykit.testing import eval_feeds, imported_by_plugins, make_canonical, make_target  # noqa: E402
from deploykit_openvino import OpenVINOBackend  # noqa: E402
from deploykit_openvino.backend import compile_config  # noqa: E402
from deploykit_openvino.verify import runtime_layers, verify_scales  # noqa: E402

CNNS = ("resnet", "mobilenet", "digits")
#: Measured: OpenVINO INT8 vs the canonical model in onnxruntime is 0.01-1% relative L2 on these
#: models (docs/toolchain-facts.md: ~0.7-1.1% elsewhere); 3% leaves room without hiding a wrong scale (>10%).
FIDELITY_REL_L2 = 0.03


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def backend() -> OpenVINOBackend:
    return OpenVINOBackend()


@pytest.fixture(scope="module")
def target() -> Target:
    return make_target(OpenVINOBackend)


@pytest.fixture(scope="module")
def lowered(workdir, backend, target):
    """kind -> (canonical, artifact), each built and lowered once per module."""
    cache: dict[str, tuple[CanonicalModel, object]] = {}

    def get(kind: str):
        if kind not in cache:
            canonical = make_canonical(kind, workdir / kind)
            cache[kind] = canonical, backend.lower(canonical, target, workdir / kind / "out" / f"{kind}.xml")
        return cache[kind]

    return get


def check(artifact, name: str):
    return next(c for c in artifact.checks if c.name == name)


# -- lowering -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_lower_writes_ir_pair_and_keeps_scales(lowered, kind):
    canonical, artifact = lowered(kind)
    xml, binary = artifact.path, artifact.path.with_suffix(".bin")
    assert artifact.files == (xml, binary)
    assert xml.is_file() and binary.is_file()
    assert sorted(p.name for p in xml.parent.iterdir()) == sorted([xml.name, binary.name])  # no temp left
    scales = check(artifact, "scales_match")
    assert scales.status == "pass", scales.message
    n_q = sum(n.op_type == "QuantizeLinear" for n in canonical.model.graph.node)
    assert scales.details["activation_quantizers"] == n_q > 0
    assert scales.details["weights"] > 0
    # int8 weights stay int8 and the float parts stay f32 (no fp16 compression in the IR)
    ir = ov.Core().read_model(xml)
    const_types = {str(op.get_output_element_type(0)) for op in ir.get_ordered_ops() if op.get_type_name() == "Constant"}
    assert "<Type: 'int8_t'>" in const_types and "<Type: 'float16'>" not in const_types


@pytest.mark.slow
@pytest.mark.parametrize("kind", CNNS)
def test_audit_every_conv_and_fc_of_cnns_runs_int8(lowered, kind):
    canonical, artifact = lowered(kind)
    audit = check(artifact, "int8_fraction")
    n_compute = sum(n.op_type in COMPUTE_OPS for n in canonical.model.graph.node)
    assert audit.details["compute_layers"] == n_compute
    assert audit.value == 1.0, audit.message
    assert audit.message == f"{n_compute} of {n_compute} compute layers run in int8"


@pytest.mark.slow
def test_audit_encoder_fully_connected_layers_run_int8(lowered):
    canonical, artifact = lowered("encoder")
    audit = check(artifact, "int8_fraction")
    assert audit.details["compute_layers"] == sum(n.op_type in COMPUTE_OPS for n in canonical.model.graph.node)
    # weight MatMuls become FullyConnected; none of them may be left in float
    assert not [f for f in audit.details["float_layers"] if f["type"] == "FullyConnected"], audit.message
    assert audit.value >= 8 / 12, audit.message


@pytest.mark.slow
def test_audit_reports_float_layers(lowered):
    """The same audit on the FP32 model compiled with f32: every compute layer is float."""
    canonical, _ = lowered("resnet")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(canonical.fp32_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    fp32_proto = onnx.load(str(canonical.fp32_path))
    audit = precision_audit(runtime_layers(compiled.get_runtime_model(), fp32_proto))
    n_compute = sum(n.op_type in COMPUTE_OPS for n in fp32_proto.graph.node)
    assert audit.value == 0.0
    assert len(audit.details["float_layers"]) == n_compute
    assert {f["precision"] for f in audit.details["float_layers"]} == {"f32"}


@pytest.mark.slow
def test_scale_check_fails_on_a_different_scale(lowered):
    canonical, artifact = lowered("resnet")
    ir = ov.Core().read_model(artifact.path)
    changed = copy.deepcopy(canonical.model)
    inits = {i.name: i for i in changed.graph.initializer}
    q = next(n for n in changed.graph.node if n.op_type == "QuantizeLinear")
    inits[q.input[1]].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[q.input[1]]) * np.float32(1.01),
                                                       q.input[1]))
    w_dq = next(n for n in changed.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).copy()
    w_scale[0] *= np.float32(1.5)
    inits[w_dq.input[1]].CopyFrom(numpy_helper.from_array(w_scale, w_dq.input[1]))
    result = verify_scales(ir, changed)
    assert result.status == "fail"
    text = " ".join(result.details["mismatches"])
    assert q.name in text and w_dq.name in text


# -- layer by layer -----------------------------------------------------------------------
def _layer_report(backend, target, canonical, artifact, name: str = "openvino"):
    from deploykit import layers

    cut = layers.find_cut(canonical.model)
    batches = [eval_feeds("mobilenet", 16, seed=s) for s in (1, 2)]
    runner = backend.layer_runner(artifact, canonical, target, cut)
    try:
        return cut, layers.compare_layers(name, canonical.model, runner, batches, cut)
    finally:
        runner.close()


@pytest.mark.slow
def test_layer_runner_runs_the_ir_layer_by_layer(lowered, backend, target, workdir):
    """Every canonical int8 tensor is found in the saved IR and compared, with scales right on every
    layer (gain 1). With overflow_fix = "all" no conv can saturate, so every layer is exact or one
    step off on any CPU; with the default, a CPU without VNNI may put the unsplit convs beyond
    rounding (EfficientNet-Lite0 here: its 1x1 convs)."""
    canonical, artifact = lowered("mobilenet")
    cut, report = _layer_report(backend, target, canonical, artifact)
    assert report.not_compared == [] and len(report.layers) == len(cut)
    assert not [r for r in report.layers if r.verdict == "wrong_scale"], report.summary()
    assert all(abs(r.gain - 1) < 0.02 for r in report.layers)
    if not u8s8_saturates():
        assert all(r.verdict in ("exact", "rounding") for r in report.layers), report.summary()
    split_target = make_target(OpenVINOBackend, overflow_fix="all")
    split = backend.lower(canonical, split_target, workdir / "split" / "mobilenet.xml")
    _, split_report = _layer_report(backend, split_target, canonical, split)
    assert all(r.verdict in ("exact", "rounding") for r in split_report.layers), split_report.summary()


@pytest.mark.slow
def test_layer_runner_finds_a_wrong_scale_written_into_the_ir(lowered, backend, target, workdir):
    """A FakeQuantize whose input range is 1.25x the canonical one, written into the .xml: the
    per-layer comparison of the IR names that layer (the old runner compiled the canonical model,
    so it could not see a fault of the artifact)."""
    import dataclasses

    import openvino.opset13 as ops

    from deploykit import layers

    canonical, artifact = lowered("mobilenet")
    cut = layers.find_cut(canonical.model)
    producers = {n.output[0]: n for n in canonical.model.graph.node}
    victim = cut.tensors[3]
    q_input = producers[victim.name].input[0]
    ir = ov.Core().read_model(artifact.path)
    fq = next(op for op in ir.get_ordered_ops()
              if op.get_type_name() == "FakeQuantize" and q_input in op.input_value(0).get_names())
    for i in (1, 2):
        value = np.array(fq.input_value(i).get_node().get_data()) * np.float32(1.25)
        fq.input(i).replace_source_output(ops.constant(value.astype(np.float32)).output(0))
    broken = workdir / "broken" / "mobilenet.xml"
    broken.parent.mkdir(exist_ok=True)
    ov.save_model(ir, broken, compress_to_fp16=False)
    bad = dataclasses.replace(artifact, path=broken, files=(broken, broken.with_suffix(".bin")))
    _, report = _layer_report(backend, target, canonical, bad, "broken")
    flagged = {r.tensor: r for r in report.layers if r.verdict == "wrong_scale"}
    assert list(flagged) == [victim.name], report.summary()
    assert abs(flagged[victim.name].gain - 0.8) < 0.03


# -- running ------------------------------------------------------------------------------
def skip_exactness_without_vnni(artifact) -> None:
    """On x86 without VNNI OpenVINO's u8 x s8 kernels saturate (measured 14% relative L2 on the
    ResNet-style model): the lowering must say so; the tolerance needs a VNNI CPU."""
    if u8s8_saturates():
        assert "int8_saturation" in {c.name for c in artifact.checks}
        pytest.skip("this CPU has no VNNI: OpenVINO's int8 kernels saturate here (reported by the "
                    "int8_saturation check); the fidelity tolerance is checked on VNNI CPUs")


@pytest.mark.slow
def test_snippets_disable_runs_each_op_alone(lowered, backend, target):
    canonical, artifact = lowered("encoder")
    assert compile_config({"snippets": "disable"})["SNIPPETS_MODE"] == "DISABLE"
    assert "SNIPPETS_MODE" not in compile_config({"snippets": "default"})
    runner = backend.load(artifact, replace(target, options={**target.options, "snippets": "disable"}))
    feeds = eval_feeds("encoder", 1)
    out = runner.run(feeds)[0]
    layers = {op.get_rt_info()["layerType"].astype(str)
              for op in runner.compiled_models()[0].get_runtime_model().get_ordered_ops()}
    assert "Subgraph" not in layers  # no fused subgraph left: the option reached the CPU plugin
    if not u8s8_saturates():
        np.testing.assert_allclose(out, session(canonical.path, exact=True).run(None, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "mobilenet", "encoder"])
def test_runner_matches_canonical_in_onnxruntime_at_any_batch(lowered, backend, target, kind):
    canonical, artifact = lowered(kind)
    runner = backend.load(artifact, target)
    reference = session(canonical.path, exact=True)
    feeds = eval_feeds(kind, 8)
    got = runner.run(feeds)
    want = reference.run(None, feeds)
    assert len(got) == len(want) == len(canonical.model.graph.output)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if not u8s8_saturates():
            assert rel_l2(g, w) < FIDELITY_REL_L2, f"{kind}: relative L2 {rel_l2(g, w):.4f}, max abs {np.abs(g - w).max():.4g}"
    for batch in (1, 3):  # the dynamic batch dim: other sizes compile on first use
        part = {k: v[:batch] for k, v in feeds.items()}
        out = runner.run(part)[0]
        assert out.shape[0] == batch
        if kind == "encoder" and not np.allclose(out, got[0][:batch], rtol=1e-4, atol=1e-4):
            # OpenVINO 2026.4 on an AVX-512 + AMX Xeon: this encoder's fused attention (snippets) is
            # wrong at batch 1 (relative L2 0.94 from the canonical model); the option's workaround
            # must compute it exactly, then the upstream defect is reported as such, not hidden
            plain = backend.load(artifact, replace(target, options={**target.options, "snippets": "disable"}))
            np.testing.assert_allclose(plain.run(part)[0], reference.run(None, part)[0], rtol=1e-4, atol=1e-4)
            pytest.xfail(f"OpenVINO {backend.probe(target).versions.get('openvino')}: fused attention "
                         f"(snippets) departs from the canonical model at batch {batch} on this CPU; "
                         f"snippets='disable' computes it exactly")
        np.testing.assert_allclose(out, got[0][:batch], rtol=1e-4, atol=1e-4)
    skip_exactness_without_vnni(artifact)


@pytest.mark.slow
def test_digits_top1_agreement_and_fidelity(lowered, backend, target):
    canonical, artifact = lowered("digits")
    runner = backend.load(artifact, target)
    feeds = eval_feeds("digits", 10_000)  # every held-out image
    n = len(feeds["x"])
    assert n > 300
    got = np.concatenate([runner.run({"x": feeds["x"][i:i + 64]})[0] for i in range(0, n, 64)])
    fp32 = session(canonical.fp32_path, exact=False).run(None, feeds)[0]
    qdq = run_canonical(canonical.path, feeds)[0]
    agreement = float((got.argmax(1) == fp32.argmax(1)).mean())
    fidelity_rel_l2, fidelity_max_abs = rel_l2(got, qdq), float(np.abs(got - qdq).max())
    print(f"digits: top-1 agreement {agreement:.4f} on {n}; vs canonical in onnxruntime: "
          f"relative L2 {fidelity_rel_l2:.4f}, max abs {fidelity_max_abs:.4f}")
    skip_exactness_without_vnni(artifact)
    assert agreement >= 0.99
    assert fidelity_rel_l2 < FIDELITY_REL_L2
    assert fidelity_max_abs < 0.1 * float(np.abs(qdq).max())


@pytest.mark.slow
def test_runner_uses_real_f32_for_float_parts(lowered, backend, target):
    _, artifact = lowered("resnet")
    runner = backend.load(artifact, target)
    runner.run(eval_feeds("resnet", 1))
    (compiled,) = runner.compiled_models()
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert artifact.metadata["compiled_inference_precision"] == "f32"


def test_default_precision_on_this_cpu_is_not_f32():
    """Why the f32 default exists: without the hint this CPU would run float parts in bf16."""
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no BF16: its default inference precision is already f32")
    assert core.get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16


def test_runner_rejects_wrong_static_dims(lowered, backend, target):
    _, artifact = lowered("resnet")
    runner = backend.load(artifact, target)
    with pytest.raises(ValueError, match="input 'x'"):
        runner.run({"x": np.zeros((1, 1, 9, 9), np.float32)})
    with pytest.raises(KeyError):
        runner.run({"y": np.zeros((1, 1, 8, 8), np.float32)})


@pytest.mark.slow
def test_conformance_suite(lowered, workdir):
    from deploykit.testing.conformance import run_conformance

    canonical, _ = lowered("resnet")
    report = run_conformance(OpenVINOBackend, workdir / "conformance", canonical=canonical)
    assert report.lowered and report.ran, report.notes
    assert "conformance_unsupported" in report.unsupported_error


# -- probe, devices, options, errors -----------------------------------------------------
def test_importing_the_plugin_does_not_import_openvino():
    assert "openvino" not in imported_by_plugins()["deploykit_openvino"], "openvino imported"


def test_probe_reports_missing_openvino(monkeypatch, backend, target):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    av = backend.probe(target)
    assert not av.can_lower and not av.can_run
    assert av.install_hint == "pip install 'deploykit[openvino]'"
    assert "openvino" in av.reason
    with pytest.raises(BackendUnavailable, match=r"deploykit\[openvino\]"):
        backend.device_info(target)


def test_probe_and_device_info_on_cpu(backend, target):
    av = backend.probe(target)
    assert av.can_lower and av.can_run and av.versions["openvino"] == ov.get_version()
    info = backend.device_info(target)
    assert info["device"] == "CPU" and info["openvino"] == ov.get_version()
    assert info["full_device_name"] == ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert "INT8" in info["optimization_capabilities"]


@pytest.mark.parametrize("make", [
    lambda: make_target(OpenVINOBackend, device_name="NO_SUCH_DEVICE"),
    lambda: Target("gpu-box", "openvino", Device("box", "no_such_kind"), dict(make_target(OpenVINOBackend).options)),
])
def test_unknown_device_lists_available_devices(backend, make):
    t = make()
    available = ", ".join(ov.Core().available_devices)
    av = backend.probe(t)
    assert av.can_lower and not av.can_run
    assert "NO_SUCH" in av.reason.upper() and f"available devices: {available}" in av.reason
    with pytest.raises(BackendUnavailable, match=f"available devices: {available}"):
        backend.load(None, t)


@pytest.mark.slow
def test_lower_for_absent_device_still_verifies_scales(lowered, backend, workdir):
    canonical, _ = lowered("resnet")
    t = make_target(OpenVINOBackend, device_name="NO_SUCH_DEVICE")
    artifact = backend.lower(canonical, t, workdir / "absent" / "resnet.xml")
    assert check(artifact, "scales_match").status == "pass"
    audit = check(artifact, "int8_fraction")
    assert audit.status == "not_run" and audit.value is None and "NO_SUCH_DEVICE" in audit.message


@pytest.mark.hardware
@pytest.mark.parametrize("device", ["GPU", "NPU"])
def test_lower_and_run_on_accelerator(lowered, backend, workdir, device):
    available = ov.Core().available_devices
    if not any(d.split(".")[0] == device for d in available):
        pytest.skip(f"no OpenVINO {device} device here (available: {', '.join(available)})")
    canonical, _ = lowered("resnet")
    t = make_target(OpenVINOBackend, device_name=device)
    artifact = backend.lower(canonical, t, workdir / device / "resnet.xml")
    assert check(artifact, "scales_match").status == "pass"
    assert check(artifact, "int8_fraction").status == "info"
    feeds = eval_feeds("resnet", 4)
    got = backend.load(artifact, t).run(feeds)[0]
    want = run_canonical(canonical.path, feeds)[0]
    assert rel_l2(got, want) < FIDELITY_REL_L2


def test_unreadable_op_names_node_and_op(tmp_path, backend, target):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("FancyOp", ["r"], ["y"], name="my_fancy_node", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    canonical = CanonicalModel(path, model, CalibrationTable(), path)
    dest = tmp_path / "out" / "bad.xml"
    with pytest.raises(LoweringError, match=r"node 'my_fancy_node' \(op com\.example\.FancyOp\)"):
        backend.lower(canonical, target, dest)
    assert not dest.exists() and not dest.with_suffix(".bin").exists()


def test_options_map_to_openvino_properties():
    from deploykit_openvino.backend import compile_config

    t = make_target(OpenVINOBackend, performance_hint="throughput", num_threads=2, num_streams=1)
    assert compile_config(t.options) == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 2,
                                         "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    assert "INFERENCE_PRECISION_HINT" not in compile_config({"inference_precision": "default"})


def test_targets_toml_validates_options_and_int8_threshold(tmp_path):
    import deploykit_openvino
    from deploykit.plugins import Registry
    from deploykit.targets import load_targets

    registry = Registry()
    registry.add_plugin(deploykit_openvino)
    assert registry.backends["openvino"] is OpenVINOBackend
    good = tmp_path / "good.toml"
    good.write_text('[targets.ov]\nbackend = "openvino"\n[targets.ov.options]\nperformance_hint = "throughput"\n'
                    'num_threads = 2\n[targets.ov.thresholds]\nmin_int8_fraction = 0.9\n')
    (t,) = registry.resolve(load_targets(good), ["ov"])
    assert t.options["performance_hint"] == "throughput" and t.options["inference_precision"] == "f32"
    assert t.thresholds == {"min_int8_fraction": 0.9}
    bad = tmp_path / "bad.toml"
    bad.write_text('[targets.ov]\nbackend = "openvino"\n[targets.ov.options]\nperformance_hint = "fastest"\n')
    with pytest.raises(ConfigError, match="performance_hint"):
        registry.resolve(load_targets(bad), ["ov"])


@pytest.mark.parametrize("device, available, missing", [
    ("CPU", ["CPU"], []),
    ("GPU", ["CPU", "GPU.0", "GPU.1"], []),
    ("GPU.1", ["CPU", "GPU.0"], ["GPU.1"]),
    ("AUTO", ["CPU"], []),
    ("AUTO:GPU,CPU", ["CPU"], ["GPU"]),
    ("BATCH:GPU(4)", ["GPU.0"], []),
    ("NPU", ["CPU"], ["NPU"]),
])
def test_device_names_are_matched_against_available_devices(device, available, missing):
    from deploykit_openvino.backend import missing_devices

    assert missing_devices(device, available) == missing
