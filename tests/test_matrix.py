"""deploykit matrix / results / compare: spec validation, the history, the noise model, and real
matrices on the bundled digits sample (onnxruntime and OpenVINO for real; resume after an
interruption; a failing model recorded while the others complete)."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from deploykit.cli import main
from deploykit.compare import compare_cells, worse_proportion
from deploykit.errors import ConfigError
from deploykit.history import SCHEMA_VERSION, History
from deploykit.matrix.cell import Cell
from deploykit.matrix.spec import load_spec, parse_spec

SAMPLES = Path(__file__).resolve().parents[1] / "deploykit" / "samples"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test writes the user's history or cache."""
    monkeypatch.setenv("DEPLOYKIT_DB", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path / "cache"))


def write_spec(folder: Path, targets=("onnxruntime",), batch_sizes=(1,), models=None, extra="") -> Path:
    models = models or [("digits", SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_calib.npz", SAMPLES / "digits_eval.npz")]
    text = ""
    for name, path, calib, ev in models:
        text += f'[[models]]\nname = "{name}"\npath = "{path}"\ncalib = "{calib}"\neval = "{ev}"\n\n'
    text += (f"[matrix]\ntargets = {json.dumps(list(targets))}\nbatch_sizes = {json.dumps(list(batch_sizes))}\n"
             f'precisions = ["fp32", "int8"]\nrounds = 2\nwarmup = 1\nmin_round_ms = 5\neval_samples = 200\n{extra}')
    spec = folder / "matrix.toml"
    spec.write_text(text)
    return spec


# ------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("text, needle", [
    ('[matrix]\ntargets = ["onnxruntime"]\n', "at least one [[models]]"),
    ('[[models]]\ncalib = "x.npz"\n[matrix]\ntargets = ["onnxruntime"]\n', "missing key 'path'"),
    ('[[models]]\npath = "m.onnx"\nbogus = 1\n[matrix]\ntargets = ["onnxruntime"]\n', "unknown key 'bogus'"),
    ('[[models]]\npath = "m.onnx"\n[matrix]\ntargets = ["onnxruntime"]\nprecisions = ["int4"]\n', "precision 'int4'"),
    ('[[models]]\npath = "m.onnx"\n[matrix]\ntargets = ["onnxruntime"]\nbatch_sizes = [0]\n', "batch size 0"),
    ('[[models]]\npath = "m.onnx"\n[matrix]\ntargets = ["../x"]\n', "must be 1-64 characters"),
    ('[[models]]\npath = "m.onnx"\n[matrix]\ntargets = ["onnxruntime"]\nrounds = true\n', "expected int"),
    ('[[models]]\npath = "m.onnx"\ncalib = "evil.mod:make"\n[matrix]\ntargets = ["onnxruntime"]\n', "--allow-code"),
    ('[[models]]\npath = "m.onnx"\ncalib = "missing.npz"\n[matrix]\ntargets = ["onnxruntime"]\n', "not found"),
    ('[[models]]\npath = "a.onnx"\n[[models]]\npath = "a.onnx"\n[matrix]\ntargets = ["onnxruntime"]\n', "given twice"),
    ('[[models]]\npath = "m.onnx"\n', "missing key 'targets'"),
    ('[[models]]\npath = "m.onnx"\n[matrix]\ntargets = ["onnxruntime"]\n[extra]\n', "unknown table"),
])
def test_bad_spec_is_one_line_naming_the_key(tmp_path, text, needle):
    spec = tmp_path / "m.toml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    assert needle in str(err.value) and str(spec) in str(err.value)


