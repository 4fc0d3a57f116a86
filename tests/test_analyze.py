"""deploykit analyze (per-layer sensitivity from one calibration) and build --accuracy-target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit import analyze as an
from deploykit.cli import main
from deploykit.data import ArraySource
from deploykit.errors import ConfigError
from deploykit.model import input_specs, normalise
from deploykit.quantize import quantize, recipes, requantize


def _mlp() -> onnx.ModelProto:
    """Three Gemm layers; fc2's input has one channel 40x the others, so quantizing it costs the
    most (the same function as a balanced net: fc2's weights compensate)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (24, 16))
    w1[3] *= 40
    w2 = rng.normal(0, 0.3, (24, 24))
    w2[:, 3] /= 40
    w3 = rng.normal(0, 0.3, (10, 24))
    inits = {"w1": w1, "b1": np.zeros(24), "w2": w2, "b2": np.zeros(24), "w3": w3, "b3": np.zeros(10)}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
         helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
         helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
         helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
         helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return normalise(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.fixture()
def mlp_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (400, 16)).astype(np.float32)
    model = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(model))
    np.savez(tmp_path / "calib.npz", x=x[:200])
    np.savez(tmp_path / "eval.npz", x=x[200:])
    return model, tmp_path / "calib.npz", tmp_path / "eval.npz"


def _setup(files: tuple[Path, Path, Path], recipe: str = "none") -> tuple[an.Quantized, an.EvalData]:
    model, calib, evals = files
    fp32 = normalise(onnx.load(str(model)))
    specs = input_specs(fp32)
    result = quantize(fp32, ArraySource(calib, specs), method="minmax", recipe=recipe)
    return an.Quantized(fp32, result), an.prepare_eval(fp32, ArraySource(evals, specs), task="classification")


def test_parse_accuracy_target():
    assert an.parse_accuracy_target("top1_agreement=0.95") == an.AccuracyTarget("top1_agreement", 0.95)
    assert an.parse_accuracy_target("cosine=0.998").met(0.999)
    assert an.parse_accuracy_target("accuracy_drop=0.01").met(0.005)
    for bad, msg in [("top1=0.9", "use top1_agreement"), ("cosine=x", "not a number"),
                     ("top1_agreement=95", "fraction"), ("cosine", "use top1_agreement")]:
        with pytest.raises(ConfigError, match=msg):
            an.parse_accuracy_target(bad)


