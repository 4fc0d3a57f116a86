"""The TFLite per-layer runner (deploykit_tflite.layers): the .tflite itself, cut at every canonical
quantized tensor and run by LiteRT, each layer fed the canonical model's own inputs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("tensorflow", reason="lowering to TFLite needs tensorflow: pip install 'deploykit[tflite]'")
skip_unless_installed("ai_edge_litert", reason="running TFLite needs ai_edge_litert: pip install 'deploykit[tflite]'")
skip_unless_installed("torch", reason="the test models need torch (pip install torch==2.13.0)")

from deploykit import layers  # noqa: E402
from deploykit.backend import Capability  # noqa: E402
from deploykit.testing import make_target  # noqa: E402
from deploykit_tflite import TFLiteBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from zoo import dead_channel_cnn, make_canonical_from  # noqa: E402


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    """The dead-channel CNN (channels a real network has: tiny, dead, dead near the int32 limit)."""
    work = tmp_path_factory.mktemp("tflite_layers")
    canonical = make_canonical_from(dead_channel_cnn(), work, "dead", shape=(3, 8, 8))
    target = make_target(TFLiteBackend, threads=1)
    artifact = TFLiteBackend().lower(canonical, target, work / "dead.tflite")
    rng = np.random.default_rng(5)
    batches = [{"x": rng.random((8, 3, 8, 8), dtype=np.float32)} for _ in range(2)]
    return canonical, target, artifact, batches, work


def _report(canonical, target, artifact, batches, name="tflite") -> layers.LayerReport:
    cut = layers.find_cut(canonical.model)
    runner = TFLiteBackend().layer_runner(artifact, canonical, target, cut)
    try:
        return layers.compare_layers(name, canonical.model, runner, batches, cut)
    finally:
        runner.close()


def test_every_layer_of_the_tflite_is_within_one_step(dead):
    """Every quantized tensor is compared, in the artifact's NHWC layout, and is exact or one
    step off. Before the patch left int32 headroom, stem channel 6 (bias -2, weights -2e-6)
    wrapped around the accumulator and read 127 instead of 0: this comparison is what found it
    on EfficientNet-Lite0."""
    canonical, target, artifact, batches, _ = dead
    assert Capability.LAYER_RUNNER in TFLiteBackend.capabilities
    report = _report(canonical, target, artifact, batches)
    cut = layers.find_cut(canonical.model)
    assert report.not_compared == [] and len(report.layers) == len(cut) == 3
    assert all(r.verdict in ("exact", "rounding") and r.max_steps <= 1 for r in report.layers), layers.table(report)
    assert report.samples == 16 and report.min_within_one_step == 1.0


def test_a_wrong_scale_in_the_flatbuffer_is_named(dead):
    """A 1.25x scale written into one activation tensor of the .tflite: its producer (and the
    layer reading it, which sees the same tensor) are flagged wrong_scale; nothing else is."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    canonical, target, artifact, batches, work = dead
    cut = layers.find_cut(canonical.model)
    tensor_map = artifact.metadata["tensor_map"]
    victim = [t for t in cut.tensors if t.name in tensor_map][1]  # not the model input
    model = fb.read_model_from_bytearray(bytearray(artifact.path.read_bytes()))
    sg = model.subgraphs[0]
    tensor = next(t for t in sg.tensors if t.name.decode() == tensor_map[victim.name])
    tensor.quantization.scale = [float(tensor.quantization.scale[0]) * 1.25]
    broken = work / "broken.tflite"
    broken.write_bytes(bytes(fb.convert_object_to_bytearray(model)))
    report = _report(canonical, target, replace(artifact, path=broken, files=(broken,)), batches, "broken")
    flagged = report.flagged()
    assert flagged and flagged[0].tensor == victim.name and flagged[0].verdict == "wrong_scale", layers.table(report)
    assert abs(flagged[0].gain - 0.8) < 0.03
    assert len(flagged) <= 2  # the victim, and at most the one layer that reads it


def test_layer_check_passes_the_default_threshold(dead):
    """The build's check on a TFLite target judges targets.toml's min_layer_within_one_step."""
    from deploykit.targets import load_targets

    canonical, _, artifact, batches, _ = dead
    repo_targets = load_targets(Path(__file__).resolve().parents[3] / "targets.toml")
    thresholds = repo_targets.raw_targets["tflite"]["thresholds"]
    assert thresholds.get("min_layer_within_one_step") == 0.99
    target = make_target(TFLiteBackend, threads=1, thresholds=dict(thresholds))
    check, report = layers.layer_check(TFLiteBackend(), artifact, canonical, target, batches)
    assert check.status == "pass", check.message
    assert report is not None and check.value == report.min_within_one_step


def test_an_artifact_without_tensor_map_says_so(dead):
    from deploykit.errors import BackendUnavailable

    canonical, target, artifact, _, _ = dead
    bare = replace(artifact, metadata={k: v for k, v in artifact.metadata.items() if k != "tensor_map"})
    with pytest.raises(BackendUnavailable, match="tensor_map"):
        TFLiteBackend().layer_runner(bare, canonical, target, layers.find_cut(canonical.model))
