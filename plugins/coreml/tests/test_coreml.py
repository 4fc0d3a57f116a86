"""Core ML backend: lowering to .mlpackage on any OS, read-back verification of every stored int8
weight and scale, the lowered program's meaning (evaluated with a reference interpreter, since
Linux has no Core ML runtime), errors, and the macOS-only runner."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("coremltools", reason="the Core ML backend needs it (pip install 'deploykit[coreml]')")
skip_unless_installed("torch", reason="the test models need torch (pip install torch==2.13.0)")

from deploykit.errors import BackendUnavailable, ConfigError, LoweringError  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.testing import eval_feeds, imported_by_plugins, make_canonical, make_target  # noqa: E402
from deploykit_coreml import CoreMLBackend, lowering, verify  # noqa: E402
from deploykit_coreml.runner import MACOS_ONLY  # noqa: E402

KINDS = ("resnet", "mobilenet", "encoder")
ON_MACOS = sys.platform == "darwin"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coreml")


@pytest.fixture(scope="module")
def canonicals(workdir):
    return {kind: make_canonical(kind, workdir / "canonical" / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def artifacts(canonicals, workdir):
    """Each model lowered once with the default options (iOS17, fp16)."""
    backend = CoreMLBackend()
    target = make_target(CoreMLBackend, batch_sizes=(1, 4))
    return {kind: backend.lower(c, target, workdir / "out" / f"{kind}.mlpackage") for kind, c in canonicals.items()}


def _mil_reference():
    """The test-only MIL interpreter next to this file (pytest runs with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("coreml_mil_reference", Path(__file__).with_name("mil_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(artifact, name):
    return next(c for c in artifact.checks if c.name == name)


def _qdq_counts(model: onnx.ModelProto) -> tuple[int, int]:
    inits = {i.name for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return len(weights), len(qdq)


# ---------------------------------------------------------------------------------------
# lowering and verification
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_lowers_to_mlpackage_keeping_every_weight_and_scale(kind, artifacts, canonicals):
    artifact = artifacts[kind]
    package = artifact.path
    assert package.is_dir() and package.suffix == ".mlpackage"
    assert (package / "Manifest.json").is_file()
    assert (verify.weights_dir(package) / "model.mlmodel").is_file()
    assert (verify.weights_dir(package) / "weights" / "weight.bin").is_file()
    assert set(artifact.files) == {p for p in package.rglob("*") if p.is_file()}
    assert not [p for p in package.parent.iterdir() if ".tmp-" in p.name]

    check = _check(artifact, "scales_match")
    n_weights, n_qdq = _qdq_counts(canonicals[kind].model)
    assert check.status == "pass", check.message
    assert check.details["mismatch_count"] == 0 and check.details["mismatches"] == []
    assert check.details["weights_compared"] == n_weights > 0
    assert check.details["scales_compared"] == n_qdq > 0  # every Q/DQ node, weights and activations
    assert check.details["weight_values"] > 0 and check.details["scale_values"] >= n_qdq
    assert check.details["fp16_scales"] is True  # default compute precision

    stored = verify.read_package(package)
    assert sum(op.type == "constexpr_affine_dequantize" for op in stored.values()) == n_weights
    assert sum(op.type == "quantize" for op in stored.values()) > 0
    assert _check(artifact, "int8_fraction").value == 1.0  # every conv/linear/matmul is fed by int8 Q/DQ
    assert artifact.metadata["minimum_deployment_target"] == "iOS17"


@pytest.mark.slow
@pytest.mark.parametrize("precision,target", [("fp32", "iOS17"), ("fp32", "iOS18"), ("fp16", "macOS15")])
def test_other_precisions_and_targets_keep_scales(precision, target, canonicals, workdir):
    canonical = canonicals["resnet"]
    artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, minimum_deployment_target=target,
                                                            compute_precision=precision),
                                     workdir / f"resnet-{target}-{precision}.mlpackage")
    check = _check(artifact, "scales_match")
    assert check.status == "pass", check.message
    assert check.details["weights_compared"] > 0 and check.details["mismatch_count"] == 0
    assert check.details["fp16_scales"] is (precision == "fp16")
    types = {op.type for op in verify.read_package(artifact.path).values()}
    want = "constexpr_blockwise_shift_scale" if target in ("iOS18", "macOS15") else "constexpr_affine_dequantize"
    assert want in types


@pytest.mark.slow
def test_fp32_stores_scales_bit_exactly(canonicals, workdir):
    """Independent of the check's own code: read one activation scale and one weight back."""
    canonical = canonicals["resnet"]
    artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, compute_precision="fp32"),
                                     workdir / "resnet-fp32-exact.mlpackage")
    qdq_ops = json.loads(verify.package_metadata(artifact.path)[verify.META_QDQ_OPS])
    stored = verify.read_package(artifact.path)
    nodes = {n.name: n for n in canonical.model.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in canonical.model.graph.initializer}
    q = next(n for n in canonical.model.graph.node if n.op_type == "QuantizeLinear")
    assert stored[qdq_ops[q.name]].params["scale"].dtype == np.float32
    assert float(stored[qdq_ops[q.name]].params["scale"]) == float(inits[q.input[1]])
    w = next(n for n in canonical.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    op = stored[qdq_ops[w.name]]
    np.testing.assert_array_equal(op.params["quantized_data"], inits[w.input[0]])
    np.testing.assert_array_equal(op.params["scale"], inits[w.input[1]])
    assert nodes[w.name].op_type == "DequantizeLinear"


def test_fp16_storable_rounds_tiny_channels_to_the_smallest_fp16_scale():
    """A scale that rounds to 0 in fp16 becomes 2**-24 with the int8 values re-rounded: every
    dequantized weight stays within 2**-25 of the canonical one; other channels are untouched."""
    rng = np.random.default_rng(0)
    data = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    scale = np.array([0.01, 1.9e-8, 2.3e-11, 1e-7], np.float32)  # 1e-7 is a (subnormal) fp16 value
    stored = lowering.fp16_storable(data, scale, np.zeros(4, np.int8), 0)
    assert stored.channels == (1, 2)
    assert stored.scale[1] == stored.scale[2] == np.float32(2.0 ** -24)
    np.testing.assert_array_equal(stored.data[[0, 3]], data[[0, 3]])
    np.testing.assert_array_equal(stored.scale[[0, 3]], scale[[0, 3]])
    canonical = data.astype(np.float64) * scale.reshape(4, 1, 1, 1)
    kept = stored.data.astype(np.float64) * stored.scale.astype(np.float64).reshape(4, 1, 1, 1)
    assert np.abs(kept - canonical).max() <= 2.0 ** -25
    assert np.float16(2.0 ** -24) > 0 and np.float16(2.0 ** -25) == 0  # the fp16 facts this relies on


@pytest.mark.slow
def test_scales_below_fp16_range_are_stored_re_rounded_and_named(canonicals, workdir):
    """EfficientNet-Lite0's dead channels have weight scales down to 2e-11, which fp16 cannot hold:
    coremltools stored 2**-24 with the int8 values kept (those weights 2.6e3x too large) and
    scales_match failed. The lowering stores what fp16_storable says and the check names them."""
    from dataclasses import replace

    canonical = canonicals["mobilenet"]
    model = onnx.ModelProto()
    model.CopyFrom(canonical.model)
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and onnx.numpy_helper.to_array(inits[n.input[1]]).size > 1)
    scale = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
    scale[1] = 1.9e-8
    inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(scale, node.input[1]))
    path = workdir / "tiny-scale.qdq.onnx"
    onnx.save(model, str(path))
    tiny = replace(canonical, path=path, model=model)
    artifact = CoreMLBackend().lower(tiny, make_target(CoreMLBackend), workdir / "tiny-scale.mlpackage")
    check = _check(artifact, "scales_match")
    assert check.status == "pass", check.message
    assert check.details["not_kept"] == [next(e for e in check.details["not_kept"] if e.startswith(f"{node.name} channel 1:"))]
    assert "dead channels" in check.message
    qdq_ops = json.loads(verify.package_metadata(artifact.path)[verify.META_QDQ_OPS])
    op = verify.read_package(artifact.path)[qdq_ops[node.name]]
    assert float(op.params["scale"].reshape(-1)[1]) == 2.0 ** -24
    data = onnx.numpy_helper.to_array(inits[node.input[0]])
    axis = int(next((a.i for a in node.attribute if a.name == "axis"), 1)) % data.ndim
    want = np.clip(np.round(np.take(data, 1, axis).astype(np.float64) * float(scale[1]) / 2.0 ** -24), -128, 127)
    np.testing.assert_array_equal(np.take(op.params["quantized_data"], 1, axis), want)
    # and the check still fails a package whose tiny channel keeps the canonical int8 values
    stored = {**verify.read_package(artifact.path)}
    values = np.array(op.params["quantized_data"], copy=True)
    index = [slice(None)] * values.ndim
    index[axis] = 1
    values[tuple(index)] = np.take(data, 1, axis)
    stored[qdq_ops[node.name]] = verify.StoredOp(op.type, op.name, {**op.params, "quantized_data": values}, op.inputs)
    bad = verify.compare(model, stored, qdq_ops, True)
    assert bad.status == "fail" and "int8 weight values differ" in bad.details["mismatches"][0]["what"]


