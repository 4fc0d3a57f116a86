"""Issue 17, one section per class of hostile or broken input: paths and names, code from
configuration, crash-safe/resumable/exclusive output folders, no tracebacks, no wrong
success, classic (IR-3, old opset) models, bounded memory for data files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import ConfigError, DataError, ModelError, OutputDirError
from deploykit.outdir import OutDir, check_name, strict_json
from deploykit.testing.forked import run_forked

REPO = Path(__file__).resolve().parents[1]


def tiny_model(path: Path, opset: int = 18, ir_version: int | None = None, inits_as_inputs: bool = False,
               batch: int | str = "N") -> Path:
    from deploykit.testing.tiny import tiny_classifier

    return tiny_classifier(path, opset=opset, ir_version=ir_version, inits_as_inputs=inits_as_inputs, batch=batch)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".deploykit" not in p.parts)


# ---------------------------------------------------------------------------------------- 1. paths and names
@pytest.mark.parametrize("name", ["../x", "../../x", "/abs/victim", "a/b", "a\\b", ".hidden", "..", ".", "",
                                  "manifest.json", "report.md", ".deploykit", "x.onnx", "a\x1b[31m", "é", "a" * 65])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="not allowed"):
        check_name(name)


@pytest.mark.parametrize("name", ["onnxruntime", "ov-cpu", "tflite_int8", "a.b", "trt+fp16", "A1"])
def test_safe_names_pass(name):
    assert check_name(name) == name


def test_outdir_refuses_paths_outside(tmp_path):
    with OutDir(tmp_path / "out") as out:
        for rel in ("../x", "/etc/passwd", "a/../../x"):
            with pytest.raises(OutputDirError, match="refusing"):
                out.inside(rel)
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
        with pytest.raises(OutputDirError, match="refusing"):
            out.inside("link/file")


def test_symlinked_subfolder_is_foreign(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "victim").mkdir()
    out.mkdir()
    os.symlink(tmp_path / "victim", out / "onnxruntime")
    with pytest.raises(OutputDirError, match="did not write"):
        OutDir(out).open()


def test_manifest_naming_a_path_outside_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (out / "manifest.json").write_text(json.dumps({"files": ["../victim.txt", "manifest.json"]}))
    with pytest.raises(OutputDirError, match="refusing"):
        OutDir(out).open()
    assert (tmp_path / "victim.txt").read_text() == "keep me"


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '{"files": "x"}', '{"files": [1]}'])
def test_manifest_that_is_not_ours_is_one_error(tmp_path, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    with pytest.raises(OutputDirError, match="not a deploykit manifest"):
        OutDir(out).open()


# ---------------------------------------------------------------------------------------- 3. output folder
def _publish_two(out_dir: Path, calib_text: str = "q", targets=("a", "b")) -> None:
    with OutDir(out_dir) as out:
        with out.step("calibration", "k") as s:
            (s.dir / "canonical.qdq.onnx").write_text(calib_text)
        for t in targets:
            with out.step(f"target-{t}", "k") as s:
                (s.dir / f"{t}.onnx").write_text(t)
        out.publish({"calibration": "", **{f"target-{t}": t for t in targets}}, {"status": "ok"}, "# report\n")


def test_publish_lists_exactly_the_folder(tmp_path):
    _publish_two(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files"] == files_under(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out" / ".deploykit")) == ["journal.json", "lock"]


def test_second_concurrent_build_fails_at_once_naming_the_pid(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from deploykit.outdir import OutDir
        with OutDir({str(tmp_path / 'out')!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=rf"another deploykit build \(pid {proc.pid}\)"):
            OutDir(tmp_path / "out").open()
    finally:
        proc.kill()
        proc.wait()
    with OutDir(tmp_path / "out"):  # the lock dies with its holder
        pass


def test_rerun_keeps_finished_steps_and_cleans_staging(tmp_path):
    root = tmp_path / "out"
    with OutDir(root) as out:
        with out.step("calibration", "k1") as s:
            (s.dir / "canonical.qdq.onnx").write_text("q")
            s.payload["samples"] = 64
        with pytest.raises(KeyboardInterrupt):
            with out.step("target-a", "k2") as s:
                (s.dir / "a.onnx").write_text("half")
                raise KeyboardInterrupt
    assert not (root / ".deploykit" / "staging" / "target-a").exists()
    with OutDir(root) as out:
        assert out.finished("calibration", "k1") == {"samples": 64}
        assert out.finished("calibration", "other key") is None
        assert out.finished("target-a", "k2") is None


def test_killed_mid_step_leaves_staging_that_the_rerun_removes(tmp_path):
    root = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os
        from deploykit.outdir import OutDir
        out = OutDir({str(root)!r}); out.open()
        with out.step("calibration", "k") as s:
            (s.dir / "canonical.qdq.onnx").write_text("q")
        with out.step("target-a", "k") as s:
            (s.dir / "a.onnx").write_text("half")
            os._exit(9)  # as SIGKILL or a power cut would
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert (root / ".deploykit" / "staging" / "target-a" / "a.onnx").exists()
    with OutDir(root) as out:
        assert out.finished("calibration", "k") == {}
        assert out.finished("target-a", "k") is None
        assert not (root / ".deploykit" / "staging").exists()


def test_tampered_finished_step_is_redone(tmp_path):
    root = tmp_path / "out"
    with OutDir(root) as out:
        with out.step("calibration", "k") as s:
            (s.dir / "canonical.qdq.onnx").write_text("q")
    (root / ".deploykit" / "done" / "calibration" / "canonical.qdq.onnx").write_text("changed")
    with OutDir(root) as out:
        assert out.finished("calibration", "k") is None


def test_rebuild_replaces_previous_outputs_and_leaves_no_stale_report(tmp_path):
    root = tmp_path / "out"
    _publish_two(root)
    with OutDir(root) as out:
        with pytest.raises(RuntimeError):
            with out.step("calibration", "other model"):
                raise RuntimeError("calibration failed")
    assert not (root / "report.md").exists() and not (root / "manifest.json").exists()
    _publish_two(root, "q2", targets=("c",))  # the old build's files are still ours: no refusal
    assert files_under(root) == ["c/c.onnx", "canonical.qdq.onnx", "manifest.json", "report.md"]
    assert (root / "canonical.qdq.onnx").read_text() == "q2"


def test_interrupted_publish_is_rolled_forward(tmp_path):
    root = tmp_path / "out"
    _publish_two(root)
    out = OutDir(root)
    out.open()
    with out.step("calibration", "k") as s:
        (s.dir / "canonical.qdq.onnx").write_text("new")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # after the calibration file moved in, before the report
            raise KeyboardInterrupt
        return real_replace(src, dst)

    os.replace = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            out.publish({"calibration": ""}, {"status": "ok"}, "# new\n")
    finally:
        os.replace = real_replace
        out.close()
    with OutDir(root):
        pass
    assert files_under(root) == ["canonical.qdq.onnx", "manifest.json", "report.md"]
    assert (root / "report.md").read_text() == "# new\n"


def test_foreign_files_are_refused_never_deleted(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="did not write"):
        OutDir(root).open()
    assert (root / "notes.txt").read_text() == "mine"


def test_unwritable_output_folder_is_one_error(tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/deploykit-out")  # a virtual file system refuses even root
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "out"
    with pytest.raises(OutputDirError, match="cannot write the output folder"):
        OutDir(target).open()


def test_a_build_that_never_started_leaves_no_folder(tmp_path):
    with OutDir(tmp_path / "out"):
        pass
    assert not (tmp_path / "out").exists()


def test_strict_json_has_no_nan():
    doc = strict_json({"a": float("nan"), "b": [np.float32("inf"), np.int64(3)], "c": np.array([1.5])})
    assert doc == {"a": None, "b": [None, 3], "c": [1.5]}
    json.dumps(doc, allow_nan=False)


# ---------------------------------------------------------------------------------------- 5. data functions
def test_data_function_calling_sys_exit_is_an_error():
    from deploykit.data import open_source

    def calib():
        sys.exit(0)

    with pytest.raises(DataError, match=r"sys\.exit\(0\)"):
        list(open_source(calib, {"x": (["N", 4], np.float32)}).batches(2))


@pytest.mark.parametrize("returned", [None, [], iter(())])
def test_data_function_returning_nothing_is_an_error(returned):
    from deploykit.data import open_source

    with pytest.raises(DataError, match="nothing|no samples"):
        list(open_source(lambda: returned, {"x": (["N", 4], np.float32)}).batches(2))


def test_code_sources_are_told_apart_from_data(tmp_path):
    from deploykit.data import is_code

    (tmp_path / "d.npz").write_bytes(b"")
    assert is_code("helper.py:calib") and is_code("pkg.mod:fn")
    assert not is_code(str(tmp_path / "d.npz")) and not is_code(str(tmp_path)) and not is_code(None)


# ---------------------------------------------------------------------------------------- 6. classic models
@pytest.mark.parametrize("opset", [7, 8, 9, 18])
def test_ir3_initializers_as_inputs_load_as_constants(tmp_path, opset):
    from deploykit import model as modelmod

    path = tiny_model(tmp_path / "m.onnx", opset=opset, ir_version=3 if opset < 18 else 8, inits_as_inputs=True)
    assert len(onnx.load(str(path)).graph.input) == 5
    fp32 = modelmod.normalise(modelmod.load_onnx(path), str(path))
    assert [i.name for i in fp32.graph.input] == ["x"]
    assert list(modelmod.input_specs(fp32)) == ["x"]
    assert next(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_fed_initializer_stays_an_input(tmp_path):
    from deploykit import model as modelmod

    path = tiny_model(tmp_path / "m.onnx", inits_as_inputs=True)
    fp32 = modelmod.normalise(modelmod.load_onnx(path), str(path), fed=frozenset({"GB"}))
    assert [i.name for i in fp32.graph.input] == ["x", "GB"]


def test_unconvertible_old_opset_names_the_op():
    from deploykit import model as modelmod

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn1", spatial=0)
    inits = [numpy_helper.from_array(np.ones((3, 4, 4), np.float32), n) for n in "sbmv"]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    with pytest.raises(ModelError, match=r"opset 8 to 18 \(blocked by BatchNormalization 'bn1'\)"):
        modelmod.normalise(model, "old.onnx")


def test_graph_without_outputs_is_refused(tmp_path):
    from deploykit import model as modelmod

    path = tiny_model(tmp_path / "m.onnx")
    m = onnx.load(str(path))
    del m.graph.output[:]
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="no outputs"):
        modelmod.load_onnx(path)


# ---------------------------------------------------------------------------------------- 7. bounded memory
def test_npz_members_are_read_lazily(tmp_path):
    from deploykit.data import ArraySource

    path = tmp_path / "big.npz"
    x = np.arange(600 * 12, dtype=np.float32).reshape(600, 12)
    np.savez_compressed(path, x=x, labels=np.arange(600) % 4)
    src = ArraySource(path, {"x": (["N", 12], np.float32)}, limit=70)
    assert type(src.arrays["x"]).__name__ == "_NpzMember"  # only the header was read
    batches = list(src.batches(32))
    got = np.concatenate([b.feeds["x"] for b in batches])
    assert got.shape == (70, 12) and np.array_equal(got, x[:70])
    assert np.array_equal(np.concatenate([b.labels for b in batches]), np.arange(70) % 4)
    assert [len(b.feeds["x"]) for b in src.batches(32)] == [32, 32, 6]  # a second pass reads again


def test_object_arrays_are_refused(tmp_path):
    from deploykit.data import ArraySource

    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        ArraySource(path, {"x": (["N"], np.float32)})


# ---------------------------------------------------------------------------------------- the command line
@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """A tiny classifier, 40 labelled samples, cwd = tmp_path, only the onnxruntime backend."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEPLOYKIT_DISABLE_PLUGINS", "openvino,tflite,coreml,tensorrt")
    tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.random((40, 3, 8, 8), dtype=np.float32), labels=np.arange(40) % 4)
    return tmp_path