def test_analyze_ranks_the_layer_with_the_outlier_input_first(mlp_files, tmp_path):
    q, data = _setup(mlp_files)
    analysis = an.analyze(q, data)
    assert analysis.metric == "top1_agreement" and analysis.samples == 200
    assert [s.name for s in analysis.layers][0] == "fc2"
    fc2 = analysis.layers[0]
    assert fc2.only_float["top1_agreement"] > analysis.baseline["top1_agreement"] + 0.05
    assert fc2.only_float["sqnr"] > analysis.baseline["sqnr"] + 10
    # only fc2 int8 is the worst of the "only int8" variants
    assert min(analysis.layers, key=lambda s: s.only_int8["sqnr"]).name == "fc2"
    paths = an.write_outputs(analysis, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["layers"][0]["name"] == "fc2" and saved["metric"] == "top1_agreement"
    assert "| 1 | fc2 | Gemm |" in paths["md"].read_text()
    if "png" in paths:  # matplotlib installed (extra 'plots')
        assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["svg"].read_text().lstrip().startswith("<?xml")


def test_variants_reuse_one_calibration(mlp_files):
    q, _ = _setup(mlp_files, recipe="bias_correction")
    assert q.result.recipe == "bias_correction" and q.result.edits
    meta = {p.key: p.value for p in q.result.model.metadata_props}
    assert meta[recipes.META_RECIPE] == "bias_correction"
    again = requantize(q.result, q.fp32)  # edits re-applied, same model
    assert again.model.SerializeToString() == q.result.model.SerializeToString()
    one_float = q.variant(["fc2"])
    gemm = next(n for n in one_float.graph.node if n.name == "fc2")
    assert gemm.input[2] == "b2"  # a float layer keeps its FP32 bias; int8 layers carry the corrected one
    assert next(n for n in one_float.graph.node if n.name == "fc1").input[2] == "fc1_corrected_bias"


def test_search_finds_the_fewest_float_layers(mlp_files):
    q, data = _setup(mlp_files)
    found = an.search_float_layers(q, data, an.AccuracyTarget("top1_agreement", 0.97))
    assert found.met and found.float_layers == ["fc2"] and found.measured >= 0.97
    assert 0.3 < found.int8_mac_share < 0.7
    reached = an.search_float_layers(q, data, an.AccuracyTarget("top1_agreement", 0.5))
    assert reached.met and reached.float_layers == []  # already met all-int8
    with pytest.raises(ConfigError, match="labels"):
        an.search_float_layers(q, data, an.AccuracyTarget("accuracy_drop", 0.01))


def test_search_judges_every_target_and_the_worst_counts(mlp_files):
    q, data = _setup(mlp_files)
    exact = lambda model: an.run_model(model, data)  # noqa: E731 -- the canonical semantics

    def broken(model):
        raise RuntimeError("no runtime for this variant")

    found = an.search_float_layers(q, data, an.AccuracyTarget("top1_agreement", 0.97),
                                   judges={"exact": exact, "broken": broken})
    assert found.met and found.float_layers == ["fc2"]  # the failing judge was dropped, not fatal
    assert all(set(t["judges"]) == {"exact"} for t in found.tried)
    # a runtime that ignores the float layers (computes every layer int8) never meets the target:
    # the search reports its figure, not the better one of the exact judge
    all_int8 = lambda model: an.run_model(q.variant(()), data)  # noqa: E731
    worst = an.search_float_layers(q, data, an.AccuracyTarget("top1_agreement", 0.97),
                                   judges={"exact": exact, "all_int8": all_int8})
    assert not worst.met
    assert all(t["top1_agreement"] == t["judges"]["all_int8"] <= t["judges"]["exact"] for t in worst.tried)


def test_prune_back_returns_float_layers_the_target_does_not_need(mlp_files):
    """A ranking that puts a layer the target does not need first (as a small, noisy ranking set
    can): the prefix search floats fc1 and fc2; the prune-back tries them back in int8, largest
    MACs first, and returns fc1, leaving fc2, the layer that needs it."""
    q, data = _setup(mlp_files)
    goal = an.AccuracyTarget("top1_agreement", 0.97)
    sensitivity = lambda name, macs, top1, sqnr: an.LayerSensitivity(  # noqa: E731
        name, "Gemm", macs, {"top1_agreement": top1, "sqnr": sqnr}, {})
    misranked = an.Analysis("top1_agreement", 200, {"top1_agreement": 0.9, "sqnr": 10.0},
                            [sensitivity("fc1", 384, 0.99, 30.0), sensitivity("fc2", 576, 0.95, 20.0),
                             sensitivity("fc3", 240, 0.9, 10.0)])
    greedy = an.search_float_layers(q, data, goal, analysis=misranked, prune=0)
    assert greedy.met and greedy.float_layers == ["fc1", "fc2"] and greedy.pruned == []
    found = an.search_float_layers(q, data, goal, analysis=misranked)
    assert found.met and found.float_layers == ["fc2"] and found.measured >= 0.97
    assert [(p["layer"], p["int8"]) for p in found.pruned] == [("fc2", False), ("fc1", True)]
    assert found.int8_mac_share == pytest.approx(1 - 576 / 1200) and found.int8_mac_share > greedy.int8_mac_share
    assert found.to_json()["pruned"][1]["top1_agreement"] >= 0.97


def test_analyze_cli_writes_table_json_and_plot(mlp_files, tmp_path, capsys):
    model, calib, evals = mlp_files
    out = tmp_path / "an"
    assert main(["analyze", str(model), "--calib", str(calib), "--eval", str(evals), "--task", "classification",
                 "--recipe", "none", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"][0]["name"] == "fc2" and report["settings"]["recipe"] == "none"
    assert (out / "analysis.json").exists() and (out / "analysis.md").exists()
    assert main(["analyze", str(model), "--calib", str(calib), "--recipe", "bogus", "-o", str(out)]) == 2
    assert "unknown recipe step 'bogus'" in capsys.readouterr().err


def test_build_accuracy_target_met_and_checked_on_each_target(mlp_files, tmp_path, capsys, monkeypatch):
    from deploykit_onnxruntime import OrtRunner

    batches: list[int] = []  # every batch the onnxruntime artifacts run: the judged variants and the checks
    real_run = OrtRunner.run
    monkeypatch.setattr(OrtRunner, "run", lambda self, feeds: batches.append(len(next(iter(feeds.values()))))
                        or real_run(self, feeds))
    model, calib, evals = mlp_files
    out = tmp_path / "b"
    code = main(["build", str(model), "--target", "onnxruntime", "--calib", str(calib), "--eval", str(evals),
                 "--task", "classification", "--activations", "symmetric", "--recipe", "none",
                 "--accuracy-target", "top1_agreement=0.97", "--no-baseline", "-o", str(out)])
    # variants judged at the batch the accuracy check runs at (1, the target's first batch size; 8 is its
    # latency), never at the evaluation's own batching (32): runtimes' int8 results depend on the batch
    assert set(batches) == {1, 8} and batches.count(1) > 200
    manifest = json.loads((out / "manifest.json").read_text())
    search = manifest["quantization"]["accuracy_target"]
    assert search["met"] and search["float_layers"] == ["fc2"]
    assert search["judged_on"] == ["onnxruntime"]  # prefixes judged on the lowered artifact, not only the canonical model
    assert all("onnxruntime" in t["judges"] for t in search["tried"])
    assert manifest["quantization"]["float_layers"][0]["name"] == "fc2"
    assert search["latency_cost"]["all_int8_ms"] > 0
    target = manifest["targets"][0]
    check = next(c for c in target["checks"] if c["name"] == "top1_agreement")
    assert check["threshold"] == 0.97  # the accuracy target is judged on the target's own artifact
    assert check["status"] == "pass" and code == 0
    assert [(p["layer"], p["int8"]) for p in search["pruned"]] == [("fc2", False)]  # tried back in int8: needed
    report = (out / "report.md").read_text()
    assert "accuracy target top1_agreement=0.97: met" in report and "prune-back: 0 of 1 tried back in int8" in report


def test_build_unmet_accuracy_target_ships_the_best_and_exits_1(tmp_path, capsys):
    # the pooling input stays int8 whatever compute layer is float: cosine 1.0 cannot be met
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)],
        "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n)
         for n, s in (("w", (8, 3, 3, 3)), ("b", (8,)), ("wf", (5, 8)), ("bf", (5,)))])
    model = tmp_path / "cnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(model))
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "u"
    code = main(["build", str(model), "--target", "onnxruntime", "--calib", str(tmp_path / "calib.npz"),
                 "--recipe", "none", "--accuracy-target", "cosine=1.0", "--no-baseline", "-o", str(out)])
    assert code == 1
    assert "--accuracy-target cosine=1 not met" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["quantization"]["accuracy_target"]["met"]
    assert (out / "canonical.qdq.onnx").exists()  # the best found is shipped
    assert main(["build", str(model), "--target", "onnxruntime", "--calib", str(tmp_path / "calib.npz"),
                 "--accuracy-target", "top1=0.9", "-o", str(tmp_path / "bad")]) == 2