def test_spec_paths_relative_to_the_spec_and_overrides(tmp_path):
    spec = parse_spec({"models": [{"path": "m.onnx"}], "matrix": {"targets": ["onnxruntime", "onnxruntime"]}},
                      tmp_path / "sub" / "matrix.toml")
    assert spec.models[0].path == (tmp_path / "sub" / "m.onnx").resolve() and spec.models[0].name == "m"
    assert spec.targets == ("onnxruntime",)  # given twice, measured once
    new = spec.with_overrides(["openvino"], [8, 1], ["int8", "fp32"], 3)
    assert (new.targets, new.batch_sizes, new.precisions, new.rounds) == (("openvino",), (8, 1), ("fp32", "int8"), 3)
    assert new.fingerprint() != spec.fingerprint()
    with pytest.raises(ConfigError, match="--precisions"):
        spec.with_overrides(precisions=["bf8"])


def test_sample_spec_is_valid():
    spec = load_spec(SAMPLES / "matrix.toml")
    assert [m.name for m in spec.models] == ["digits32_cnn", "digits8_cnn"]
    assert all(m.path.is_file() and Path(m.calib).is_file() and Path(m.eval).is_file() for m in spec.models)


# ------------------------------------------------------------------------------- history
def _cell(**kw) -> Cell:
    base = {"model": "m", "target": "onnxruntime", "backend": "onnxruntime", "device": "cpu", "batch_size": 1,
            "precision": "int8", "p50_ms": 1.0, "spread": 0.05, "speedup": 2.0, "speedup_spread": 0.05,
            "fp32_p50_ms": 2.0, "accuracy": 0.95, "top1_agreement": 0.99, "eval_samples": 500,
            "env": {"load_average": [1.0, 1.0, 1.0], "cores": 2}}
    base.update(kw)
    return Cell(**base)  # type: ignore[arg-type]


def test_history_schema_and_no_duplicates(tmp_path):
    db = tmp_path / "h.sqlite"
    with History(db) as h:
        run = h.start_run("matrix", "spec.toml", "abc", str(tmp_path), {"cpu": "x"})
        h.add_cells(run, [_cell().to_json(), _cell(precision="fp32").to_json()])
        h.add_cells(run, [_cell(p50_ms=3.0).to_json()])  # the same key again: replaced, not added
        h.finish_run(run)
        assert {c["precision"]: c["p50_ms"] for c in h.cells(run)} == {"int8": 3.0, "fp32": 1.0}
        assert h.runs()[0].cells == 2 and h.runs()[0].status == "complete"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer deploykit"):
        History(db)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="not a deploykit results database"):
        History(other)
    (tmp_path / "junk.sqlite").write_text("not sqlite at all " * 100)
    with pytest.raises(ConfigError, match="not a deploykit results database"):
        History(tmp_path / "junk.sqlite")


# ------------------------------------------------------------------------------- compare
def _pair(model: str, speedup: float, fp32_ms: float = 2.0, jitter: float = 0.02, seed: int = 0) -> list[Cell]:
    """An INT8 cell and its FP32 partner timed in the same 5 rounds (round medians with jitter)."""
    rng = np.random.default_rng(seed)
    fp32 = [fp32_ms * math.exp(x) for x in rng.normal(0, jitter, 5)]
    int8 = [f / speedup * math.exp(x) for f, x in zip(fp32, rng.normal(0, jitter, 5))]
    ratio = float(np.median([f / q for f, q in zip(fp32, int8)]))
    return [_cell(model=model, precision="fp32", speedup=1.0, p50_ms=float(np.median(fp32)), round_ms=fp32),
            _cell(model=model, p50_ms=float(np.median(int8)), round_ms=int8, speedup=ratio,
                  fp32_p50_ms=float(np.median(fp32)))]


def _run(speedups: list[float], fp32_ms: list[float] | None = None, seed: int = 0, jitter: float = 0.02) -> list[Cell]:
    fp32_ms = fp32_ms or [2.0] * len(speedups)
    return [c for i, (sp, ms) in enumerate(zip(speedups, fp32_ms))
            for c in _pair(f"m{i}", sp, ms, jitter, seed * 100 + i)]