#: the build the signal tests interrupt
BUILD_ARGS = ["build", "m.onnx", "-t", "onnxruntime", "--calib", "c.npz", "--out", "out", "--method", "minmax",
              "--no-baseline"]


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    from deploykit.cli import main

    code = main(["build", "m.onnx", "--method", "minmax", "--no-baseline", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err: str, *needles: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("calibrating", "WARNING", "canonical",
                                                                            "target "))]
    assert len(lines) == 1 and lines[0].startswith("deploykit: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", ["../x", "../../escaped", "/tmp/victim", "a/b", ".hidden"])
def test_target_name_from_config_never_becomes_a_path(tiny, capsys, name):
    (tiny / "targets.toml").write_text(f'[targets."{name}"]\nbackend = "onnxruntime"\n')
    code, _, err = run_cli("-t", name, "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, "not allowed")
    assert not (tiny / "out").exists() and not (tiny.parent / "escaped").exists()


def test_code_in_config_is_refused_without_allow_code(tiny, capsys):
    (tiny / "helper.py").write_text(textwrap.dedent("""
        import pathlib, numpy as np
        pathlib.Path("RAN").write_text("code ran")
        def calib():
            return [{"x": np.random.rand(8, 3, 8, 8).astype("float32")}]
    """))
    (tiny / "targets.toml").write_text('[calibration]\ndata = "helper.py:calib"\n')
    code, _, err = run_cli("-t", "onnxruntime", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, "helper.py:calib", "--allow-code")
    assert not (tiny / "RAN").exists()
    code, _, err = run_cli("-t", "onnxruntime", "--out", "out", "--allow-code", capsys=capsys)
    assert code == 0, err
    assert (tiny / "RAN").exists()
    (tiny / "RAN").unlink()
    (tiny / "targets.toml").unlink()
    code, _, err = run_cli("-t", "onnxruntime", "--out", "out", "--calib", "helper.py:calib", capsys=capsys)
    assert code == 0, err  # typed on the command line: explicit


def test_data_function_exiting_zero_does_not_exit_deploykit(tiny, capsys):
    (tiny / "quitter.py").write_text("import sys\ndef calib():\n    sys.exit(0)\n")
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "quitter.py:calib", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, "sys.exit(0)")


