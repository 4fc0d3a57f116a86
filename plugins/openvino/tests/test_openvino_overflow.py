"""The overflow fix: a convolution's int8 weights split in two halves that cannot saturate the
int16 pair sums of CPUs without VNNI, exactly (same scales, halves adding up to the canonical
weights), run in int8 by OpenVINO, and checked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("openvino", reason="pip install 'deploykit[openvino]'")

from deploykit.cpu import u8s8_saturates  # noqa: E402
from deploykit.data import ArraySource  # noqa: E402
from deploykit.model import input_specs, normalise  # noqa: E402
from deploykit.quantize import quantize, saturation, write_canonical  # noqa: E402
from deploykit.reference import run_canonical  # noqa: E402
from deploykit.testing import make_target  # noqa: E402
from deploykit_openvino import OpenVINOBackend  # noqa: E402
from deploykit_openvino.backend import overflow_mode  # noqa: E402
from deploykit_openvino.overflow import check_split, first_layer_convs, paired_layers, split_layers  # noqa: E402


@pytest.fixture(scope="module")
def stem_net(tmp_path_factory):
    """A stem conv on normalised-photo-like input (the whole int8 range) with large weights,
    then ReLU and a pointwise conv: the layout that saturates u8 x s8 pair sums."""
    tmp = tmp_path_factory.mktemp("overflow")
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="stem", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="pw")],
        "stem_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [numpy_helper.from_array(rng.normal(0, 1, (16, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(0, 0.2, (8, 16, 1, 1)).astype(np.float32), "w2")])
    fp32 = normalise(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    return _calibrated(fp32, rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32), tmp)


def _calibrated(fp32, x: np.ndarray, tmp):
    """``fp32`` calibrated on ``x`` (minmax, asymmetric) and written as a canonical model in ``tmp``."""
    np.savez(tmp / "calib.npz", x=x)
    result = quantize(fp32, ArraySource(tmp / "calib.npz", input_specs(fp32)), "minmax", activations="asymmetric")
    return write_canonical(result, fp32, tmp), x, tmp


def test_selection(stem_net):
    canonical, _, _ = stem_net
    assert first_layer_convs(canonical.model) == ["stem"]
    assert paired_layers(canonical.model) == ["stem", "pw"]


def test_split_is_exact_and_checked(stem_net):
    canonical, x, tmp = stem_net
    split = split_layers(canonical.model, ["stem", "pw"])
    assert check_split(canonical.model, split, ["stem", "pw"]) == []
    path = tmp / "split.onnx"
    onnx.save(split, str(path))
    want, got = run_canonical(canonical.path, {"x": x})[0], run_canonical(path, {"x": x})[0]
    step = canonical.calibration.scale("y")
    assert np.abs(got - want).max() <= 1e-3 * step  # float summation order only
    # a half that does not add up to the canonical weight is caught
    name = next(i.name for i in split.graph.initializer if i.name.endswith("/split_a") and "w2" not in i.name)
    init = next(i for i in split.graph.initializer if i.name == name)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 1
    init.CopyFrom(numpy_helper.from_array(values, name))
    assert any("do not add up" in p for p in check_split(canonical.model, split, ["stem", "pw"]))


@pytest.mark.parametrize("mode", ["first_layer", "all"])
def test_lowered_split_keeps_scales_runs_int8_and_matches_the_canonical_model(stem_net, mode):
    canonical, x, tmp = stem_net
    backend = OpenVINOBackend()
    target = make_target(OpenVINOBackend, overflow_fix=mode)
    artifact = backend.lower(canonical, target, tmp / f"{mode}.xml")
    checks = {c.name: c for c in artifact.checks}
    assert checks["scales_match"].status == "pass", checks["scales_match"].message
    audit = checks["int8_fraction"]
    assert audit.value == 1.0 and audit.details["compute_layers"] == 2, audit.message  # one row per canonical conv
    assert audit.message == "2 of 2 compute layers run in int8"  # a split conv is int8 only if both halves are
    assert artifact.metadata["split_layers"] == (["stem"] if mode == "first_layer" else ["stem", "pw"])
    with backend.load(artifact, target) as runner:
        got = runner.run({"x": x})[0]
    off = np.abs(got - run_canonical(canonical.path, {"x": x})[0]) / canonical.calibration.scale("y")
    assert off.max() <= 1.01, f"{off.max():.2f} steps off the canonical model"


@pytest.mark.skipif(not u8s8_saturates(), reason="this CPU has VNNI: its int8 kernels do not saturate")
def test_without_the_split_this_cpu_saturates(stem_net):
    """The reason for the fix, measured: on this non-VNNI CPU the unsplit stem departs from the
    canonical model by many steps; auto picks the split here."""
    canonical, x, tmp = stem_net
    backend = OpenVINOBackend()
    target = make_target(OpenVINOBackend, overflow_fix="none")
    artifact = backend.lower(canonical, target, tmp / "none.xml")
    assert artifact.metadata["split_layers"] == []
    with backend.load(artifact, target) as runner:
        got = runner.run({"x": x})[0]
    off = np.abs(got - run_canonical(canonical.path, {"x": x})[0]) / canonical.calibration.scale("y")
    assert off.max() > 4, f"expected saturation, got {off.max():.2f} steps at most"
    assert overflow_mode(make_target(OpenVINOBackend)) == "first_layer"


def test_a_split_conv_is_int8_only_when_both_halves_are():
    from deploykit_openvino.overflow import merge_halves

    rows = [("stem/split_a", "Convolution", "u8"), ("stem/split_b", "Convolution", "f32"),
            ("pw/split_a", "Convolution", "u8"), ("pw/split_b", "Convolution", "u8"), ("fc", "FullyConnected", "u8")]
    assert merge_halves(rows) == [("stem", "Convolution(split in 2)", "f32"), ("pw", "Convolution(split in 2)", "u8"),
                                  ("fc", "FullyConnected", "u8")]


@pytest.fixture(scope="module")
def hot_cool(tmp_path_factory):
    """deploykit.testing.tiny.pair_saturating_net, calibrated: "hot" saturates, "cool" cannot."""
    from deploykit.testing.tiny import pair_saturating_net

    tmp = tmp_path_factory.mktemp("hot_cool")
    fp32 = normalise(pair_saturating_net())
    return _calibrated(fp32, np.random.default_rng(1).uniform(-1, 1, (32, 4, 12, 12)).astype(np.float32), tmp)


def test_saturating_splits_only_the_convs_the_record_names(hot_cool):
    from deploykit_openvino.overflow import saturating_layers, select

    canonical, _, _ = hot_cool
    record = saturation.recorded(canonical.model)
    assert saturating_layers(canonical.model, record) == ["hot"]
    assert select(canonical.model, "saturating", record, threshold=1.0) == []
    # without the record (an adopted model, an older canonical model) auto keeps NNCF's choice
    assert saturation.recorded(onnx.ModelProto()) is None
    assert overflow_mode(make_target(OpenVINOBackend), None) == ("first_layer" if u8s8_saturates() else "none")


@pytest.mark.skipif(not u8s8_saturates(), reason="this CPU has VNNI: its int8 kernels do not saturate")
def test_saturating_split_is_as_exact_as_splitting_every_conv_at_half_the_cost(hot_cool):
    """On this non-VNNI CPU: unsplit, "hot" departs from the canonical model; auto resolves to
    the record's choice, splits "hot" alone and matches the canonical model as closely as
    splitting both convolutions."""
    canonical, x, tmp = hot_cool
    backend = OpenVINOBackend()
    assert overflow_mode(make_target(OpenVINOBackend), saturation.recorded(canonical.model)) == "saturating"
    want = run_canonical(canonical.path, {"x": x})[0]
    step = canonical.calibration.scale("y")
    off = {}
    for mode in ("none", "auto", "all"):
        target = make_target(OpenVINOBackend, overflow_fix=mode)
        artifact = backend.lower(canonical, target, tmp / f"{mode}.xml")
        assert artifact.metadata["split_layers"] == {"none": [], "auto": ["hot"], "all": ["hot", "cool"]}[mode]
        checks = {c.name: c for c in artifact.checks}
        assert checks["scales_match"].status == "pass"
        # the info check says what the split covers and what the record says is left
        assert f"split {len(artifact.metadata['split_layers'])} layer(s)" in checks["int8_saturation"].message
        assert ("hot" in checks["int8_saturation"].details["unsplit_errors"]) == (mode == "none")
        with backend.load(artifact, target) as runner:
            off[mode] = np.abs(runner.run({"x": x})[0] - want) / step
    assert off["none"].max() > 4, f"expected saturation unsplit, got {off['none'].max():.2f} steps at most"
    # rounding differences carried through "cool" only: a step or two, the same with "cool" split or not
    assert off["auto"].max() <= 2 and off["auto"].max() <= off["all"].max() + 0.01, {k: float(v.max()) for k, v in off.items()}


@pytest.mark.skipif(not u8s8_saturates(), reason="this CPU has VNNI: its int8 kernels do not saturate")
def test_a_saturating_matmul_is_split_and_then_exact(tmp_path):
    """OpenVINO's int8 fully connected layers pair K the same way: "hot" saturates unsplit and
    matches the canonical model split; "cool" (alternating signs) is left alone."""
    from deploykit.testing.tiny import pair_saturating_mlp

    fp32 = normalise(pair_saturating_mlp())
    x = np.random.default_rng(1).uniform(-1, 1, (64, 16)).astype(np.float32)
    canonical, _, _ = _calibrated(fp32, x, tmp_path)
    backend = OpenVINOBackend()
    want = run_canonical(canonical.path, {"x": x})[0]
    step = canonical.calibration.scale("y")
    off = {}
    for mode in ("none", "auto"):
        target = make_target(OpenVINOBackend, overflow_fix=mode)
        artifact = backend.lower(canonical, target, tmp_path / f"{mode}.xml")
        assert artifact.metadata["split_layers"] == {"none": [], "auto": ["hot"]}[mode]
        checks = {c.name: c for c in artifact.checks}
        assert checks["scales_match"].status == "pass", checks["scales_match"].message
        assert checks["int8_fraction"].value == 1.0, checks["int8_fraction"].message
        with backend.load(artifact, target) as runner:
            off[mode] = np.abs(runner.run({"x": x})[0] - want) / step
    assert off["none"].max() > 4, f"expected saturation unsplit, got {off['none'].max():.2f} steps at most"
    assert off["auto"].max() <= 2, f"{off['auto'].max():.2f} steps off the canonical model split"
