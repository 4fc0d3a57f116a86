"""Check jobs dispatched on a real local Ray instance (``--executor ray``): each device a
``device:NAME`` resource, the job's files through the object store, the local figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs Ray: pip install 'deploykit[ray]'")

import deploykit  # noqa: E402
from deploykit.jobs import LocalExecutor  # noqa: E402
from deploykit.pipeline import BuildOptions, build  # noqa: E402
from deploykit.rayexec import RayExecutor  # noqa: E402

SAMPLES = Path(deploykit.__file__).parent / "samples"
TIMED = {"latency_p50_ms", "latency_p99_ms", "throughput", "speedup", "memory_mb"}


@pytest.fixture(scope="module")
def ray_executor():
    """A local Ray instance declaring device:local and device:edge (the workers load only the
    onnxruntime plugin: they inherit this environment)."""
    saved = os.environ.get("DEPLOYKIT_DISABLE_PLUGINS")
    os.environ["DEPLOYKIT_DISABLE_PLUGINS"] = "openvino,tflite,coreml,tensorrt"
    try:
        yield RayExecutor(devices=["edge"], num_cpus=1)
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("DEPLOYKIT_DISABLE_PLUGINS", None)
        else:
            os.environ["DEPLOYKIT_DISABLE_PLUGINS"] = saved


def _untimed(target) -> dict[str, tuple]:
    return {c.name: (c.status, c.value) for c in target.checks if c.name not in TIMED}


def test_build_on_ray_gives_the_local_figures_and_an_undeclared_device_fails_alone(ray_executor, tmp_path,
                                                                                   ort_registry):
    assert {"local", "edge"} <= ray_executor.declared()
    toml = tmp_path / "targets.toml"
    text = '[devices.edge]\nkind = "cpu"\n[devices.ghost]\nkind = "cpu"\n'
    for name, device in (("here", None), ("edge", "edge"), ("ghost", "ghost")):
        text += (f'[targets.{name}]\nbackend = "onnxruntime"\nbatch_sizes = [1, 4]\nwarmup = 1\nruns = 5\n'
                 + (f'device = "{device}"\n' if device else "") + f'[targets.{name}.options]\nactivations = "int8"\n')
    toml.write_text(text)

    def run(executor, out):
        opts = BuildOptions(targets=["here", "edge", "ghost"], out_dir=tmp_path / out, targets_file=toml,
                            method="minmax", calib=str(SAMPLES / "digits_calib.npz"),
                            eval=str(SAMPLES / "digits_eval.npz"), eval_samples=128, baseline=False)
        return {t.target.name: t for t in build(str(SAMPLES / "digits_cnn.onnx"), opts, ort_registry, executor).targets}

    local = run(LocalExecutor(ort_registry), "local")
    on_ray = run(ray_executor, "ray")
    assert local["here"].status == "ok" and local["edge"].status == "ok"
    for name in ("here", "edge"):
        assert on_ray[name].status == "ok", on_ray[name].reason
        assert _untimed(on_ray[name]) == _untimed(local["here"])
        assert [e.stats.batch_size for e in on_ray[name].latency] == [1, 4] and on_ray[name].latency[0].stats.p50_ms > 0
        assert "dispatch" in on_ray[name].seconds
    ghost = on_ray["ghost"]
    assert ghost.status == "error" and "declares device 'ghost'" in ghost.reason
    assert "ray start --address HEAD:6379 --resources '{\"device:ghost\": 1}'" in ghost.reason
    assert ghost.artifact is not None and ghost.artifact.path.is_file()