def _tampered_copy(package: Path, dest: Path, *, scale: bool = False, weight: bool = False) -> Path:
    from coremltools.proto import Model_pb2

    shutil.copytree(package, dest)
    spec_path = verify.weights_dir(dest) / "model.mlmodel"
    if scale:
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
        consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
        quantize = next(op for op in block.operations if op.type == "quantize")
        value = consts[quantize.inputs["scale"].arguments[0].name].attributes["val"].immediateValue.tensor
        if value.WhichOneof("value") == "bytes":  # fp16: nudge the lowest mantissa bit
            raw = bytearray(value.bytes.values)
            raw[0] ^= 1
            value.bytes.values = bytes(raw)
        else:
            value.floats.values[0] *= 1.0001
        spec_path.write_bytes(spec.SerializeToString())
    if weight:
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
        op = next(o for o in block.operations if o.type == "constexpr_affine_dequantize")
        meta = op.attributes["quantized_data"].blobFileValue.offset
        blob = verify.weights_dir(dest) / "weights" / "weight.bin"
        data = bytearray(blob.read_bytes())
        # blob metadata: uint32 sentinel, uint32 dtype, uint64 size, uint64 offset of the data
        size, start = struct.unpack_from("<QQ", data, meta + 8)
        assert size > 3
        data[start + 3] = (data[start + 3] + 1) % 256
        blob.write_bytes(bytes(data))
    return dest


