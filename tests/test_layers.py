"""Layer-by-layer fidelity (deploykit/layers.py): the cut is lossless, verdicts mean what they say,
and a wrong scale injected in one layer of a lowering is named by the per-layer comparison
while the end-to-end figures only say "a little worse"."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("torch", reason="the test models need torch (pip install torch==2.13.0)")

from deploykit import layers  # noqa: E402
from deploykit.backend import Artifact  # noqa: E402
from deploykit.testing import eval_feeds, make_canonical, make_target  # noqa: E402
from deploykit_onnxruntime import OnnxRuntimeBackend  # noqa: E402


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    return make_canonical("mobilenet", tmp_path_factory.mktemp("layers"))


@pytest.fixture(scope="module")
def batches():
    return [eval_feeds("mobilenet", 16, seed=s) for s in (1, 2)]


def _tensor(name: str, scale: float = 0.1) -> layers.CutTensor:
    return layers.CutTensor(name, f"{name}_Q", f"layer {name}", scale, 0, "int8")


# ---------------------------------------------------------------------------------------
# verdicts on known differences
# ---------------------------------------------------------------------------------------
def test_verdicts_on_known_differences():
    rng = np.random.default_rng(0)
    want = rng.integers(-120, 120, size=20000)
    t = _tensor("x")
    assert layers.judge_layer(t, want, want).verdict == "exact"

    flips = want.copy()
    idx = rng.choice(want.size, 300, replace=False)
    flips[idx] += rng.choice([-1, 1], size=idx.size)  # integer rounding: one step, both ways
    r = layers.judge_layer(t, flips, want)
    assert r.verdict == "rounding" and r.max_steps == 1 and r.within_one_step == 1.0 and abs(r.gain - 1) < 1e-3

    scaled = np.clip(np.round(want * 0.8), -128, 127)  # a lowering that used 1.25x the scale
    r = layers.judge_layer(t, scaled, want)
    assert r.verdict == "wrong_scale" and abs(r.gain - 0.8) < 0.02

    saturated = want.copy()
    big = np.flatnonzero(np.abs(want) > 100)[:400]  # a kernel saturating 2% of the largest values
    saturated[big] = np.sign(want[big]) * 90
    r = layers.judge_layer(t, saturated, want)
    assert r.verdict == "beyond_rounding" and r.within_one_step < 0.99 and abs(r.gain - 1) < 1e-3

    mismatch = layers.judge_layer(t, want[:10], want)
    assert mismatch.verdict == "beyond_rounding" and mismatch.max_steps == -1 and mismatch.gain == 0.0


def test_report_json_is_finite(tmp_path):
    t = _tensor("x")
    report = layers.LayerReport("t", [layers.judge_layer(t, np.zeros(3), np.zeros(5))], 1)
    layers.save_json([report], tmp_path / "layers.json")  # a shape mismatch must not write NaN/inf
    data = json.loads((tmp_path / "layers.json").read_text())
    assert data["layers"][0]["worst"]["verdict"] == "beyond_rounding"


# ---------------------------------------------------------------------------------------
# the cut
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cut_model_fed_its_own_reference_reproduces_it(canonical, batches):
    cut = layers.find_cut(canonical.model)
    assert len(cut) >= 8 and all(t.dtype == "int8" for t in cut.tensors)
    reference = layers.reference(canonical.model, cut, batches)
    runner = layers.OnnxLayerRunner(canonical.model, cut, layers.onnxruntime_runner)
    report = layers.compare_layers("canonical", canonical.model, runner, batches, cut, reference)
    assert [r.verdict for r in report.layers] == ["exact"] * len(cut)
    assert report.samples == 32 and not report.not_compared


@pytest.mark.slow
def test_onnxruntime_int8_activations_are_exact_layer_by_layer(canonical, batches, tmp_path):
    backend = OnnxRuntimeBackend()
    target = make_target(OnnxRuntimeBackend, activations="int8")
    artifact = backend.lower(canonical, target, tmp_path / "ort.onnx")
    check, report = layers.layer_check(backend, artifact, canonical, target, batches)
    assert report is not None and report.counts()["exact"] == len(report.layers) == len(layers.find_cut(canonical.model))
    assert check.name == "layer_within_one_step" and check.value == 1.0


# ---------------------------------------------------------------------------------------
# a deliberately broken lowering
# ---------------------------------------------------------------------------------------
def _with_wrong_scale(path, tensor: str, factor: float):
    """The lowered model with one QuantizeLinear's scale multiplied by ``factor`` (its own copy)."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == tensor)
    scale = next(i for i in model.graph.initializer if i.name == node.input[1])
    value = onnx.numpy_helper.to_array(scale) * np.float32(factor)
    node.input[1] = f"{node.name}_wrong_scale"
    model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), node.input[1]))
    onnx.save(model, str(path))


