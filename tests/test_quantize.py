"""The quantizer's contract on real models (resnet, mobilenet, encoder): placement, weight and
activation parameters, metadata, batch-size independence of every calibration method, the
methods themselves on synthetic statistics, and FP32 agreement in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from deploykit import canonical
from deploykit.canonical import COMPUTE_OPS, INT8_MAX, META_RANDOM, REQUIRED_METADATA, QdqGraph, weight_axis
from deploykit.ortsession import session
from deploykit.quantize import load_canonical, quantize
from deploykit.quantize.observe import (
    HIST_BINS,
    METHODS,
    TensorStats,
    amax_entropy,
    amax_minmax,
    amax_mse,
    amax_percentile,
)
from deploykit.testing import skip_unless_installed

skip_unless_installed("torch", reason="the canonical test models are exported from torch (pip install torch==2.13.0)")

KINDS = ("resnet", "mobilenet", "encoder")


@pytest.fixture(scope="module")
def canonicals(tmp_path_factory):
    from deploykit.testing import make_canonical

    root = tmp_path_factory.mktemp("quantize")
    return {kind: make_canonical(kind, root / kind) for kind in KINDS}


def _session(path_or_model) -> ort.InferenceSession:
    return session(path_or_model, exact=False)


# ------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("kind", KINDS)
def test_opset_and_metadata(canonicals, kind):
    m = canonicals[kind].model
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == canonical.OPSET == 18
    meta = {p.key: p.value for p in m.metadata_props}
    for key in REQUIRED_METADATA + (META_RANDOM,):
        assert meta.get(key), f"metadata {key} missing"
    assert meta[canonical.META_METHOD] == "minmax"
    assert meta[META_RANDOM] == "false"
    assert canonical.CalibrationTable.from_model(m) == canonicals[kind].calibration
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_qdq_per_tensor_int8_zero_point_0(canonicals, kind):
    m = canonicals[kind].model
    g = QdqGraph(m)
    table = canonicals[kind].calibration
    activation = [n for n in m.graph.node if n.op_type == "QuantizeLinear" or
                  (n.op_type == "DequantizeLinear" and not g.is_weight_dq(n))]
    assert activation
    for node in activation:
        p = g.params(node)
        assert p.scale.size == 1 and p.axis is None, node.name
        assert p.zero_point.dtype == np.int8 and np.all(p.zero_point == 0), node.name
        assert float(p.scale.reshape(-1)[0]) > 0
        if node.op_type == "QuantizeLinear":
            assert float(p.scale) == pytest.approx(table.scale(node.input[0]), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_int8_narrow_range_per_channel(canonicals, kind):
    m = canonicals[kind].model
    g = QdqGraph(m)
    computes = [n for n in m.graph.node if n.op_type in COMPUTE_OPS]
    assert computes
    weights = 0
    for node in computes:
        for idx in (0, 1):
            assert g.dq_feeding(node.input[idx]) is not None, f"{node.name} input {idx} is not quantized"
        found = g.weight(node.input[1])
        if found is None:  # activation x activation MatMul: both inputs are activation Q/DQ
            assert node.op_type == "MatMul" and g.activation_source(node.input[1]) is not None
            continue
        weights += 1
        w, p = found
        assert w.dtype == np.int8
        assert int(w.min()) >= -INT8_MAX and int(w.max()) <= INT8_MAX
        want = weight_axis(node.op_type, canonical.attrs(node), w.ndim)
        axis = p.axis if p.axis is None or p.axis >= 0 else p.axis + w.ndim
        assert axis == want, f"{node.name}: axis {axis}, want {want}"
        assert p.scale.shape == (w.shape[want],)
        assert p.zero_point.dtype == np.int8 and np.all(p.zero_point == 0)
        # the largest |w| of every channel maps onto +-127: the scale is amax / 127
        reduce = tuple(a for a in range(w.ndim) if a != want)
        assert np.all(np.abs(w).max(axis=reduce)[p.scale > 0] == INT8_MAX)
        if len(node.input) > 2 and node.input[2]:
            assert node.input[2] in g.initializers, f"{node.name}: bias is not an initializer"
            assert g.initializers[node.input[2]].data_type == TensorProto.FLOAT
    assert weights
    # no integer tensor other than the int8 weights/zero points and int64 shape data
    for init in m.graph.initializer:
        assert init.data_type in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT64, TensorProto.BOOL), init.name


def test_encoder_placement(canonicals):
    m = canonicals["encoder"].model
    g = QdqGraph(m)
    mask_adds = [n for n in m.graph.node if n.op_type == "Add" and any(
        g.producer.get(i) is not None and g.producer[i].op_type == "Where" for i in n.input)]
    assert mask_adds, "the encoder's attention-mask Add is missing"
    for add in mask_adds:
        assert all(g.dq_feeding(i) is None for i in add.input), f"mask Add {add.name} is quantized"
    for op in ("LayerNormalization", "Softmax"):
        nodes = [n for n in m.graph.node if n.op_type == op]
        assert nodes, op
        for node in nodes:
            assert g.dq_feeding(node.input[0]) is None, f"{op} {node.name} input is quantized"
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) >= 8
    act_x_act = [n for n in matmuls if g.weight(n.input[1]) is None]
    assert act_x_act, "attention MatMuls (activation x activation) expected"
    for node in matmuls:
        assert all(g.dq_feeding(i) is not None for i in node.input[:2]), node.name
    # the table still has the ranges of the float tensors (for backends that quantize more)
    table = canonicals["encoder"].calibration
    assert all(add.output[0] in table for add in mask_adds)


def test_mobilenet_concat_shares_one_scale(canonicals):
    m = canonicals["mobilenet"].model
    g = QdqGraph(m)
    table = canonicals["mobilenet"].calibration
    concats = [n for n in m.graph.node if n.op_type == "Concat"]
    assert concats
    for cat in concats:
        sources = [g.activation_source(i) for i in cat.input]
        assert all(s is not None for s in sources), "Concat inputs are quantized"
        tensors = [s[0] for s in sources] + [cat.output[0]]
        scales = {table.scale(t) for t in tensors}
        assert len(scales) == 1, scales
        assert {float(s[1].scale) for s in sources} == scales
        # the shared scale covers the widest input
        assert table[cat.output[0]].amax == pytest.approx(max(max(abs(table[t].min), abs(table[t].max)) for t in tensors))


def test_residual_add_both_inputs_quantized(canonicals):
    m = canonicals["resnet"].model
    g = QdqGraph(m)
    adds = [n for n in m.graph.node if n.op_type == "Add" and not any(i in g.initializers for i in n.input)]
    assert len(adds) == 2
    for add in adds:
        assert all(g.dq_feeding(i) is not None for i in add.input), add.name


def test_resnet_qdq_agrees_with_fp32(canonicals):
    from deploykit.testing import eval_feeds

    c = canonicals["resnet"]
    feeds = eval_feeds("resnet", 64, seed=5)
    ref = _session(str(c.fp32_path)).run(None, feeds)[0]
    got = _session(str(c.path)).run(None, feeds)[0]
    assert got.shape == ref.shape == (64, 10)
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.99, cos
    assert not np.array_equal(ref, got)  # really quantized


def test_load_canonical_round_trip(canonicals):
    c = canonicals["mobilenet"]
    loaded = load_canonical(c.path)
    assert loaded.calibration == c.calibration
    assert loaded.fp32_path == c.fp32_path and loaded.fp32_path.is_file()
    assert canonical.CalibrationTable.from_json(c.path.with_name("mobilenet.calib.json").read_text()) == c.calibration


# ------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def resnet_fp32(canonicals):
    from deploykit import model
    from deploykit.testing import eval_feeds

    fp32 = onnx.load(str(canonicals["resnet"].fp32_path))
    return fp32, model.input_specs(fp32), eval_feeds("resnet", 64, seed=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_scales_do_not_depend_on_calibration_batch_size(resnet_fp32, method):
    from deploykit.data import open_source

    fp32, specs, calib = resnet_fp32
    results = {bs: quantize(fp32, open_source(lambda: [calib], specs), method, batch_size=bs) for bs in (1, 8, 64)}
    tables = {bs: r.table for bs, r in results.items()}
    assert tables[1] == tables[8] == tables[64], method
    assert len({r.data_hash for r in results.values()}) == 1
    assert all(r.samples == 64 for r in results.values())
    assert canonical.lint(results[8].model) == []


@pytest.mark.parametrize("kind", ["mobilenet", "encoder"])
@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_scales_do_not_depend_on_batch_size_other_models(canonicals, kind, method):
    """Scales only: onnxruntime's kernels may change an observed min/max by one ulp with the
    batch size (the encoder's final ReduceMean does), which must not move a scale."""
    from deploykit import model
    from deploykit.data import open_source
    from deploykit.testing import eval_feeds

    fp32 = onnx.load(str(canonicals[kind].fp32_path))
    specs, calib = model.input_specs(fp32), eval_feeds(kind, 32, seed=0)
    scales = []
    for bs in (1, 8, 32):
        table = quantize(fp32, open_source(lambda: [calib], specs), method, batch_size=bs).table
        scales.append({t: r.scale for t, r in table.items()})
    assert scales[0] == scales[1] == scales[2]


def test_method_is_recorded_and_unknown_method_refused(resnet_fp32):
    from deploykit.data import open_source
    from deploykit.errors import ConfigError

    fp32, specs, calib = resnet_fp32
    r = quantize(fp32, open_source(lambda: [calib], specs), "percentile", percentile=99.9, batch_size=64)
    assert {p.key: p.value for p in r.model.metadata_props}[canonical.META_METHOD] == "percentile:99.9"
    with pytest.raises(ConfigError, match="unknown calibration method 'kl'"):
        quantize(fp32, open_source(lambda: [calib], specs), "kl")


def _stats(values: np.ndarray) -> TensorStats:
    s = TensorStats(float(values.min()), float(values.max()))
    s.hist = np.histogram(np.abs(values), bins=HIST_BINS, range=(0.0, s.absmax))[0].astype(np.int64)
    return s


@pytest.fixture(scope="module")
def heavy_tailed() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.laplace(0.0, 1.0, 200_000)
    x[:20] = rng.choice([-1, 1], 20) * rng.uniform(40, 60, 20)  # a few far outliers
    return x


def test_entropy_threshold_below_minmax_on_heavy_tail(heavy_tailed):
    s = _stats(heavy_tailed)
    absmax = float(np.abs(heavy_tailed).max())
    assert amax_minmax(s) == pytest.approx(absmax)
    entropy = amax_entropy(s)
    assert entropy < 0.5 * absmax
    # it still covers the bulk of the distribution
    assert entropy > np.quantile(np.abs(heavy_tailed), 0.99)


def test_percentile_thresholds(heavy_tailed):
    s = _stats(heavy_tailed)
    absmax = s.absmax
    assert amax_percentile(s, percentile=100.0) == pytest.approx(absmax)
    p999 = amax_percentile(s, percentile=99.9)
    q = float(np.quantile(np.abs(heavy_tailed), 0.999))
    assert abs(p999 - q) <= absmax / HIST_BINS + 1e-12  # within one bin of the empirical quantile
    assert amax_percentile(s, percentile=99.0) < p999 < absmax


def _quant_mse(x: np.ndarray, amax: float) -> float:
    scale = amax / 127.0
    return float(np.mean((x - np.clip(np.round(x / scale), -127, 127) * scale) ** 2))


def test_mse_threshold_minimises_quantization_error():
    x = np.random.default_rng(2).laplace(0.0, 1.0, 100_000)
    s = _stats(x)
    mse = amax_mse(s)
    assert mse < 0.95 * s.absmax  # clipping the sparse tail pays off
    # brute force on the samples themselves: the chosen threshold is (near) optimal
    grid = np.linspace(s.absmax / 64, s.absmax, 256)
    errors = np.array([_quant_mse(x, t) for t in grid])
    assert _quant_mse(x, mse) <= 1.02 * errors.min()
    assert _quant_mse(x, mse) < _quant_mse(x, s.absmax)


def test_mse_keeps_far_outliers_that_dominate_the_error(heavy_tailed):
    """Squared error punishes clipping a few huge values: MSE keeps them, entropy does not."""
    s = _stats(heavy_tailed)
    mse = amax_mse(s)
    assert amax_entropy(s) < mse <= s.absmax
    assert _quant_mse(heavy_tailed, mse) < _quant_mse(heavy_tailed, amax_entropy(s))


def test_mse_on_uniform_stays_near_the_maximum():
    u = _stats(np.random.default_rng(1).uniform(-1, 1, 100_000))
    assert amax_mse(u) > 0.9 * u.absmax  # on a uniform distribution clipping only hurts


def test_methods_without_histogram_fall_back_to_absmax():
    s = TensorStats(-3.0, 2.0)
    for method in METHODS.values():
        assert method(s, percentile=99.0) == 3.0
    assert amax_minmax(TensorStats()) == 0.0
    assert canonical.activation_scale(0.0) == pytest.approx(1 / 127)


# ------------------------------------------------------------------------------ hand-made graphs
def _handmade(kind: str):
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(11)

    def w(*shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w")

    def vi(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    if kind == "gemm_transB0":  # weight [K, N]: per-channel on axis 1
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="op")
        inits = [w(6, 5), numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
        io, x, axis = ([vi("x", ["N", 6])], [vi("y", ["N", 5])]), rng.standard_normal((32, 6)), 1
    elif kind == "gemm_transB1":  # weight [N, K]: axis 0
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="op", transB=1)
        inits = [w(5, 6), numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
        io, x, axis = ([vi("x", ["N", 6])], [vi("y", ["N", 5])]), rng.standard_normal((32, 6)), 0
    elif kind == "matmul":  # weight [K, N]: axis 1
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="op")
        inits = [w(6, 5)]
        io, x, axis = ([vi("x", ["N", 6])], [vi("y", ["N", 5])]), rng.standard_normal((32, 6)), 1
    else:  # ConvTranspose weight [C, M, kH, kW]: axis 0 (what TensorRT expects)
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="op", strides=[2, 2])
        inits = [w(4, 3, 2, 2)]
        io, x, axis = ([vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 3, 12, 12])]), rng.standard_normal((16, 4, 6, 6)), 0
    graph = helper.make_graph([node], kind, io[0], io[1], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", canonical.OPSET)]), x.astype(np.float32), axis


@pytest.mark.parametrize("kind", ["gemm_transB0", "gemm_transB1", "matmul", "conv_transpose"])
def test_handmade_weight_axis_and_accuracy(kind):
    from deploykit import model
    from deploykit.data import open_source

    fp32, x, want_axis = _handmade(kind)
    fp32 = model.normalise(fp32, kind)
    result = quantize(fp32, open_source(lambda: [{"x": x}], model.input_specs(fp32)), "minmax", batch_size=8)
    assert canonical.lint(result.model) == []
    g = QdqGraph(result.model)
    op = next(n for n in result.model.graph.node if n.name == "op")
    w, p = g.weight(op.input[1])
    assert p.axis == want_axis and p.scale.shape == (w.shape[want_axis],)
    assert g.activation_source(op.input[0])[0] == "x"
    if len(op.input) > 2:
        assert g.initializers[op.input[2]].data_type == TensorProto.FLOAT
    ref = _session(fp32).run(None, {"x": x})[0]
    got = _session(result.model).run(None, {"x": x})[0]
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.999, cos


def test_random_calibration_is_recorded(resnet_fp32):
    from deploykit.data import RandomSource

    fp32, specs, _ = resnet_fp32
    r = quantize(fp32, RandomSource(specs, samples=16), "minmax", batch_size=8)
    assert r.random_data and r.samples == 16
    assert {p.key: p.value for p in r.model.metadata_props}[META_RANDOM] == "true"


def test_fixed_batch_model_calibrates_at_its_batch_size():
    """A model exported with batch 1 fixed cannot run the default calibration batch of 8."""
    from onnx import helper, numpy_helper

    from deploykit import model
    from deploykit.data import open_source

    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")])
    fp32 = model.normalise(helper.make_model(graph, opset_imports=[helper.make_opsetid("", canonical.OPSET)]))
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    result = quantize(fp32, open_source(lambda: [{"x": x}], model.input_specs(fp32)), "entropy", batch_size=8)
    assert result.samples == 20 and canonical.lint(result.model) == []
    assert result.table["x"].max == pytest.approx(float(x.max()))