@pytest.mark.slow
def test_tampered_scale_fails_verification(artifacts, canonicals, workdir):
    package = _tampered_copy(artifacts["resnet"].path, workdir / "tampered-scale.mlpackage", scale=True)
    check = verify.verify_package(canonicals["resnet"].model, package)
    assert check.status == "fail"
    assert check.details["mismatch_count"] == 1
    assert check.details["mismatches"][0]["op_type"] == "QuantizeLinear"
    assert "scale differs" in check.details["mismatches"][0]["what"]
    assert check.value == 1.0


@pytest.mark.slow
def test_tampered_weight_fails_verification(artifacts, canonicals, workdir):
    package = _tampered_copy(artifacts["mobilenet"].path, workdir / "tampered-weight.mlpackage", weight=True)
    check = verify.verify_package(canonicals["mobilenet"].model, package)
    assert check.status == "fail"
    assert any("int8 weight values differ" in m["what"] for m in check.details["mismatches"]), check.details


@pytest.mark.slow
def test_default_pass_pipeline_would_change_the_scales(canonicals, workdir, monkeypatch):
    """Why REMOVED_PASSES exists: with coremltools' full default pipeline the package no longer
    carries the canonical scales around the residual adds, and verification says so."""
    monkeypatch.setattr(lowering, "REMOVED_PASSES", ())
    artifact = CoreMLBackend().lower(canonicals["resnet"], make_target(CoreMLBackend, compute_precision="fp32"),
                                     workdir / "default-passes.mlpackage")
    check = _check(artifact, "scales_match")
    assert check.status == "fail" and check.details["mismatch_count"] > 0


