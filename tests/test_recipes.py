"""Each accuracy-recovering recipe helps on a small model built to have the problem it fixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.data import ArraySource
from deploykit.errors import ConfigError
from deploykit.model import input_specs, normalise
from deploykit.ortsession import session
from deploykit.quantize import quantize, recipes


def _model(nodes: list, inits: dict[str, np.ndarray], x_shape: list, y_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape[1:]])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return normalise(m)


def _source(tmp_path: Path, model: onnx.ModelProto, x: np.ndarray, name: str = "calib") -> ArraySource:
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x.astype(np.float32))
    return ArraySource(path, input_specs(model))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model, exact=True).run(None, {"x": x.astype(np.float32)})[0]  # exact Q/DQ semantics


def _err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _lint_clean(model: onnx.ModelProto) -> None:
    from deploykit import canonical as rules

    assert rules.lint(model) == []


def test_parse_recipe():
    assert recipes.parse_recipe(None) == () == recipes.parse_recipe("none")
    steps = recipes.parse_recipe("bias_correction, smoothquant:0.8")
    assert [str(s) for s in steps] == ["smoothquant:0.8", "bias_correction"]  # rewrites first
    assert recipes.format_recipe(recipes.parse_recipe("adaround:50,cle")) == "cle,adaround:50"
    for bad, msg in [("bogus", "unknown recipe step 'bogus'"), ("smoothquant:2", "alpha"),
                     ("adaround:0.5", "iterations"), ("cle:3", "takes no argument"), ("cle,cle", "twice"),
                     ("smoothquant:x", "not a number"), ("gptq:0", "damping"), ("adaround,gptq", "use one")]:
        with pytest.raises(ConfigError, match=msg):
            recipes.parse_recipe(bad)


def test_auto_recipe_picks_by_network_kind():
    cnn = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], {"w": np.ones((4, 3, 1, 1))},
                 [1, 3, 4, 4], [1, 4, 4, 4])
    assert recipes.resolve_auto("auto", cnn) == recipes.DEFAULT_CNN == "bias_correction"
    enc = _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="m1"),
                  helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="ln", axis=-1),
                  helper.make_node("MatMul", ["n", "w2"], ["y"], name="m2")],
                 {"w1": np.ones((8, 8)), "w2": np.ones((8, 8)), "g": np.ones(8), "b": np.zeros(8)}, [1, 4, 8], [1, 4, 8])
    assert recipes.resolve_auto("auto", enc) == recipes.DEFAULT_TRANSFORMER == "smoothquant:0.9,gptq"
    assert recipes.resolve_auto("cle", enc) == "cle"


def test_bias_correction_removes_the_mean_shift_of_systematic_weight_rounding(tmp_path):
    # every weight sits 0.4 of a step above an int8 level: nearest rounding shifts each output by
    # -0.4 * scale * sum(x), and x has a large positive mean: the int8 output is biased
    rng = np.random.default_rng(0)
    k = rng.integers(-100, 100, (16, 64)).astype(np.float32)
    k[:, 0] = 126.6  # fixes each row's max, hence its per-channel scale (127.0 / 127 after the next line)
    w = (k + 0.4) * (127.0 / 127.0) / 100.0
    w[:, 0] = 1.27
    m = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
               {"w": w, "b": np.zeros(16)}, [1, 64], [1, 16])
    x = 4.0 + rng.normal(0, 0.5, (256, 64))
    src = _source(tmp_path, m, x[:128])
    res = quantize(m, src, method="minmax")
    edits = recipes.post_placement(m, res.model, recipes.parse_recipe("bias_correction"), src)
    assert edits.summary["bias_correction"]["layers"] == 1
    fixed = recipes.apply_edits(res.model, edits)
    _lint_clean(fixed)
    ref, before, after = _run(m, x[128:]), _run(res.model, x[128:]), _run(fixed, x[128:])
    shift_before = np.abs((before - ref).mean(0)).mean()
    shift_after = np.abs((after - ref).mean(0)).mean()
    assert shift_after < 0.1 * shift_before
    assert _err(ref, after) < 0.5 * _err(ref, before)
    # float layers keep their FP32 bias
    untouched = recipes.apply_edits(res.model, edits, float_layers=["fc"])
    np.testing.assert_array_equal(_run(untouched, x[128:]), before)


def test_bias_correction_reaches_a_matmul_bias_add(tmp_path):
    # the exported form of a transformer Linear: MatMul then Add(bias)
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.3, (32, 16))
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                helper.make_node("Add", ["h", "b"], ["y"], name="add")], {"w": w, "b": np.ones(16)}, [1, 6, 32], [1, 6, 16])
    src = _source(tmp_path, m, 3 + rng.normal(0, 1, (64, 6, 32)))
    res = quantize(m, src, method="minmax")
    edits = recipes.post_placement(m, res.model, recipes.parse_recipe("bias_correction"), src)
    assert list(edits.bias_delta) == ["mm"] and edits.bias_delta["mm"].shape == (16,)
    fixed = recipes.apply_edits(res.model, edits)
    assert next(n for n in fixed.graph.node if n.name == "add").input[1] == "mm_corrected_bias"
    _lint_clean(fixed)


def test_smoothquant_rescues_a_matmul_with_an_outlier_channel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (128, 6, 128))
    x[..., 5] *= 50.0  # two outlier channels set the per-tensor scale: the others lose their bits
    x[..., 9] *= 25.0
    w = rng.normal(0, 0.2, (128, 24))
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w}, [1, 6, 128], [1, 6, 24])
    src = _source(tmp_path, m, x[:64])
    smoothed, info = recipes.pre_calibration(m, recipes.parse_recipe("smoothquant:0.5"), src)
    assert info["smoothquant"] == {"alpha": 0.5, "tensors": 1}
    np.testing.assert_allclose(_run(smoothed, x[64:]), _run(m, x[64:]), rtol=1e-4, atol=1e-4)  # same function
    plain = quantize(m, src, method="minmax").model
    sq = quantize(smoothed, src, method="minmax").model
    _lint_clean(sq)
    ref = _run(m, x[64:])
    assert _err(ref, _run(sq, x[64:])) < 0.4 * _err(ref, _run(plain, x[64:]))  # measured 0.015 vs 0.072


def test_smoothquant_folds_into_a_layernorm_read_only_by_matmuls(tmp_path):
    rng = np.random.default_rng(2)
    gamma = np.ones(16)
    gamma[3] = 40.0
    m = _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="ln", axis=-1),
                helper.make_node("MatMul", ["n", "wq"], ["q"], name="mq"),
                helper.make_node("MatMul", ["n", "wk"], ["k"], name="mk"),
                helper.make_node("Add", ["q", "k"], ["y"], name="add")],
               {"g": gamma, "b": np.zeros(16), "wq": rng.normal(0, 0.3, (16, 8)), "wk": rng.normal(0, 0.3, (16, 8))},
               [1, 4, 16], [1, 4, 8])
    x = rng.normal(0, 1, (64, 4, 16))
    src = _source(tmp_path, m, x[:32])
    smoothed, _ = recipes.pre_calibration(m, recipes.parse_recipe("smoothquant"), src)
    assert not any(n.op_type == "Mul" for n in smoothed.graph.node)  # folded into gamma/beta, no new op
    np.testing.assert_allclose(_run(smoothed, x), _run(m, x), rtol=1e-4, atol=1e-4)


def _cle_model(act: str) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (8, 3, 1, 1))
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1))
    w1[0] *= 60.0  # channel 0 of the activation between the convs is 60x the others...
    w2[:, 0] /= 60.0  # ...and the next conv compensates: same function, one bad per-tensor scale
    act_node = (helper.make_node("Relu", ["h"], ["a"], name="act") if act == "relu" else
                helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act"))
    return _model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"), act_node,
                   helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")],
                  {"w1": w1, "b1": np.full(8, 0.1), "w2": w2, "lo": np.array(0.0), "hi": np.array(6.0)},
                  [1, 3, 6, 6], [1, 8, 6, 6])


def test_cle_equalizes_a_relu_pair_and_leaves_relu6_alone(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (96, 3, 6, 6))
    m = _cle_model("relu")
    src = _source(tmp_path, m, x[:48])
    eq, info = recipes.pre_calibration(m, recipes.parse_recipe("cle"), src)
    assert info["cle"] == {"pairs": 1}
    np.testing.assert_allclose(_run(eq, x[48:]), _run(m, x[48:]), rtol=1e-4, atol=1e-5)
    ref = _run(m, x[48:])
    before = _err(ref, _run(quantize(m, src, method="minmax").model, x[48:]))
    after = _err(ref, _run(quantize(eq, src, method="minmax").model, x[48:]))
    assert after < 0.5 * before
    relu6 = _cle_model("relu6")
    _, info6 = recipes.pre_calibration(relu6, recipes.parse_recipe("cle"), _source(tmp_path, relu6, x[:8], "c6"))
    assert info6["cle"] == {"pairs": 0}  # Clip(0, 6) is not scale-invariant


@pytest.mark.slow
def test_adaround_rounds_each_fp32_weight_down_or_up_and_lowers_the_error(tmp_path):
    pytest.importorskip("torch", reason="adaround runs torch on the CPU (pip install torch==2.13.0)")
    rng = np.random.default_rng(5)
    basis = rng.normal(0, 1, (4, 48))
    x = rng.normal(0, 1, (260, 4)) @ basis + 0.05 * rng.normal(0, 1, (260, 48))  # correlated inputs
    w = {"w1": rng.normal(0, 0.05, (48, 32)), "w2": rng.normal(0, 0.05, (32, 20))}
    for v in w.values():
        v[0, :] = 2.0  # one large row sets every column's scale: the other weights sit on ~3 int8 steps
    m = _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], w, [1, 48], [1, 20])
    src = _source(tmp_path, m, x[:128])
    res = quantize(m, src, method="minmax")
    edits = recipes.post_placement(m, res.model, recipes.parse_recipe("adaround:300"), src, adaround_samples=128)
    info = edits.summary["adaround"]
    assert info["layers"] == 2 and info["kept"] == 2
    rounded = recipes.apply_edits(res.model, edits)
    _lint_clean(rounded)
    ref = _run(m, x[128:])
    assert _err(ref, _run(rounded, x[128:])) < 0.9 * _err(ref, _run(res.model, x[128:]))  # measured 0.046 vs 0.054
    for name, weight in (("mm1", "w1"), ("mm2", "w2")):
        changed = edits.int8_weights[name]
        assert changed.dtype == np.int8 and np.abs(changed.astype(int)).max() <= 127
        # each weight is its FP32 value rounded down or up on the canonical grid (per column of the [K, N]
        # weight), never a step beyond: the rounding starts from the FP32 weight, not the int8 one
        node = next(n for n in res.model.graph.node if n.name == name)
        dq = next(n for n in res.model.graph.node if n.output[0] == node.input[1])
        scale = numpy_helper.to_array(next(i for i in res.model.graph.initializer if i.name == dq.input[1]))
        assert scale.shape == (w[weight].shape[1],)
        steps = w[weight] / scale[None, :]
        assert np.all((changed == np.floor(steps)) | (changed == np.ceil(steps)))
        assert np.any(changed != np.round(steps))  # and it did move some off nearest


def test_gptq_lowers_the_error_of_a_matmul_and_a_transposed_gemm(tmp_path):
    rng = np.random.default_rng(5)
    basis = rng.normal(0, 1, (4, 48))
    x = rng.normal(0, 1, (260, 4)) @ basis + 0.05 * rng.normal(0, 1, (260, 48))  # correlated inputs
    x[:, 0] *= 0.02  # a quiet input channel...
    w1 = rng.normal(0, 0.05, (48, 32))
    w2 = rng.normal(0, 0.05, (20, 32))  # Gemm transB: [N, K], per-channel scales on axis 0
    w1[0, :] = 2.0  # ...read by a large weight row (SmoothQuant's outliers): it sets every output's scale, the
    # other weights sit on ~3 int8 steps, and their rounding error is most of the output's
    w2[:, 0] = 2.0
    m = _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
                helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="gemm", transB=1)],
               {"w1": w1, "w2": w2, "b2": np.full(20, 0.1)}, [1, 48], [1, 20])
    src = _source(tmp_path, m, x[:128])
    res = quantize(m, src, method="minmax")
    edits = recipes.post_placement(m, res.model, recipes.parse_recipe("gptq"), src, adaround_samples=128)
    assert edits.summary["gptq"] == {"layers": 2, "kept": 2, "samples": 128, "damping": 0.01}
    assert edits.int8_weights["gemm"].shape == (20, 32) and edits.int8_weights["gemm"].dtype == np.int8
    rounded = recipes.apply_edits(res.model, edits)
    _lint_clean(rounded)
    ref = _run(m, x[128:])
    assert _err(ref, _run(rounded, x[128:])) < 0.7 * _err(ref, _run(res.model, x[128:]))  # measured 0.042 vs 0.075