@pytest.mark.slow
def test_wrong_scale_in_one_layer_is_named_by_the_per_layer_comparison(canonical, batches, tmp_path):
    from deploykit import checks

    backend = OnnxRuntimeBackend()
    target = make_target(OnnxRuntimeBackend, activations="int8")
    good = backend.lower(canonical, target, tmp_path / "good.onnx")
    cut = layers.find_cut(canonical.model)
    victim = cut.tensors[len(cut) // 2]
    bad_path = tmp_path / "bad.onnx"
    bad_path.write_bytes(good.path.read_bytes())
    _with_wrong_scale(bad_path, victim.name, 1.25)
    bad = Artifact("onnxruntime", bad_path, (bad_path,))

    check, report = layers.layer_check(backend, bad, canonical, target, batches)
    flagged = report.flagged()
    assert [r.tensor for r in flagged] == [victim.name]  # named, and nothing else is
    assert flagged[0].verdict == "wrong_scale" and abs(flagged[0].gain - 0.8) < 0.03
    assert check.status == "info" and check.value < 0.99 and victim.layer in check.message

    # end to end, the same fault is a number that names no layer, and close to a passing one
    feeds = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    want = layers.onnxruntime_runner(canonical.model)(feeds)
    got = backend.load(bad, target).run(feeds)
    end_to_end = checks.compare(list(want.values()), got, prefix="fidelity_")
    assert end_to_end["fidelity_cosine"] > 0.99


@pytest.mark.slow
def test_default_thresholds_judge_the_per_layer_figure(canonical, batches, tmp_path):
    """targets.toml judges min_layer_within_one_step (0.99): onnxruntime's default lowering passes it."""
    from pathlib import Path

    from deploykit.targets import load_targets

    repo_targets = load_targets(Path(__file__).resolve().parents[1] / "targets.toml")
    thresholds = repo_targets.raw_targets["onnxruntime"]["thresholds"]
    assert thresholds.get("min_layer_within_one_step") == 0.99 and "min_fidelity_cosine" not in thresholds
    backend = OnnxRuntimeBackend()
    target = make_target(OnnxRuntimeBackend, thresholds=dict(thresholds))
    artifact = backend.lower(canonical, target, tmp_path / "default.onnx")
    check, report = layers.layer_check(backend, artifact, canonical, target, batches)
    assert check.status == "pass", layers.table(report)


@pytest.mark.slow
def test_build_reports_worst_layers_and_compare_layers_cli(canonical, tmp_path, capsys):
    """deploykit build runs the per-layer check (report.md names the worst layers);
    deploykit compare-layers OUT prints the table, writes layers.json and a plot, and --json."""
    from click.testing import CliRunner

    from deploykit.cli import cli

    src = canonical.path.parent / "mobilenet.onnx"
    np.savez(tmp_path / "calib.npz", x=eval_feeds("mobilenet", 32, seed=0)["x"])
    np.savez(tmp_path / "eval.npz", x=eval_feeds("mobilenet", 16, seed=1)["x"])
    out = tmp_path / "out"
    targets = tmp_path / "targets.toml"
    targets.write_text('[targets.ort]\nbackend = "onnxruntime"\nruns = 3\nwarmup = 1\n'
                       '[targets.ort.options]\nactivations = "int8"\n'
                       '[targets.ort.thresholds]\nmin_layer_within_one_step = 0.99\n')
    runner = CliRunner()
    result = runner.invoke(cli, ["build", str(src), "-t", "ort", "--calib", str(tmp_path / "calib.npz"),
                                 "--eval", str(tmp_path / "eval.npz"), "--targets-file", str(targets),
                                 "-o", str(out), "--no-baseline"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    check = next(c for c in manifest["targets"][0]["checks"] if c["name"] == "layer_within_one_step")
    assert check["status"] == "pass" and check["value"] == 1.0 and check["details"]["worst"]
    assert "Worst layers" in (out / "report.md").read_text()

    result = runner.invoke(cli, ["compare-layers", str(out)])
    assert result.exit_code == 0, result.output
    assert "within 1 step" in result.output and "exact" in result.output
    assert (out / "layers.json").is_file() and (out / "layers.png").stat().st_size > 1000
    result = runner.invoke(cli, ["compare-layers", str(out), "--json", "--samples", "4"])
    data = json.loads(result.output)
    assert data["layers"][0]["target"] == "ort" and data["layers"][0]["samples"] == 4
    # int8 kernels may round a value one step differently from the Q/DQ arithmetic (`rounding`:
    # measured on an AVX2 CPU without VNNI with uint8 weights); anything else is a lowering fault
    counts = data["layers"][0]["counts"]
    assert counts.get("exact", 0) + counts.get("rounding", 0) == len(data["layers"][0]["layers"])
    assert counts.get("exact", 0) >= 1

    from deploykit.cli import main

    capsys.readouterr()
    assert main(["compare-layers", str(tmp_path)]) != 0  # not a build folder: one line naming it
    err = capsys.readouterr().err
    assert "manifest.json" in err and str(tmp_path) in err and "Traceback" not in err