@pytest.mark.slow
def test_untouched_copy_still_verifies(artifacts, canonicals, workdir):
    package = _tampered_copy(artifacts["resnet"].path, workdir / "copy.mlpackage")
    assert verify.verify_package(canonicals["resnet"].model, package).status == "pass"


# ---------------------------------------------------------------------------------------
# what the lowered program computes (no Core ML runtime here: a reference interpreter)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("deployment_target", ["iOS17", "iOS18"])
def test_lowered_program_computes_the_canonical_model(kind, deployment_target, canonicals):

    run_program = _mil_reference().run_program
    canonical = canonicals[kind]
    options = {"minimum_deployment_target": deployment_target, "compute_precision": "fp32", "compute_units": "ALL",
               "batch": "range", "batch_size": 1}
    lowered = lowering.build_program(canonical.model, deployment_target)
    mlmodel = lowering.convert(lowered, options, max_batch=8)
    feeds = eval_feeds(kind, 8)
    want = run_canonical(canonical.path, feeds)
    mil_feeds = {i.coreml_name: feeds[i.onnx_name].astype(np.float32 if i.dtype == "fp32" else np.int32)
                 for i in lowered.inputs}
    got = run_program(mlmodel._mil_program, mil_feeds)  # the program the package stores (after passes)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        cosine = float((g * w).sum() / (np.linalg.norm(g) * np.linalg.norm(w)))
        assert cosine > 0.99999
        # CNNs match to float rounding; the encoder may flip a rounding at one int8 boundary
        assert np.abs(g - w).max() <= (2e-3 if kind == "encoder" else 1e-5)


# ---------------------------------------------------------------------------------------
# batch shapes
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_range_and_fixed_batch(canonicals, workdir):
    import coremltools as ct

    canonical = canonicals["resnet"]
    ranged = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, batch_sizes=(1, 8)),
                                   workdir / "range.mlpackage")
    spec = ct.models.MLModel(str(ranged.path), skip_model_load=True).get_spec()
    batch_range = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges[0]
    assert (batch_range.lowerBound, batch_range.upperBound) == (1, 8)
    assert ranged.metadata["batch"] == {"range": [1, 8], "default": 1}

    fixed = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, batch="fixed", batch_size=4),
                                  workdir / "fixed.mlpackage")
    spec = ct.models.MLModel(str(fixed.path), skip_model_load=True).get_spec()
    assert list(spec.description.input[0].type.multiArrayType.shape) == [4, 1, 8, 8]
    assert _check(fixed, "scales_match").status == "pass"


@pytest.mark.slow
def test_int64_inputs_become_int32_and_are_recorded(artifacts):
    meta = verify.package_metadata(artifacts["encoder"].path)
    inputs = json.loads(meta["deploykit.inputs"])
    assert inputs == [["input_ids", "input_ids", "int32"], ["attention_mask", "attention_mask", "int32"]]


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def _with_unsupported_op(canonical, op_type: str = "Selu"):
    from deploykit.backend import CanonicalModel

    model = onnx.ModelProto()
    model.CopyFrom(canonical.model)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = op_type
    return CanonicalModel(canonical.path, model, canonical.calibration, canonical.fp32_path), relu.name


@pytest.mark.slow
def test_unsupported_op_names_node_and_op(canonicals, workdir):
    bad, node_name = _with_unsupported_op(canonicals["resnet"])
    dest = workdir / "unsupported" / "bad.mlpackage"
    with pytest.raises(LoweringError) as err:
        CoreMLBackend().lower(bad, make_target(CoreMLBackend), dest)
    message = str(err.value)
    assert f"'{node_name}'" in message and "Selu" in message and "\n" not in message
    leftovers = list(dest.parent.glob("*")) if dest.parent.exists() else []
    assert not dest.exists() and not leftovers
    checks, _ = CoreMLBackend().preflight(bad, make_target(CoreMLBackend))
    coverage = next(c for c in checks if c.name == "coreml_op_coverage")
    assert coverage.status == "fail" and "Selu" in coverage.message