def test_compare_noise_model():
    same = compare_cells([_cell()], [_cell(p50_ms=1.08, speedup=1.9)])
    assert not same.flagged and same.noise.startswith("noise:")
    slower = compare_cells([_cell()], [_cell(p50_ms=2.0, speedup=1.0)])  # speed-up halved in the same rounds
    assert slower.flagged and any("speed-up" in f for f in slower.flagged[0].flags)
    # twelve unchanged cells and one whose speed-up halved: only that one, by the test on its rounds
    base = [1.5 + 0.1 * i for i in range(12)]
    a, b = _run(base, seed=1), _run(base[:-1] + [base[-1] / 2], seed=2)
    cmp = compare_cells(a, b)
    assert [c.key for c in cmp.flagged] == ["m11/onnxruntime/b1/int8"] and "Holm" in cmp.noise
    # the whole run twice as slow (the machine), speed-ups unchanged: the drift, nothing flagged
    slow = compare_cells(a, _run(base, fp32_ms=[4.0] * 12, seed=3))
    assert not slow.flagged and slow.drift == pytest.approx(math.log(2), abs=0.05) and "moved +" in slow.noise
    # ...but one model x target twice as slow in INT8 and FP32 alike, the rest unchanged: flagged
    one = compare_cells(a, _run(base, fp32_ms=[2.0] * 11 + [4.0], seed=4))
    assert {c.key for c in one.flagged} == {"m11/onnxruntime/b1/fp32", "m11/onnxruntime/b1/int8"}
    assert all(any("p50" in f for f in c.flags) for c in one.flagged)
    # between-run scatter seen across the cells widens every cell's band: -35% is noise among
    # cells that move +-30% from run to run, a regression among cells that hold within 2%
    rng = np.random.default_rng(7)
    noisy = [sp * math.exp(x) for sp, x in zip(base, rng.normal(0, 0.3, 12))]
    scattered = compare_cells(a, _run(noisy[:-1] + [base[-1] * 0.65], seed=5))
    assert "m11/onnxruntime/b1/int8" not in {c.key for c in scattered.flagged} and scattered.tau_speedup > 0.15
    tight = compare_cells(a, _run(base[:-1] + [base[-1] * 0.65], seed=5))
    assert "m11/onnxruntime/b1/int8" in {c.key for c in tight.flagged} and tight.tau_speedup < 0.05
    # a cell that flipped between two modes in its earlier runs is not convicted for flipping again
    flip_a, flip_b = _run(base[:-1] + [6.3], seed=6), _run(base[:-1] + [1.06], seed=8)
    assert "m11/onnxruntime/b1/int8" in {c.key for c in compare_cells(flip_a, flip_b).flagged}
    history = [_run(base[:-1] + [sp], seed=9 + i) for i, sp in enumerate((1.1, 6.2, 1.05))]
    seen = compare_cells(flip_a, flip_b, history=history)
    assert not seen.flagged and seen.history_runs == 3 and "earlier run" in seen.noise
    # oversubscribed machine (load 20 on 2 cores): a wall-clock drop whose CPU-time figure held is the
    # load; on a quiet machine, or when the CPU time got worse too, it is flagged
    loaded = {"load_average": [20.0], "cores": 2}
    held = compare_cells([_cell(env=loaded, cpu_speedup=1.2)], [_cell(env=loaded, speedup=1.0, cpu_speedup=1.18)])
    assert not held.flagged and "CPU-time speed-up held" in held.noise
    assert compare_cells([_cell(cpu_speedup=1.2)], [_cell(speedup=1.0, cpu_speedup=1.18)]).flagged
    assert compare_cells([_cell(env=loaded, cpu_speedup=1.2)], [_cell(env=loaded, speedup=1.0, cpu_speedup=0.9)]).flagged
    # one stalled round does not hide a halved speed-up: a robust spread of the per-round speed-ups
    rounds_a = {"round_ms": [1.0, 1.0, 1.02, 0.98, 30.0]}
    fp32_a = _cell(precision="fp32", speedup=1.0, p50_ms=2.0, round_ms=[2.0, 2.0, 2.0, 2.0, 2.0])
    fp32_b = _cell(precision="fp32", speedup=1.0, p50_ms=2.0, round_ms=[2.0, 2.1, 1.9, 2.0, 2.0])
    stall = compare_cells([_cell(**rounds_a), fp32_a], [_cell(speedup=0.5, p50_ms=4.0, round_ms=[4.0, 4.1, 3.9, 4.0, 4.2]),
                                                      fp32_b])
    assert any("speed-up" in f for f in stall.flagged[0].flags)


