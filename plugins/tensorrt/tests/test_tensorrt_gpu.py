"""Building and running real TensorRT engines. These need TensorRT and an NVIDIA GPU; on a
machine without them every test here skips, saying which of the two is missing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deploykit.checks import compare
from deploykit.reference import run_canonical
from deploykit.testing import eval_feeds, make_canonical, make_target
from deploykit_tensorrt import TensorRTBackend
from deploykit_tensorrt.device import EngineFacts, EngineMismatch, query_gpu, sidecar_path, tensorrt_version

TRT_VERSION, WHY = tensorrt_version()
if TRT_VERSION is None:
    pytest.skip(f"needs TensorRT: {WHY}", allow_module_level=True)
GPU = query_gpu()
if GPU is None:
    pytest.skip("needs an NVIDIA GPU and CUDA driver (none found)", allow_module_level=True)

pytestmark = [pytest.mark.hardware, pytest.mark.slow]
KINDS = ("resnet", "mobilenet", "encoder")


def profiles_for(canonical, max_batch: int = 8) -> dict:
    out = {}
    for value in canonical.model.graph.input:
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        out[value.name] = {"min": shape, "opt": [4] + shape[1:], "max": [max_batch] + shape[1:]}
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    backend = TensorRTBackend()
    result = {}
    for kind in KINDS:
        canonical = make_canonical(kind, root / kind)
        target = make_target(TensorRTBackend, name=f"trt-{kind}", batch_sizes=(1, 4), profiles=profiles_for(canonical))
        artifact = backend.lower(canonical, target, root / f"{kind}.engine")
        result[kind] = (canonical, target, artifact)
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_engine_and_sidecar(built, kind):
    _, _, artifact = built[kind]
    assert artifact.path.stat().st_size > 0
    facts = EngineFacts.from_json(sidecar_path(artifact.path).read_text())
    assert facts.tensorrt_version == TRT_VERSION and facts.compute_capability == GPU.compute_capability
    assert artifact.metadata["gpu_name"] == GPU.name and artifact.metadata["trtexec"].startswith("trtexec --onnx=")
    assert sidecar_path(artifact.path) in artifact.files


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_cnn_compute_layers_run_in_int8(built, kind):
    audit = {c.name: c for c in built[kind][2].checks}["int8_fraction"]
    assert audit.details["compute_layers"] > 0, audit.message
    assert audit.value >= 0.9, audit.message


def test_encoder_matmuls_are_audited(built):
    audit = {c.name: c for c in built["encoder"][2].checks}["int8_fraction"]
    assert audit.details["int8_layers"] > 0 or audit.details.get("myelin_layers"), audit.message


@pytest.mark.parametrize("kind", KINDS)
def test_runner_agrees_with_canonical_model_in_onnxruntime(built, kind):
    canonical, target, artifact = built[kind]
    runner = TensorRTBackend().load(artifact, target)
    feeds = eval_feeds(kind, 4)
    want = run_canonical(canonical.path, feeds)
    got = runner.run(feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    metrics = compare(want, got)
    assert metrics["cosine"] >= 0.99, metrics
    if "top1_agreement" in metrics:
        assert metrics["top1_agreement"] >= 0.75, metrics
    assert runner.run({k: v[:1] for k, v in feeds.items()})[0].shape[0] == 1
    # GPU time of the kernels alone is measured beside the end-to-end time of the call
    assert runner.last_gpu_ms is not None and 0 < runner.last_gpu_ms <= runner.last_e2e_ms


def test_second_build_reuses_the_timing_cache(built, tmp_path):
    canonical, target, first = built["resnet"]
    again = TensorRTBackend().lower(canonical, target, tmp_path / "again.engine")
    assert again.metadata["timing_cache"] == first.metadata["timing_cache"]
    assert again.metadata["timing_cache_reused"] is True


def test_load_refuses_engine_from_another_tensorrt(built, tmp_path):
    _, target, artifact = built["resnet"]
    engine = tmp_path / "old.engine"
    shutil.copy(artifact.path, engine)
    facts = EngineFacts.from_json(sidecar_path(artifact.path).read_text())
    old = EngineFacts("9.9.9", facts.gpu_name, facts.compute_capability, facts.driver)
    sidecar_path(engine).write_text(old.to_json())
    moved = type(artifact)(artifact.backend, engine, (engine, sidecar_path(engine)), artifact.metadata)
    with pytest.raises(EngineMismatch, match=rf"TensorRT 9\.9\.9.*TensorRT {TRT_VERSION}"):
        TensorRTBackend().load(moved, target)


def test_conformance_suite(tmp_path):
    from deploykit.testing.conformance import run_conformance

    canonical = make_canonical("resnet", tmp_path / "canonical")
    report = run_conformance(TensorRTBackend, tmp_path, canonical=canonical, profiles=profiles_for(canonical))
    assert report.lowered and report.ran and report.metrics["cosine"] >= 0.99
    assert "conformance_unsupported" in report.unsupported_error
    assert np.isfinite(report.metrics["rel_l2"])