@pytest.mark.slow
@pytest.mark.parametrize("old,needed", [("iOS16", "iOS17"), ("macOS13", "macOS14"), ("iOS15", "iOS17")])
def test_too_old_deployment_target_names_the_minimum(old, needed, canonicals, workdir):
    target = make_target(CoreMLBackend, minimum_deployment_target=old)
    with pytest.raises(ConfigError) as err:
        CoreMLBackend().lower(canonicals["resnet"], target, workdir / "old.mlpackage")
    assert needed in str(err.value) and old in str(err.value)
    checks, _ = CoreMLBackend().preflight(canonicals["resnet"], target)
    assert next(c for c in checks if c.name == "coreml_options").status == "fail"


@pytest.mark.slow
def test_fixed_batch_that_cannot_serve_the_target_batch_sizes_fails_preflight(canonicals):
    target = make_target(CoreMLBackend, batch="fixed", batch_size=1, batch_sizes=(1, 8))
    checks, _ = CoreMLBackend().preflight(canonicals["resnet"], target)
    batch = next(c for c in checks if c.name == "coreml_batch")
    assert batch.status == "fail" and "[1, 8]" in batch.message


@pytest.mark.slow
def test_bad_option_values_are_config_errors(canonicals, workdir):
    with pytest.raises(ConfigError, match="compute_units"):
        CoreMLBackend().lower(canonicals["resnet"], make_target(CoreMLBackend, compute_units="GPU_ONLY"),
                              workdir / "bad.mlpackage")


def test_options_validate_through_targets_toml(tmp_path):
    import deploykit_coreml
    from deploykit.plugins import PluginInfo, Registry
    from deploykit.targets import load_targets

    registry = Registry()
    registry.add_plugin(deploykit_coreml, PluginInfo("coreml", "deploykit_coreml"))
    path = tmp_path / "targets.toml"
    path.write_text('[targets.iphone]\nbackend = "coreml"\n[targets.iphone.options]\ncompute_precision = "int4"\n')
    with pytest.raises(ConfigError, match="compute_precision"):
        registry.resolve(load_targets(path), ["iphone"])


# ---------------------------------------------------------------------------------------
# probe, load, plugin
# ---------------------------------------------------------------------------------------
def test_probe_here():
    av = CoreMLBackend().probe(make_target(CoreMLBackend))
    assert av.can_lower and av.versions["coremltools"]
    if ON_MACOS:
        assert av.can_run
    else:
        assert not av.can_run and av.reason == MACOS_ONLY


def test_probe_says_coremltools_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    av = CoreMLBackend().probe(make_target(CoreMLBackend))
    assert not av.can_lower and not av.can_run
    assert "coremltools" in av.reason and "deploykit[coreml]" in av.install_hint


@pytest.mark.slow
@pytest.mark.skipif(ON_MACOS, reason="checks the Linux/Windows behaviour")
def test_load_off_macos_is_unavailable(artifacts):
    with pytest.raises(BackendUnavailable, match="needs macOS"):
        CoreMLBackend().load(artifacts["resnet"], make_target(CoreMLBackend))


