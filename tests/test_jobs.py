"""Check jobs: the build's checks are a plain value that runs the same in another process;
runners are always closed; backends declare their optional features and validate options."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deploykit
from deploykit.backend import Artifact, Availability, Backend, Capability, Runner
from deploykit.errors import ConfigError, PluginError
from deploykit.jobs import RESULT_FILE, CheckJob, LocalExecutor, run_job
from deploykit.pipeline import BuildOptions, build
from deploykit.plugins import PluginInfo, Registry
from deploykit.results import JobResult
from deploykit.targets import load_targets

SAMPLES = Path(deploykit.__file__).parent / "samples"
#: measured, so they differ between two runs of the same job
TIMED = {"latency_p50_ms", "latency_p99_ms", "throughput", "speedup", "memory_mb"}


class _Recording(LocalExecutor):
    """The local executor, keeping every job it ran and its result."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.runs: list[tuple[CheckJob, JobResult]] = []

    def run(self, job: CheckJob) -> JobResult:
        result = super().run(job)
        self.runs.append((job, result))
        return result


@pytest.fixture()
def built(tmp_path, ort_registry):
    """A real build of the bundled digits CNN for onnxruntime; the job it ran and its result."""
    toml = tmp_path / "targets.toml"
    toml.write_text('[targets.ort]\nbackend = "onnxruntime"\nbatch_sizes = [1, 4]\nwarmup = 1\nruns = 5\n'
                    '[targets.ort.options]\nactivations = "int8"\n[targets.ort.thresholds]\nmin_top1_agreement = 0.9\nmax_fidelity_rel_l2 = 0.5\n')
    executor = _Recording(ort_registry)
    opts = BuildOptions(targets=["ort"], out_dir=tmp_path / "out", targets_file=toml, method="minmax",
                        calib=str(SAMPLES / "digits_calib.npz"), eval=str(SAMPLES / "digits_eval.npz"),
                        eval_samples=128)
    result = build(str(SAMPLES / "digits_cnn.onnx"), opts, ort_registry, executor)
    assert result.ok
    ((job, job_result),) = executor.runs
    # the build ran the job on its staged files, then published them into --out: follow them
    (target,) = result.targets
    job = dataclasses.replace(job, artifact=target.artifact, canonical_path=result.canonical.path,
                              fp32_path=result.canonical.fp32_path)
    assert job.artifact.path.is_file() and job.canonical_path.is_file()
    return result, job, job_result


def _untimed(checks: list[dict]) -> dict[str, tuple]:
    return {c["name"]: (c["status"], c["value"], c["threshold"]) for c in checks if c["name"] not in TIMED}


