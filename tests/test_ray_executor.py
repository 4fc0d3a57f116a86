"""Check jobs dispatched on a real local Ray instance (``--executor ray``): each device a
``device:NAME`` resource, the job's files through the object store, the local figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploykit.testing import skip_unless_installed

skip_unless_installed("ray", reason="the Ray executor needs Ray: pip install 'deploykit[ray]'")

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
        import ray

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


def test_matrix_on_ray_gives_the_local_figures(ray_executor, tmp_path, monkeypatch, capsys):
    """deploykit matrix --executor ray: each model x target a Ray task on its device's node (the
    command joins the Ray instance this process already runs)."""
    import json

    from deploykit.cli import main
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix

    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path / "cache"))
    toml = tmp_path / "targets.toml"
    toml.write_text('[devices.edge]\nkind = "cpu"\n[targets.here]\nbackend = "onnxruntime"\n'
                    '[targets.edge]\nbackend = "onnxruntime"\ndevice = "edge"\n')
    spec_path = tmp_path / "matrix.toml"
    spec_path.write_text(f'[[models]]\nname = "digits"\npath = "{SAMPLES / "digits_cnn.onnx"}"\n'
                         f'calib = "{SAMPLES / "digits_calib.npz"}"\neval = "{SAMPLES / "digits_eval.npz"}"\n'
                         f'[matrix]\ntargets = ["here", "edge"]\nbatch_sizes = [1]\nprecisions = ["fp32", "int8"]\n'
                         f'rounds = 2\nwarmup = 1\nmin_round_ms = 5\neval_samples = 128\ntargets_file = "{toml}"\n')
    spec = load_spec(spec_path)
    local = {c.key: c for c in run_matrix(spec, MatrixOptions(tmp_path / "local", db=tmp_path / "h.sqlite")).cells}
    capsys.readouterr()
    assert main(["matrix", str(spec_path), "--out", str(tmp_path / "ray"), "--db", str(tmp_path / "h.sqlite"),
                 "--executor", "ray", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    on_ray = {f"{c['model']}/{c['target']}/b{c['batch_size']}/{c['precision']}": c for c in doc["cells"]}
    assert set(on_ray) == set(local) and len(local) == 4
    for key, cell in on_ray.items():
        assert cell["status"] == "ok" == local[key].status, cell["error"]
        assert (cell["top1_agreement"], cell["cosine"], cell["accuracy"]) == (
            local[key].top1_agreement, local[key].cosine, local[key].accuracy)
        assert cell["p50_ms"] and cell["speedup"] is not None