@pytest.mark.slow
@pytest.mark.hardware
@pytest.mark.skipif(not ON_MACOS, reason=MACOS_ONLY)
@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_macos_and_agrees_with_canonical(kind, artifacts, canonicals):

    from deploykit.checks import compare

    runner = CoreMLBackend().load(artifacts[kind], make_target(CoreMLBackend, compute_units="CPU_ONLY"))
    feeds = eval_feeds(kind, 4)
    want = run_canonical(canonicals[kind].path, feeds)
    got = runner.run(feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert compare(want, got)["cosine"] > 0.99


def test_importing_the_plugin_does_not_import_coremltools():
    assert "coremltools" not in imported_by_plugins()["deploykit_coreml"], "SDK imported eagerly"


@pytest.mark.skipif(ON_MACOS, reason="off macOS only")
def test_core_ml_layer_check_is_not_run_off_macos(canonicals):
    """The per-layer check (deploykit/layers.py) needs the Core ML runtime: off macOS it is not run, and says why."""
    from deploykit import layers

    target = make_target(CoreMLBackend, thresholds={"min_layer_within_one_step": 0.99})
    check, report = layers.layer_check(CoreMLBackend(), None, canonicals["mobilenet"], target, [])
    assert check.status == "not_run" and "needs macOS" in check.message and report is None


@pytest.mark.slow
def test_conformance(canonicals, workdir):
    from deploykit.testing.conformance import run_conformance

    report = run_conformance(CoreMLBackend, workdir / "conformance", canonical=canonicals["resnet"])
    assert report.lowered
    assert "DeploykitConformanceUnsupportedOp" in report.unsupported_error
    assert report.ran is ON_MACOS


# ---------------------------------------------------------------------------------------
# ops the test models do not use: a torch "op zoo" (dynamo export + the core quantizer) and a
# hand-built QDQ graph for ops the exporter never emits
# ---------------------------------------------------------------------------------------
def _zoo_module():
    import torch

    nn, F = torch.nn, torch.nn.functional

    class Zoo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            y = F.pad(self.conv(x), (1, 2, 0, 1))                                    # Pad
            y = F.avg_pool2d(y, 2, stride=2, padding=1, count_include_pad=False)     # AveragePool
            y = torch.sigmoid(y) - torch.tanh(y) / 2                                 # Sigmoid Tanh Sub Div
            y = self.grouped(F.leaky_relu(y, 0.1))                                   # LeakyRelu, grouped Conv
            y = F.interpolate(y, scale_factor=2, mode="nearest")                     # Resize nearest (scales)
            y = F.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)  # Resize linear (Shape-built sizes)
            y = self.up(F.max_pool2d(y, 2))                                          # ConvTranspose
            return self.fc(torch.flatten(y, 1)) + y.mean((2, 3)).sum(1, keepdim=True)

    return Zoo()


@pytest.fixture(scope="module")
def zoo(workdir):
    import torch

    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing.cache import export_onnx  # the export is an input here: kept on this machine

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    root = workdir / "zoo"
    src = export_onnx(_zoo_module(), (torch.from_numpy(rng.random((2, 3, 16, 16), dtype=np.float32)),),
                      root / "zoo.onnx", ["x"])
    fp32 = model.normalise(model.load_onnx(src), str(src))
    calib = {"x": rng.random((32, 3, 16, 16), dtype=np.float32)}
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    return write_canonical(quantize(fp32, source, "minmax"), fp32, root, "zoo")