# ------------------------------------------------------------------------------ --task auto
def _rename_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    old = out.graph.output[0].name
    for node in out.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    out.graph.output[0].name = name
    return out


def _mean_pooled(dim: int = 12) -> onnx.ModelProto:
    """A sentence embedding's head: token states [N, S, D] (a MatMul), masked sum over S, divided
    by the mask's sum: [N, D], the shape class scores have too."""
    w = numpy_helper.from_array(np.eye(dim, dtype=np.float32), "w")
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Unsqueeze", ["mask", "two"], ["m3"], name="m3"),
             helper.make_node("Mul", ["h", "m3"], ["hm"], name="masked"),
             helper.make_node("ReduceSum", ["hm", "axis"], ["s"], name="sum", keepdims=0),
             helper.make_node("ReduceSum", ["m3", "axis"], ["n"], name="count", keepdims=0),
             helper.make_node("Div", ["s", "n"], ["out"], name="mean")]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", dim]),
                                              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "S"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", dim])],
                              [w, axis, numpy_helper.from_array(np.array([2], np.int64), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_task_auto_tells_class_scores_from_an_embedding(tmp_path):
    from deploykit.checks import classifies, head_kind

    mlp = _mlp()  # Gemm -> output
    assert head_kind(_rename_output(mlp, "out")) == "scores"
    soft = onnx.ModelProto()
    soft.CopyFrom(_rename_output(mlp, "z"))
    soft.graph.node.append(helper.make_node("Softmax", ["z"], ["out"], name="soft"))
    soft.graph.output[0].name = "out"
    assert head_kind(soft) == "scores"  # through the Softmax to the Gemm
    pooled = _mean_pooled()
    assert head_kind(pooled) == "embedding"  # the mask sum's division comes first
    assert head_kind(_rename_output(pooled, "logits")) == "scores"  # a name that says it decides
    assert head_kind(_rename_output(mlp, "sentence_embedding")) == "embedding"
    scores = np.zeros((4, 12), np.float32)  # the same [N, C] array either way
    assert classifies("auto", scores, mlp) and not classifies("auto", scores, pooled)
    assert classifies("classification", scores, pooled) and not classifies("other", scores, mlp)
    assert not classifies("auto", np.zeros((4, 5, 12), np.float32), mlp)  # rank 3: token states
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(8, 5, 12)).astype(np.float32), "mask": np.ones((8, 5), np.float32)}
    np.savez(tmp_path / "eval.npz", **feeds)
    data = an.prepare_eval(pooled, ArraySource(tmp_path / "eval.npz", input_specs(pooled)), task="auto")
    assert not data.classification and an.primary_metric(data) == "cosine"