@pytest.mark.parametrize("args, needle", [
    (["--percentile", "0"], "--percentile"), (["--percentile", "-5"], "--percentile"),
    (["--percentile", "150"], "--percentile"), (["--percentile", "nan"], "--percentile"),
    (["--percentile", "inf"], "--percentile"), (["--samples", "0"], "--samples"),
    (["--eval-samples", "-1"], "--eval-samples"), (["--calib-batch-size", "0"], "--calib-batch-size"),
    (["--preprocess", "mean=a/b"], "--preprocess"), (["--preprocess", "resize=big"], "--preprocess"),
    (["--preprocess", "scale=nan"], "--preprocess"), (["--task", "segmentation"], "--task"),
])
def test_out_of_range_cli_values_are_one_line(tiny, capsys, args, needle):
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", *args, capsys=capsys)
    assert code == 2
    one_error_line(err, needle)
    assert not (tiny / "out").exists()


@pytest.mark.parametrize("toml, needle", [
    ("[calibration]\nseed = -1\n", "seed"),
    ("[calibration]\npercentile = nan\n", "percentile"),
    ('[targets.t]\nbackend = "onnxruntime"\n[targets.t.thresholds]\nmin_cosine = nan\n', "min_cosine"),
    ('[targets.t]\nbackend = "onnxruntime"\n[targets.t.thresholds]\nmin_cosine = 0.9\nmax_cosine = 0.5\n', "max_cosine"),
    ('[targets.t]\nbackend = "onnxruntime"\n[targets.t.options]\nexecution_provider = "NoSuchProvider"\n',
     "NoSuchProvider"),
])
def test_bad_config_values_are_refused_before_work(tiny, capsys, toml, needle):
    (tiny / "targets.toml").write_text(toml)
    target = "t" if "targets.t" in toml else "onnxruntime"
    code, _, err = run_cli("-t", target, "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, needle)
    assert not (tiny / "out").exists()


def test_min_and_max_on_one_metric_are_both_judged():
    from deploykit.checks import judge

    assert judge("cosine", 0.99, {"min_cosine": 0.9, "max_cosine": 0.95}).status == "fail"
    assert judge("cosine", 0.92, {"min_cosine": 0.9, "max_cosine": 0.95}).status == "pass"
    assert judge("cosine", float("nan"), {}).status == "fail"
    assert judge("latency_p50_ms", float("inf"), {"max_latency_p50_ms": 5}).status == "fail"


def test_labels_out_of_range_and_two_dimensional_labels_are_refused(tiny, capsys):
    x = np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32)
    np.savez(tiny / "big_labels.npz", x=x, labels=np.arange(16) + 10)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--eval", "big_labels.npz", "--out", "out",
                           capsys=capsys)
    assert code == 2
    one_error_line(err, "labels range", "4 classes")
    np.savez(tiny / "2d.npz", x=x, labels=np.zeros((16, 3), np.int64))
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--eval", "2d.npz", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, "labels have shape [16, 3]")