def _hand_built_qdq(path: Path) -> Path:
    """x -> Q/DQ -> Conv -> HardSwish -> GlobalAveragePool / GlobalMaxPool -> Flatten -> Q/DQ ->
    Gemm(transB=0, alpha, beta, weight per-channel on axis 1) -> Unsqueeze -> Expand -> ReduceSum
    -> Where(Greater) with Neg / Sqrt(Abs) / Exp, Cast."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w_conv = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    w_fc = rng.integers(-127, 128, (12, 10)).astype(np.int8)
    init = [
        numpy_helper.from_array(np.float32(0.01), "x_scale"), numpy_helper.from_array(np.int8(0), "zp"),
        numpy_helper.from_array(w_conv, "w_conv"), numpy_helper.from_array(np.full(6, 0.004, np.float32) *
                                                                          np.arange(1, 7, dtype=np.float32), "w_conv_scale"),
        numpy_helper.from_array(np.zeros(6, np.int8), "w_conv_zp"),
        numpy_helper.from_array(np.float32(0.02), "f_scale"),
        numpy_helper.from_array(w_fc, "w_fc"), numpy_helper.from_array(np.linspace(0.001, 0.01, 10, dtype=np.float32),
                                                                      "w_fc_scale"),
        numpy_helper.from_array(np.zeros(10, np.int8), "w_fc_zp"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b_fc"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 3, 10], np.int64), "expand_to"),
        numpy_helper.from_array(np.float32(0), "zero"),
    ]
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["x", "x_scale", "zp"], ["xq"], name="xq"),
        n("DequantizeLinear", ["xq", "x_scale", "zp"], ["xd"], name="xd"),
        n("DequantizeLinear", ["w_conv", "w_conv_scale", "w_conv_zp"], ["wcd"], name="wcd", axis=0),
        n("Conv", ["xd", "wcd"], ["c"], name="conv", pads=[1, 0, 1, 2], strides=[1, 1]),
        n("HardSwish", ["c"], ["hs"], name="hardswish"),
        n("GlobalAveragePool", ["hs"], ["gap"], name="gap"),
        n("GlobalMaxPool", ["hs"], ["gmp"], name="gmp"),
        n("Concat", ["gap", "gmp"], ["cat"], name="cat", axis=1),
        n("Flatten", ["cat"], ["flat"], name="flatten", axis=1),
        n("QuantizeLinear", ["flat", "f_scale", "zp"], ["fq"], name="fq"),
        n("DequantizeLinear", ["fq", "f_scale", "zp"], ["fd"], name="fd"),
        n("DequantizeLinear", ["w_fc", "w_fc_scale", "w_fc_zp"], ["wfd"], name="wfd", axis=1),
        n("Gemm", ["fd", "wfd", "b_fc"], ["g"], name="gemm", alpha=0.5, beta=2.0),
        n("Unsqueeze", ["g", "axis1"], ["u"], name="unsqueeze"),
        n("Expand", ["u", "expand_to"], ["e"], name="expand"),
        n("ReduceSum", ["e", "axis1"], ["s"], name="reduce_sum", keepdims=0),
        n("Greater", ["s", "zero"], ["pos"], name="greater"),
        n("Abs", ["s"], ["abs"], name="abs"),
        n("Sqrt", ["abs"], ["sq"], name="sqrt"),
        n("Neg", ["sq"], ["neg"], name="neg"),
        n("Where", ["pos", "sq", "neg"], ["signed_sqrt"], name="where"),
        n("Cast", ["pos"], ["posf"], name="cast", to=TensorProto.FLOAT),
        n("Mul", ["signed_sqrt", "posf"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(nodes, "hand_built", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("signed_sqrt", TensorProto.FLOAT, ["N", 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _agrees_with_onnxruntime(model: onnx.ModelProto, path: Path, deployment_target: str, feeds, atol: float):
    from deploykit.ortsession import session

    lowered = lowering.build_program(model, deployment_target)
    mlmodel = lowering.convert(lowered, {"minimum_deployment_target": deployment_target, "compute_precision": "fp32",
                                         "compute_units": "ALL", "batch": "range", "batch_size": 1}, max_batch=8)
    want = session(path, exact=False).run(None, feeds)
    got = _mil_reference().run_program(mlmodel._mil_program, {i.coreml_name: feeds[i.onnx_name] for i in lowered.inputs})
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)
    return lowered


@pytest.mark.slow
@pytest.mark.parametrize("deployment_target", ["iOS17", "iOS18"])
def test_op_zoo_lowers_and_computes_the_canonical_model(deployment_target, zoo, workdir):
    feeds = {"x": np.random.default_rng(3).random((4, 3, 16, 16), dtype=np.float32)}
    lowered = _agrees_with_onnxruntime(zoo.model, zoo.path, deployment_target, feeds, atol=1e-5)
    assert {"Pad", "AveragePool", "Resize", "ConvTranspose", "Shape", "LeakyRelu", "Sub", "Div"} <= set(lowered.op_counts)
    artifact = CoreMLBackend().lower(zoo, make_target(CoreMLBackend, minimum_deployment_target=deployment_target),
                                     workdir / f"zoo-{deployment_target}.mlpackage")
    assert _check(artifact, "scales_match").status == "pass"
    assert _check(artifact, "scales_match").details["weights_compared"] == 4


@pytest.mark.slow
def test_hand_built_ops_compute_like_onnxruntime(workdir):
    path = _hand_built_qdq(workdir / "hand_built.qdq.onnx")
    model = onnx.load(str(path))
    feeds = {"x": np.random.default_rng(4).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    lowered = _agrees_with_onnxruntime(model, path, "iOS17", feeds, atol=1e-5)
    assert [name for name, _ in lowered.outputs] == ["y", "signed_sqrt"]
    stored = {q.onnx_node: q for q in lowered.qdq_names}
    assert stored["wfd"].weight and stored["xq"].mil_op == "xq"