def test_guard_names_the_cause_and_holds_back_only_for_a_loaded_machines_wall_clock():
    from deploykit.matrix.run import guard

    quiet, loaded = {"load_average": [0.5], "cores": 2, "int8_dot_product": "no VNNI"}, \
        {"load_average": [20.0], "cores": 2, "int8_dot_product": "no VNNI"}
    assert guard(_cell(speedup=1.3), {}) == ("", "")
    fired, note = guard(_cell(speedup=0.95, cpu_speedup=1.17, fp32_p50_ms=110.0, batch_size=8, env=quiet), {})
    assert "not faster" in fired and "no VNNI" in fired and "CPU time per call 1.17x" in fired and not note
    # same figures under a load of 10 per core: INT8 did less work, the wall clock measured the load
    held, note = guard(_cell(speedup=0.95, cpu_speedup=1.17, fp32_p50_ms=110.0, batch_size=8, env=loaded), {})
    assert not held and "1.17x less CPU" in note and "20 on 2 cores" in note
    # no CPU gain either: fired whatever the load, with the tiny model's per-call overhead named
    tiny, _ = guard(_cell(speedup=0.6, cpu_speedup=0.7, fp32_p50_ms=0.08, env=loaded), {})
    assert "per-call overhead" in tiny
    floats, _ = guard(_cell(speedup=0.9, env=quiet), {"checks": [{"name": "int8_fraction", "value": 0.6,
                                                                  "message": "2 float layers"}]})
    assert "float fallback layers (2 float layers)" in floats


def test_compare_accuracy_binomial_and_status():
    assert worse_proportion(480, 500, 470, 500) > 0.01  # 2 points on 500 samples: noise
    assert worse_proportion(480, 500, 440, 500) < 0.01
    small = compare_cells([_cell()], [_cell(accuracy=0.94)])
    assert not small.flagged and "accuracy" in small.noise
    big = compare_cells([_cell()], [_cell(accuracy=0.85)])
    assert big.flagged and "accuracy" in big.flagged[0].flags[0]
    broke = compare_cells([_cell()], [_cell(status="error", error="boom", p50_ms=None)])
    assert broke.flagged and "ok -> error" in broke.flagged[0].flags[0]