def test_fixed_batch_model_with_a_partial_last_batch_builds(tiny, capsys):
    tiny_model(tiny / "m.onnx", batch=4)
    np.savez(tiny / "odd.npz", x=np.random.default_rng(1).random((10, 3, 8, 8), dtype=np.float32))
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "odd.npz", "--out", "out", capsys=capsys)
    assert code == 0, err


def test_duplicate_target_is_built_once_and_json_is_strict(tiny, capsys):
    code, out, err = run_cli("-t", "onnxruntime,onnxruntime", "--calib", "c.npz", "--out", "out", "--json",
                             capsys=capsys)
    assert code == 0, err
    manifest = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert [t["name"] for t in manifest["targets"]] == ["onnxruntime"]
    on_disk = json.loads((tiny / "out" / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk["files"] == files_under(tiny / "out")


def test_unexpected_fault_is_one_line_naming_the_step_and_v_shows_the_traceback(tiny, capsys, monkeypatch):
    import deploykit.pipeline as pipeline
    from deploykit.cli import main

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "_reference_outputs", broken)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 3
    one_error_line(err, "while computing the reference outputs", "ZeroDivisionError", "-v")
    code = main(["-v", "build", "m.onnx", "-t", "onnxruntime", "--calib", "c.npz", "--out", "out", "--method", "minmax"])
    assert code == 3 and "Traceback" in capsys.readouterr().err


def test_rerun_after_interrupt_keeps_calibration_and_publishes_everything(tiny, capsys, monkeypatch):
    import deploykit.pipeline as pipeline

    real = pipeline._build_target

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_build_target", interrupted)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 130 and "interrupted" in err
    assert files_under(tiny / "out") == []  # nothing published, nothing half-written
    monkeypatch.setattr(pipeline, "_build_target", real)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 0, err
    assert "calibration kept" in err
    manifest = json.loads((tiny / "out" / "manifest.json").read_text())
    assert manifest["files"] == files_under(tiny / "out")
    assert not (tiny / "out" / ".deploykit" / "staging").exists()


def test_sigterm_during_a_build_exits_143_and_the_rerun_completes(tiny, capsys):
    def build_that_gets_sigterm() -> int:  # in a process of its own (forked: no interpreter start-up)
        import deploykit.pipeline as p
        from deploykit.cli import main

        real = p._reference_outputs

        def slow(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while signals are deferred
            return real(*a, **k)

        p._reference_outputs = slow
        return main(BUILD_ARGS)

    proc = run_forked(build_that_gets_sigterm, cwd=tiny)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "terminated" in proc.stderr
    # the rerun needs no signal: in this process
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 0, err
    assert json.loads((tiny / "out" / "manifest.json").read_text())["files"] == files_under(tiny / "out")


def test_ctrl_c_during_a_target_waits_for_it_and_the_rerun_keeps_it(tiny, capsys):
    def build_that_gets_ctrl_c() -> int:  # in a process of its own (forked: no interpreter start-up)
        import time

        import deploykit.pipeline as p
        from deploykit.cli import main

        # as deploykit.cli.main does before anything starts a thread (a forked child has only this one)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        real = p._build_target

        def target(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-target
            time.sleep(0.5)  # native work: no Python-level interrupt may land here
            return real(*a, **k)

        p._build_target = target
        return main(BUILD_ARGS)

    proc = run_forked(build_that_gets_ctrl_c, cwd=tiny)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)  # as above
    assert code == 0, err
    assert "target onnxruntime: kept" in err


def test_full_disk_is_one_line_and_the_rerun_completes(tiny, capsys, monkeypatch):
    import errno

    import deploykit.pipeline as pipeline

    real = pipeline.write_canonical

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_canonical", full)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 2
    one_error_line(err, "while calibrating", "No space left on device", "rerun")
    monkeypatch.setattr(pipeline, "write_canonical", real)
    code, _, err = run_cli("-t", "onnxruntime", "--calib", "c.npz", "--out", "out", capsys=capsys)
    assert code == 0, err


def test_importing_the_cli_starts_no_threads():
    """main() blocks SIGINT/SIGTERM before any thread exists (threads inherit the mask); numpy's
    BLAS pool or an SDK imported with deploykit.cli would take the signal at an arbitrary point."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins" / "onnxruntime")]))
    code = "import sys, deploykit.cli; print(sorted({'numpy', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