def test_job_saved_to_disk_runs_the_same_in_another_process(built, tmp_path):
    result, job, in_process = built
    folder = job.save(tmp_path / "job")
    env = {**os.environ, "DEPLOYKIT_DISABLE_PLUGINS": "openvino,tflite,coreml,tensorrt"}
    run = subprocess.run([sys.executable, "-m", "deploykit.cli", "run-job", str(folder), "--json"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    other = JobResult.from_json(json.loads(run.stdout))
    assert json.loads((folder / RESULT_FILE).read_text()) == json.loads(run.stdout)
    here = _untimed([c.to_json() for c in in_process.checks])
    there = _untimed([c.to_json() for c in other.checks])
    assert set(here) == set(there) and {"top1_agreement", "accuracy", "fidelity_rel_l2", "cosine"} <= set(here)
    for name, (status, value, threshold) in here.items():
        assert there[name][0] == status and there[name][2] == threshold, name
        assert there[name][1] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert [c.name for c in other.checks] == [c.name for c in in_process.checks]  # timed ones too, same order
    assert [entry.stats.batch_size for entry in other.latency] == [1, 4]
    assert all(entry.speedup_vs == "onnxruntime fp32" and entry.speedup > 0 for entry in other.latency)
    # the build's manifest holds exactly what the job returned
    (target,) = result.manifest["targets"]
    assert [c["name"] for c in target["checks"] if c["name"] in here] == [c.name for c in in_process.checks
                                                                            if c.name in here]
    assert target["latency"] == [entry.to_json() for entry in in_process.latency]


def test_job_round_trips_through_disk_and_pickle(built, tmp_path):
    _, job, _ = built
    for copy in (CheckJob.load(job.save(tmp_path / "job")), pickle.loads(pickle.dumps(job))):
        assert copy.target == job.target and copy.settings == job.settings
        assert copy.artifact.path.resolve() == job.artifact.path.resolve()
        assert copy.canonical_path.resolve() == job.canonical_path.resolve()
        assert len(copy.inputs) == len(job.inputs)
        for a, b in zip(copy.inputs, job.inputs):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert np.array_equal(copy.labels, job.labels)
        for a, b in zip(copy.reference_fp32 + copy.reference_canonical, job.reference_fp32 + job.reference_canonical):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    result = run_job(CheckJob.load(tmp_path / "job"))
    assert JobResult.from_json(json.loads(json.dumps(result.to_json()))).to_json() == result.to_json()


def test_job_inside_its_folder_moves_with_it(built, tmp_path):
    _, job, _ = built
    import shutil

    folder = tmp_path / "a"
    folder.mkdir()
    artifact = folder / job.artifact.path.name
    shutil.copyfile(job.artifact.path, artifact)
    moved = dataclasses.replace(job, artifact=dataclasses.replace(job.artifact, path=artifact, files=(artifact,)))
    moved.save(folder)
    assert json.loads((folder / "job.json").read_text())["artifact"]["path"] == artifact.name  # stored relative
    shutil.move(str(folder), tmp_path / "b")
    loaded = CheckJob.load(tmp_path / "b")
    assert loaded.artifact.path == tmp_path / "b" / artifact.name and loaded.artifact.path.is_file()


def test_interleaved_job_times_int8_beside_fp32_and_judges_the_fp32_runner(built, tmp_path):
    """What a benchmark matrix asks of a job: INT8 and the backend's FP32 in alternating rounds,
    the FP32 runner's own accuracy, no per-layer comparison; the settings survive the disk."""
    _, job, _ = built
    settings = dataclasses.replace(job.settings, rounds=3, min_round_ms=2.0, layers=False, fp32_checks=True)
    job = CheckJob.load(dataclasses.replace(job, settings=settings).save(tmp_path / "job"))
    assert job.settings == settings
    result = run_job(job)
    assert "layer_within_one_step" not in {c.name for c in result.checks}
    assert [entry.stats.batch_size for entry in result.latency] == [1, 4]
    for entry in result.latency:
        assert len(entry.rounds_ms) == len(entry.fp32_rounds_ms) == 3 and entry.calls_per_round >= 5
        assert len(entry.cpu_rounds_ms) == len(entry.fp32_cpu_rounds_ms) == 3 and min(entry.cpu_rounds_ms) > 0
        assert entry.stats.runs == 3 * entry.calls_per_round
        assert entry.stats.p50_ms == pytest.approx(float(np.median(entry.rounds_ms)))
        assert entry.fp32_stats is not None and entry.fp32_p50_ms == entry.fp32_stats.p50_ms
        per_round = [f / q for f, q in zip(entry.fp32_rounds_ms, entry.rounds_ms)]
        assert entry.speedup == pytest.approx(float(np.median(per_round)))
        assert entry.speedup_vs == "onnxruntime fp32"  # the backend's own FP32 runner, timed beside it
    fp32 = {c.name: c for c in result.fp32_checks}
    assert fp32["top1_agreement"].value == pytest.approx(1.0) and fp32["cosine"].value > 0.9999
    assert fp32["accuracy"].value == pytest.approx(job.settings.fp32_accuracy) and "memory_mb" in fp32
    again = JobResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.to_json() == result.to_json() and again.latency[0].fp32_stats == result.latency[0].fp32_stats


def test_the_jobs_canonical_model_carries_the_evaluation_shapes(built):
    """A backend's FP32 runner built from the job (TFLite fixes dynamic dims from them: MiniLM's
    sequence) sees the shapes the build saw."""
    from deploykit.jobs import _canonical

    _, job, _ = built
    assert _canonical(job).example_shapes == {"x": (1, *job.inputs[0]["x"].shape[1:])}


def test_local_executor_accepts_only_this_machines_runnable_targets(ort_registry):
    from deploykit.targets import Device, Target

    here = Target("ort", "onnxruntime", Device("local"), {}, {}, (1,), 1, 1)
    remote = dataclasses.replace(here, device=Device("pixel", address="http://10.0.0.7:8470"))
    executor = LocalExecutor(ort_registry)
    assert executor.accepts(here, Availability.ready()) == ""
    assert "remote (http://10.0.0.7:8470)" in executor.accepts(remote, Availability.ready())
    assert executor.accepts(here, Availability(True, False, "needs macOS")) == "needs macOS"


def test_run_job_on_a_folder_that_is_not_a_job_is_one_line(tmp_path, capsys):
    from deploykit.cli import main

    code = main(["run-job", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a check job" in err and str(tmp_path) in err
    (tmp_path / "job.json").write_text('{"kind": "deploykit.check_job", "schema_version": 999}')
    with pytest.raises(ConfigError, match="schema version 999"):
        CheckJob.load(tmp_path)


# --------------------------------------------------------------------------------------
# runner lifecycle, capabilities, option validation
# --------------------------------------------------------------------------------------
class _ClosingRunner(Runner):
    closed: list[str] = []

    def __init__(self, name: str, fail: bool) -> None:
        self.name, self.fail = name, fail

    def run(self, feeds):
        if self.fail:
            raise RuntimeError("the device fell over")
        return [np.zeros((len(next(iter(feeds.values()))), 10), np.float32)]

    def close(self) -> None:
        _ClosingRunner.closed.append(self.name)


class _Flaky(Backend):
    name = "flaky"
    capabilities = frozenset({Capability.FP32_RUNNER})

    def probe(self, target):
        return Availability.ready()

    def load(self, artifact, target):
        return _ClosingRunner("int8", fail=target.options.get("fail", True))

    def fp32_runner(self, canonical, target, workdir):
        return _ClosingRunner("fp32", fail=False)


def test_runner_is_closed_when_a_check_raises(built):
    _, job, _ = built
    registry = Registry()
    registry._register_backend(_Flaky, PluginInfo("t", "t"))
    _ClosingRunner.closed.clear()
    flaky = dataclasses.replace(job, target=dataclasses.replace(job.target, backend="flaky", options={"fail": True}))
    with pytest.raises(RuntimeError, match="fell over"):
        run_job(flaky, registry)
    assert _ClosingRunner.closed == ["int8"]
    _ClosingRunner.closed.clear()
    fine = dataclasses.replace(flaky, target=dataclasses.replace(flaky.target, options={"fail": False}))
    result = run_job(fine, registry)
    assert _ClosingRunner.closed == ["fp32", "int8"]  # the FP32 baseline runner too, first
    assert {e.speedup_vs for e in result.latency} == {"flaky fp32"}


def test_undeclared_fp32_runner_is_refused():
    class Sneaky(Backend):
        name = "sneaky"

        def fp32_runner(self, canonical, target, workdir):
            return None

    with pytest.raises(PluginError, match="Capability.FP32_RUNNER"):
        Registry()._register_backend(Sneaky, PluginInfo("p", "p"))


def test_backend_validates_its_options_at_load_time(tmp_path):
    from deploykit.backend import Option

    class Picky(Backend):
        name = "picky"
        options = {"min_batch": Option(int, 1), "max_batch": Option(int, 8)}

        @classmethod
        def validate_options(cls, options):
            if options["min_batch"] > options["max_batch"]:
                raise ValueError(f"min_batch {options['min_batch']} > max_batch {options['max_batch']}; swap them")

    class Plugin:
        @deploykit.hookimpl
        def deploykit_register_backends(self, register):
            register(Picky)

    registry = Registry()
    registry.add_plugin(Plugin(), PluginInfo("picky", "tests"))  # the hook runs through pluggy
    assert registry.names() == ["picky"]
    path = tmp_path / "targets.toml"
    path.write_text('[targets.p]\nbackend = "picky"\n[targets.p.options]\nmin_batch = 16\n')
    with pytest.raises(ConfigError) as exc:
        registry.resolve(load_targets(path), ["p"])
    msg = str(exc.value)
    assert str(path) in msg and "targets.p.options" in msg and "swap them" in msg and "\n" not in msg
    path.write_text('[targets.p]\nbackend = "picky"\n[targets.p.options]\nmin_batch = 4\n')
    (target,) = registry.resolve(load_targets(path), ["p"])
    assert target.options == {"min_batch": 4, "max_batch": 8}


def test_artifact_is_a_plain_value():
    art = Artifact("x", Path("/tmp/a.onnx"), (Path("/tmp/a.onnx"),))
    assert pickle.loads(pickle.dumps(art)) == art


def test_accuracy_figures_do_not_depend_on_the_blas_thread_count(tmp_path):
    """A Ray worker runs BLAS on one thread; the same outputs must give the same figures there
    (a threaded dot product sums in another order: the cosine moved in its 15th digit)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((128, 1000)).astype(np.float32)
    np.savez(tmp_path / "outputs.npz", ref=ref, cand=ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32))
    code = ("import json, numpy as np; from deploykit.checks import compare; z = np.load(r'%s'); "
            "print(json.dumps(compare([z['ref']], [z['cand']])))" % (tmp_path / "outputs.npz"))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}).stdout
            for n in ("1", "2")]
    assert json.loads(runs[0]) == json.loads(runs[1]) and json.loads(runs[0])["cosine"] > 0.99