def test_compare_cli_exit_codes(tmp_path, capsys):
    db = tmp_path / "h.sqlite"
    with History(db) as h:
        ids = []
        for cells in ([_cell(), _cell(precision="fp32", speedup=1.0, p50_ms=2.0)],
                      [_cell(p50_ms=1.02), _cell(precision="fp32", speedup=1.0, p50_ms=2.01)],
                      [_cell(p50_ms=4.0, speedup=0.5), _cell(precision="fp32", speedup=1.0, p50_ms=2.0)]):
            run = h.start_run("matrix")
            h.add_cells(run, [c.to_json() for c in cells])
            h.finish_run(run)
            ids.append(run)
    assert main(["compare", str(ids[0]), str(ids[1]), "--db", str(db)]) == 0
    assert "0 regression(s) flagged" in capsys.readouterr().out
    assert main(["compare", "--db", str(db)]) == 1  # default: the last two runs (2 -> 3)
    out = capsys.readouterr().out
    assert f"compare run {ids[1]} -> run {ids[2]}" in out and "REGRESSION" in out and "noise:" in out
    assert main(["compare", str(ids[0]), "99", "--db", str(db)]) == 2
    assert "no run 99" in capsys.readouterr().err
    assert main(["results", "--db", str(db), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == ids[::-1]
    assert main(["results", "--db", str(tmp_path / "none.sqlite")]) == 2


# ------------------------------------------------------------------------------- real matrices
@pytest.mark.slow
def test_matrix_real_run_rerun_and_outputs(tmp_path, capsys):
    spec = write_spec(tmp_path, targets=("onnxruntime", "openvino"), batch_sizes=(1, 4))
    out = tmp_path / "out"
    assert main(["matrix", str(spec), "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cells = [Cell.from_json(c) for c in doc["cells"]]
    assert len(cells) == 8 and all(c.status == "ok" for c in cells)
    for c in cells:
        assert c.p50_ms and c.p50_ms > 0 and c.p90_ms >= 0 and len(c.round_ms) == 2 and c.throughput
        assert c.env["cpu"] and c.env["cores"] and c.env["versions"]["onnxruntime"] and c.env["load_average"]
        assert c.eval_samples == 200 and c.accuracy is not None and c.top1_agreement is not None
    int8 = [c for c in cells if c.precision == "int8"]
    assert all(c.speedup and c.fp32_p50_ms and c.artifact["rebuilt"] for c in int8)
    assert all(c.top1_agreement == 1.0 for c in cells if c.precision == "fp32")
    for name in ("matrix.md", "matrix.csv", "matrix.json", "matrix.html"):
        assert (out / name).is_file()
    assert (out / "matrix.md").read_text().count("| digits |") == 8
    assert len((out / "matrix.csv").read_text().splitlines()) == 9
    # a rerun: a new run id, nothing rebuilt
    assert main(["matrix", str(spec), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["run"]["run_id"] == doc["run"]["run_id"] + 1 and again["run"]["rebuilt"] == 0
    assert not any(c["artifact"].get("rebuilt") for c in again["cells"])
    assert main(["results", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["cells"] for r in runs] == [8, 8] and all(r["status"] == "complete" for r in runs)


@pytest.mark.slow
def test_matrix_cells_run_as_check_jobs_on_the_given_executor(tmp_path):
    """Each model x target is one CheckJob on MatrixOptions.executor, which also decides what it
    can run (a device agent or Ray plugs in here); the cells are the job's figures."""
    from deploykit.jobs import LocalExecutor
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix

    class Recording(LocalExecutor):
        def __init__(self) -> None:
            super().__init__()
            self.runs: list = []

        def accepts(self, target, availability):
            return "lab device busy" if target.name == "openvino" else super().accepts(target, availability)

        def run(self, job):
            result = super().run(job)
            self.runs.append((job, result))
            return result

    executor = Recording()
    spec = load_spec(write_spec(tmp_path, targets=("onnxruntime", "openvino"), batch_sizes=(1, 2)))
    result = run_matrix(spec, MatrixOptions(tmp_path / "out", executor=executor))
    ((job, done),) = executor.runs
    assert job.target.name == "onnxruntime" and job.target.batch_sizes == (1, 2)
    assert job.settings.rounds == 2 and job.settings.fp32_checks and not job.settings.layers
    cells = {c.key: c for c in result.cells}
    for entry in done.latency:
        b = entry.stats.batch_size
        int8, fp32 = cells[f"digits/onnxruntime/b{b}/int8"], cells[f"digits/onnxruntime/b{b}/fp32"]
        assert int8.round_ms == list(entry.rounds_ms) and fp32.round_ms == list(entry.fp32_rounds_ms)
        assert int8.p50_ms == entry.stats.p50_ms and int8.fp32_p50_ms == fp32.p50_ms == entry.fp32_stats.p50_ms
        assert int8.speedup == pytest.approx(entry.speedup)
    ov = [c for c in result.cells if c.target == "openvino"]
    assert len(ov) == 4 and all(c.status == "not_run" and "lab device busy" in c.error for c in ov)
    assert all(c.artifact.get("key") for c in ov if c.precision == "int8")  # lowered all the same
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "deploykit.matrix" and "matrix.html" in manifest["files"]
    # calibrated as `deploykit build` with the same targets: the same canonical model (scales,
    # zero points, recipe-corrected weights and biases)
    import onnx
    from onnx import numpy_helper

    from deploykit.pipeline import BuildOptions, build

    built = build(str(SAMPLES / "digits_cnn.onnx"), BuildOptions(
        targets=["onnxruntime", "openvino"], out_dir=tmp_path / "build", calib=str(SAMPLES / "digits_calib.npz"),
        eval=str(SAMPLES / "digits_eval.npz"), eval_samples=50, baseline=False))
    ours = Path(cells["digits/onnxruntime/b1/fp32"].artifact["path"]).parent / built.canonical.path.name
    weights = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(f)).graph.initializer}
               for f in (ours, built.canonical.path)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_matrix_resumes_after_interruption_with_nothing_lost_or_duplicated(tmp_path):
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix

    spec = load_spec(write_spec(tmp_path, batch_sizes=(1, 2, 4)))
    out = tmp_path / "out"
    seen: list[str] = []

    def stop_after_three(cell, done, total):
        seen.append(cell.key)
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_matrix(spec, MatrixOptions(out, on_cell=stop_after_three))
    with History() as h:
        first = h.runs()[0]
        assert first.status == "running" and first.cells == 3
    measured: list[str] = []
    result = run_matrix(spec, MatrixOptions(out, on_cell=lambda c, d, t: measured.append(c.key)))
    assert result.resumed and result.run_id == first.id
    assert len(result.cells) == 6 and sorted(measured) == sorted({c.key for c in result.cells} - set(seen))
    with History() as h:
        assert len(h.runs()) == 1 and h.runs()[0].status == "complete"
        keys = [c["model"] + c["precision"] + str(c["batch_size"]) for c in h.cells(first.id)]
        assert len(keys) == 6 == len(set(keys))
    # finished: the next run is a new one
    assert run_matrix(spec, MatrixOptions(out)).run_id == first.id + 1


@pytest.mark.slow
def test_failing_model_is_recorded_and_the_rest_go_on(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an onnx model")
    models = [("broken", bad, SAMPLES / "digits_calib.npz", SAMPLES / "digits_eval.npz"),
              ("digits", SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_calib.npz", SAMPLES / "digits_eval.npz")]
    spec = write_spec(tmp_path, models=models)
    assert main(["matrix", str(spec), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "2 cell(s) errored" in captured.err and "Traceback" not in captured.err + captured.out
    doc = json.loads((tmp_path / "out" / "matrix.json").read_text())
    status = {c["model"]: c["status"] for c in doc["cells"]}
    assert status == {"broken": "error", "digits": "ok"}
    assert all("broken" in c["error"] for c in doc["cells"] if c["model"] == "broken")


def test_second_matrix_into_the_same_folder_is_refused(tmp_path):
    """The matrix's folder is an OutDir, as a build's: one writer at a time, named by pid."""
    import os

    from deploykit.errors import OutputDirError
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix
    from deploykit.outdir import OutDir

    spec = load_spec(write_spec(tmp_path))
    with OutDir(tmp_path / "out") as held, held.step("run", "k"):
        with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
            run_matrix(spec, MatrixOptions(tmp_path / "out"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="did not write"):
        run_matrix(spec, MatrixOptions(tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_build_is_recorded_in_the_history(tmp_path, capsys):
    db = tmp_path / "builds.sqlite"
    code = main(["build", str(SAMPLES / "digits_cnn.onnx"), "--target", "onnxruntime", "--calib",
                 str(SAMPLES / "digits_calib.npz"), "--eval", str(SAMPLES / "digits_eval.npz"), "--out",
                 str(tmp_path / "out"), "--db", str(db), "--json"])
    assert code in (0, 1), capsys.readouterr().err
    capsys.readouterr()
    assert main(["results", "--db", str(db), "--run", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["kind"] == "build" and doc["run"]["status"] == "complete"
    cells = doc["cells"]
    assert {c["target"] for c in cells} == {"onnxruntime"} and len({c["batch_size"] for c in cells}) == len(cells)
    assert all(c["p50_ms"] > 0 and c["top1_agreement"] is not None for c in cells)
