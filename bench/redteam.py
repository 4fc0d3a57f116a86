"""Red-team pass: hostile and careless inputs against ``deploykit build``; counts the cases
that misbehave.

Each case runs the real CLI (in-process, onnxruntime backend, a tiny model built with
onnx.helper) in a fresh sandbox holding a "victim" folder. A case misbehaves when:

- stderr holds a traceback, or the exit code is 3 (an unexpected fault) or otherwise wrong
  (bad input must exit non-zero with exactly one "deploykit: error:" line; good input must
  exit 0, or 1 when a threshold is meant to fail);
- anything outside --out was written, changed or deleted;
- a finished --out does not hold exactly what its manifest lists, or the JSON has NaN;
- the case's own check fails (e.g. code from a config file ran, a foreign file vanished).

    python bench/redteam.py [-k SUBSTRING] [-v]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "onnxruntime")]
os.environ.setdefault("DEPLOYKIT_DISABLE_PLUGINS", "openvino,tflite,coreml,tensorrt")
os.environ.setdefault("CI", "1")  # no live progress bars

FAST = "[defaults]\nruns = 2\nwarmup = 0\n"


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # writes files into the work folder, returns extra CLI args
    expect: str  # "error", "ok", "fail" (exit 1: a check failed), "ok|fail"
    check: Callable[[Path, str], str | None] | None = None  # after the run: a complaint, or None
    toml: str = ""
    out: str = "out"


# ---------------------------------------------------------------------------------------- helpers
def tiny(path: Path, **kw) -> Path:
    from deploykit.testing.tiny import tiny_classifier

    return tiny_classifier(path, **kw)


def npz(path: Path, n: int = 16, **arrays) -> Path:
    rng = np.random.default_rng(0)
    arrays.setdefault("x", rng.random((n, 3, 8, 8), dtype=np.float32))
    np.savez(path, **arrays)
    return path


def _args(*extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(extra)


def _with(files: Callable[[Path], None], *extra: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        files(tmp)
        return list(extra)
    return setup


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).resolve() == skip:
            dirnames[:] = []
            continue
        for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / f
            try:
                out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else \
                    hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                out[str(p.relative_to(root))] = "unreadable"
    return out


# ---------------------------------------------------------------------------------------- the cases
def cases() -> list[Case]:
    cs: list[Case] = []

    def target_toml(name: str) -> str:
        return f'[targets.{json.dumps(name)}]\nbackend = "onnxruntime"\n'


    # 1. names from configuration
    for name in ["../x", "../../victim/owned", "/tmp/deploykit-redteam-victim", "a/b", "a\\b", ".hidden", "..",
                 ".deploykit", "manifest.json", "report.md", "x.onnx", "a\x1b[31mred", "ünï", "a" * 65, " lead",
                 "tab\there", "nul\x00", "semi;colon", "$(touch pwned)", "*"]:
        cs.append(Case(f"target name {name!r}", _args("-t", name.replace(",", ""), "--calib", "c.npz"), "error",
                       toml=target_toml(name)))
    cs.append(Case("target name 'good-name_1.x'", _args("-t", "good-name_1.x", "--calib", "c.npz"), "ok",
                   toml=target_toml("good-name_1.x")))

    # 2. code from configuration
    helper = textwrap.dedent("""
        import pathlib, numpy as np
        pathlib.Path("RAN").write_text("code ran")
        def calib():
            return [{"x": np.random.rand(8, 3, 8, 8).astype("float32")}]
    """)

    def ran(expected: bool) -> Callable[[Path, str], str | None]:
        return lambda tmp, err: None if (tmp / "RAN").exists() == expected else \
            ("the config's code ran" if not expected else "the code did not run")

    for key in ("data", "eval"):
        cs.append(Case(f"[calibration] {key} = helper.py:calib without --allow-code",
                       _with(lambda t: (t / "helper.py").write_text(helper), "-t", "onnxruntime",
                             *(["--calib", "c.npz"] if key == "eval" else [])),
                       "error", ran(False), toml=f'[calibration]\n{key} = "helper.py:calib"\n'))
    cs.append(Case("[calibration] data = os:getcwd without --allow-code", _args("-t", "onnxruntime"), "error",
                   toml='[calibration]\ndata = "os:getcwd"\n'))
    cs.append(Case("[calibration] data = helper.py:calib with --allow-code",
                   _with(lambda t: (t / "helper.py").write_text(helper), "-t", "onnxruntime", "--allow-code"),
                   "ok", ran(True), toml='[calibration]\ndata = "helper.py:calib"\n'))
    cs.append(Case("--calib helper.py:calib on the command line",
                   _with(lambda t: (t / "helper.py").write_text(helper), "-t", "onnxruntime", "--calib",
                         "helper.py:calib"), "ok", ran(True)))
    for body, label in [("import sys\ndef calib():\n    sys.exit(0)\n", "calls sys.exit(0)"),
                        ("import sys\ndef calib():\n    sys.exit(3)\n", "calls sys.exit(3)"),
                        ("def calib():\n    return None\n", "returns None"),
                        ("def calib():\n    return []\n", "returns []"),
                        ("def calib():\n    yield from ()\n", "yields nothing"),
                        ("def calib():\n    raise ValueError('boom')\n", "raises"),
                        ("def calib():\n    return 42\n", "returns 42"),
                        ("def calib():\n    return [{'wrong': 1}]\n", "returns the wrong input name"),
                        ("import sys\nsys.exit(0)\n", "exits on import"),
                        ("raise ImportError('x')\n", "fails on import"),
                        ("calib = 5\n", "is not callable")]:
        cs.append(Case(f"data function {label}",
                       _with(lambda t, b=body: (t / "fn.py").write_text(b), "-t", "onnxruntime", "--calib",
                             "fn.py:calib"), "error"))

    # 3. output folders
    def foreign(t: Path) -> None:
        (t / "out").mkdir()
        (t / "out" / "thesis.tex").write_text("years of work")

    cs.append(Case("--out holds a foreign file", _with(foreign, "-t", "onnxruntime", "--calib", "c.npz"), "error",
                   lambda t, e: None if (t / "out" / "thesis.tex").read_text() == "years of work" else "foreign file lost"))

    def symlinked_sub(t: Path) -> None:
        (t / "out").mkdir()
        os.symlink(t.parent / "victim", t / "out" / "onnxruntime")

    cs.append(Case("--out has a symlinked sub-folder named like the target",
                   _with(symlinked_sub, "-t", "onnxruntime", "--calib", "c.npz"), "error"))
    for text, label in [("[1, 2]", "a JSON list"), ("{not json", "not JSON"), ('{"files": ["../victim/keep.txt"]}',
                                                                              "naming a path outside"),
                        ('{"files": ["/etc/passwd"]}', "naming an absolute path"), ('{"files": 3}', "files not a list")]:
        def bad_manifest(t: Path, text: str = text) -> None:
            (t / "out").mkdir()
            (t / "out" / "manifest.json").write_text(text)
        cs.append(Case(f"--out has a manifest.json that is {label}",
                       _with(bad_manifest, "-t", "onnxruntime", "--calib", "c.npz"), "error"))
    cs.append(Case("--out is a file", _with(lambda t: (t / "afile").write_text("x"), "-t", "onnxruntime",
                                            "--calib", "c.npz"), "error", out="afile"))
    cs.append(Case("--out under /proc (virtual filesystem)", _args("-t", "onnxruntime", "--calib", "c.npz"), "error",
                   out="/proc/deploykit-redteam"))
    cs.append(Case("--out under a file", _with(lambda t: (t / "afile").write_text("x"), "-t", "onnxruntime",
                                               "--calib", "c.npz"), "error", out="afile/sub"))
    cs.append(Case("--out is the work folder itself (holds the model)", _args("-t", "onnxruntime", "--calib", "c.npz"),
                   "error", out="."))
    cs.append(Case("--out is a dangling symlink", _with(lambda t: os.symlink(t / "nowhere", t / "dangling"), "-t",
                                                        "onnxruntime", "--calib", "c.npz"), "error", out="dangling"))

    def earlier_build(t: Path) -> None:
        from deploykit.cli import main
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            main(["build", "m.onnx", "-t", "onnxruntime", "--calib", "c.npz", "--out", "out", "--no-baseline",
                  "--method", "minmax", "--samples", "8", "--eval-samples", "8"])
        tiny(t / "m2.onnx", classes=6)

    cs.append(Case("rebuild a different model into an earlier build's folder",
                   _with(earlier_build, "-t", "onnxruntime", "--calib", "c.npz"), "ok",
                   lambda t, e: None if json.loads((t / "out" / "manifest.json").read_text())["model"]["path"]
                   .endswith("m.onnx") else "old manifest survived"))

    # 4/5. numbers, thresholds, options
    for opt, vals in [("--percentile", ["0", "-5", "150", "nan", "inf", "-inf", "1e309", "abc"]),
                      ("--samples", ["0", "-1", "abc", "1.5"]), ("--eval-samples", ["0", "-3"]),
                      ("--calib-batch-size", ["0", "-2"]), ("--method", ["kl"]), ("--task", ["segmentation"])]:
        for v in vals:
            cs.append(Case(f"{opt} {v}", _args("-t", "onnxruntime", "--calib", "c.npz", opt, v), "error"))
    for pp in ["mean=a/b", "resize=big", "std=0", "scale=nan", "layout=XYZ", "color=CMYK", "foo", "crop=-1",
               "mean=", "std=inf", "resize=1e9"]:
        cs.append(Case(f"--preprocess {pp}", _args("-t", "onnxruntime", "--calib", "c.npz", "--preprocess", pp),
                       "error"))
    for toml, label in [("[calibration]\nseed = -1\n", "seed = -1"), ("[calibration]\npercentile = nan\n", "percentile nan"),
                        ("[calibration]\npercentile = 0\n", "percentile 0"), ("[calibration]\nsamples = 0\n", "samples 0"),
                        ("[calibration]\nmethod = 'kl'\n", "unknown method"), ("[calibration]\nbogus = 1\n", "unknown key"),
                        ("[calibration]\nsamples = 'many'\n", "samples a string"), ("[[targets]]\n", "targets an array"),
                        ("[preprocess]\nmean = ['a']\n", "preprocess mean strings"),
                        ("[preprocess]\nscale = -1\n", "preprocess scale negative"),
                        ("x = 1\n", "unknown top-level key"), ("[devices]\nd = 3\n", "device not a table"),
                        ("this is not toml", "not TOML")]:
        cs.append(Case(f"targets.toml {label}", _args("-t", "onnxruntime", "--calib", "c.npz"), "error", toml=toml))
    for th, label in [("min_cosine = nan", "nan threshold"), ("min_cosine = 0.9\nmax_cosine = 0.5", "min > max"),
                      ("min_cosine = 'high'", "threshold a string"), ("min_bogus = 1", "unknown metric"),
                      ("cosine = 0.9", "no min_/max_"), ("max_latency_p50_ms = inf", "inf threshold")]:
        cs.append(Case(f"thresholds: {label}", _args("-t", "t", "--calib", "c.npz"), "error",
                       toml=f'[targets.t]\nbackend = "onnxruntime"\n[targets.t.thresholds]\n{th}\n'))
    for opt, label in [('execution_provider = "NoSuchProvider"', "unknown provider"), ("threads = -1.5", "threads float"),
                       ('activations = "int4"', "activations int4"), ("bogus = 1", "unknown option")]:
        cs.append(Case(f"options: {label}", _args("-t", "t", "--calib", "c.npz"), "error",
                       toml=f'[targets.t]\nbackend = "onnxruntime"\n[targets.t.options]\n{opt}\n'))
    for extra, label in [("batch_sizes = [0]", "batch 0"), ("batch_sizes = []", "no batches"),
                         ('batch_sizes = ["a"]', "batch string"), ("warmup = -1", "warmup -1"), ("runs = 0", "runs 0"),
                         ('device = "nowhere"', "unknown device"), ('backend = "nosuch"', "unknown backend")]:
        cs.append(Case(f"target: {label}", _args("-t", "t", "--calib", "c.npz"), "error",
                       toml=f'[targets.t]\nbackend = "onnxruntime"\n{extra}\n'.replace(
                           'backend = "onnxruntime"\nbackend', 'backend')))
    cs.append(Case("unknown target name", _args("-t", "jetson", "--calib", "c.npz"), "error"))
    cs.append(Case("empty --target", _args("-t", ",", "--calib", "c.npz"), "error"))
    cs.append(Case("target given twice", _args("-t", "onnxruntime,onnxruntime", "--calib", "c.npz"), "ok",
                   lambda t, e: None if len(json.loads((t / "out" / "manifest.json").read_text())["targets"]) == 1
                   else "built twice"))
    cs.append(Case("min_ and max_ both set, value above max", _args("-t", "t", "--calib", "c.npz"), "fail",
                   toml='[targets.t]\nbackend = "onnxruntime"\n[targets.t.thresholds]\nmin_cosine = 0.0\n'
                        'max_cosine = 0.000001\n'))

    # data
    bad_data = {
        "wrong input name": lambda t: npz(t / "d.npz", image=np.zeros((8, 3, 8, 8), np.float32), x=None) if False else
        np.savez(t / "d.npz", image=np.zeros((8, 3, 8, 8), np.float32), other=np.zeros((8, 3), np.float32)),
        "wrong shape": lambda t: np.savez(t / "d.npz", x=np.zeros((8, 3, 4, 4), np.float32)),
        "wrong rank": lambda t: np.savez(t / "d.npz", x=np.zeros((8, 3), np.float32)),
        "string dtype": lambda t: np.savez(t / "d.npz", x=np.array(["a"] * 8)),
        "NaN values": lambda t: np.savez(t / "d.npz", x=np.full((8, 3, 8, 8), np.nan, np.float32)),
        "object array": lambda t: np.savez(t / "d.npz", x=np.array([{"a": 1}] * 8, dtype=object)),
        "a scalar": lambda t: np.savez(t / "d.npz", x=np.float32(1)),
        "zero samples": lambda t: np.savez(t / "d.npz", x=np.zeros((0, 3, 8, 8), np.float32)),
        "labels out of range": lambda t: npz(t / "d.npz", labels=np.arange(16) + 10),
        "negative labels": lambda t: npz(t / "d.npz", labels=-np.ones(16, np.int64)),
        "2-D labels": lambda t: npz(t / "d.npz", labels=np.zeros((16, 3), np.int64)),
        "fractional labels": lambda t: npz(t / "d.npz", labels=np.full(16, 0.5)),
        "label count mismatch": lambda t: npz(t / "d.npz", labels=np.zeros(5, np.int64)),
        "empty .npz": lambda t: zipfile.ZipFile(t / "d.npz", "w").close(),
        "truncated .npz": lambda t: (npz(t / "full.npz"), (t / "d.npz").write_bytes((t / "full.npz").read_bytes()[:300])),
        "not a zip": lambda t: (t / "d.npz").write_text("hello"),
        "uneven inputs": lambda t: np.savez(t / "d.npz", x=np.zeros((8, 3, 8, 8), np.float32), labels=np.zeros(3)),
    }
    for label, make in bad_data.items():
        cs.append(Case(f"--calib .npz: {label}", _with(make, "-t", "onnxruntime", "--calib", "d.npz"), "error"))
    cs.append(Case("--eval .npz: labels out of range", _with(bad_data["labels out of range"], "-t", "onnxruntime",
                                                               "--calib", "c.npz", "--eval", "d.npz"), "error"))
    cs.append(Case("--calib .npy with wrong rank", _with(lambda t: np.save(t / "d.npy", np.zeros((4, 3))), "-t",
                                                         "onnxruntime", "--calib", "d.npy"), "error"))
    cs.append(Case("--calib missing file", _args("-t", "onnxruntime", "--calib", "nope.npz"), "error"))
    cs.append(Case("--calib unsupported suffix", _with(lambda t: (t / "d.csv").write_text("1,2"), "-t", "onnxruntime",
                                                       "--calib", "d.csv"), "error"))
    cs.append(Case("--calib empty image folder", _with(lambda t: (t / "imgs").mkdir(), "-t", "onnxruntime", "--calib",
                                                       "imgs"), "error"))
    cs.append(Case("--calib image folder with a broken image",
                   _with(lambda t: ((t / "imgs").mkdir(), (t / "imgs" / "a.png").write_bytes(b"not a png")), "-t",
                         "onnxruntime", "--calib", "imgs"), "error"))
    cs.append(Case("data that overflows (1e38) gives no wrong success",
                   _with(lambda t: npz(t / "d.npz", x=np.full((16, 3, 8, 8), 3e38, np.float32)), "-t", "t", "--calib",
                         "c.npz", "--eval", "d.npz"), "error|fail",
                   toml='[targets.t]\nbackend = "onnxruntime"\n[targets.t.thresholds]\nmin_cosine = 0.5\n'))
    cs.append(Case("int64 where the model wants float32 is converted? no: refused",
                   _with(lambda t: np.savez(t / "d.npz", x=np.zeros((8, 3, 8, 8), np.int64)), "-t", "onnxruntime",
                         "--calib", "d.npz"), "error"))

    # models
    cs.append(Case("model missing", _with(lambda t: (t / "m.onnx").unlink(), "-t", "onnxruntime"), "error"))
    cs.append(Case("model is garbage", _with(lambda t: (t / "m.onnx").write_bytes(os.urandom(200)), "-t",
                                             "onnxruntime"), "error"))
    cs.append(Case("model is empty", _with(lambda t: (t / "m.onnx").write_bytes(b""), "-t", "onnxruntime"), "error"))
    cs.append(Case("model is a folder", _with(lambda t: ((t / "m.onnx").unlink(), (t / "m.onnx").mkdir()), "-t",
                                              "onnxruntime"), "error"))

    def no_outputs(t: Path) -> None:
        import onnx
        m = onnx.load(str(t / "m.onnx"))
        del m.graph.output[:]
        onnx.save(m, str(t / "m.onnx"))

    cs.append(Case("model without outputs", _with(no_outputs, "-t", "onnxruntime", "--calib", "c.npz"), "error"))

    def external_outside(t: Path) -> None:
        import onnx
        m = onnx.load(str(t / "m.onnx"))
        w = next(i for i in m.graph.initializer if i.name == "W")
        w.ClearField("raw_data")
        del w.float_data[:]
        w.data_location = onnx.TensorProto.EXTERNAL
        w.external_data.add(key="location", value="../victim/keep.txt")
        onnx.save(m, str(t / "m.onnx"))

    cs.append(Case("model with external data outside its folder", _with(external_outside, "-t", "onnxruntime"),
                   "error"))
    for opset in (7, 8, 9):
        cs.append(Case(f"IR-3 model at opset {opset}, weights listed as inputs",
                       _with(lambda t, o=opset: tiny(t / "m.onnx", opset=o, ir_version=3, inits_as_inputs=True),
                             "-t", "onnxruntime", "--calib", "c.npz"), "ok"))
    cs.append(Case("fixed batch 4, 10 samples", _with(lambda t: (tiny(t / "m.onnx", batch=4), npz(t / "d.npz", n=10)),
                                                      "-t", "onnxruntime", "--calib", "d.npz"), "ok"))
    cs.append(Case("fixed batch 4, 3 samples", _with(lambda t: (tiny(t / "m.onnx", batch=4), npz(t / "d.npz", n=3)),
                                                     "-t", "onnxruntime", "--calib", "d.npz"), "ok"))
    cs.append(Case("--task classification on a [N, 4] output", _args("-t", "onnxruntime", "--calib", "c.npz", "--task",
                                                                     "classification"), "ok"))
    cs.append(Case("random calibration (no --calib)", _args("-t", "onnxruntime"), "ok"))
    return cs


# ---------------------------------------------------------------------------------------- running
def run_case(case: Case) -> tuple[str | None, float, str]:
    from deploykit.cli import main

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dk-redteam-") as sandbox:
        work = Path(sandbox) / "work"
        work.mkdir()
        (Path(sandbox) / "victim").mkdir()
        (Path(sandbox) / "victim" / "keep.txt").write_text("keep")
        tiny(work / "m.onnx")
        npz(work / "c.npz", labels=np.arange(16) % 4)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            extra = case.setup(work)
            (work / "targets.toml").write_text(FAST + case.toml, encoding="utf-8") if "not toml" not in case.toml \
                else (work / "targets.toml").write_text(case.toml)
            out = Path(case.out) if os.path.isabs(case.out) else work / case.out
            out_resolved = out.resolve()
            before = _snapshot(Path(sandbox), out_resolved)
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(["build", "m.onnx", "--method", "minmax", "--no-baseline", "--samples", "8",
                             "--eval-samples", "8", "--json", *extra, "--out", case.out])
        except BaseException as exc:  # the case itself blew up: that is misbehaviour too
            os.chdir(cwd)
            return f"raised {type(exc).__name__}: {exc}", time.monotonic() - t0, ""
        finally:
            os.chdir(cwd)
        err = stderr.getvalue()
        problems = []
        if "Traceback" in err:
            problems.append("traceback")
        if code == 3:
            problems.append("exit 3 (unexpected fault)")
        errors = [line for line in err.splitlines() if line.startswith("deploykit: error:")]
        allowed = {"error": {2}, "ok": {0}, "fail": {1}, "error|fail": {1, 2}, "ok|fail": {0, 1}}[case.expect]
        if code not in allowed:
            problems.append(f"exit {code}, expected {case.expect}")
        if code != 0 and len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        after = _snapshot(Path(sandbox), out_resolved)
        after.pop("work/RAN", None)  # the marker the allowed helper code writes, by design
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"changed outside --out: {changed[:3]}")
        if code in (0, 1) and out.is_dir():
            try:
                manifest = json.loads((out / "manifest.json").read_text(), parse_constant=lambda c: 1 / 0)
                on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                 if p.is_file() and ".deploykit" not in p.relative_to(out).parts)
                if manifest["files"] != on_disk:
                    problems.append("folder differs from its manifest")
                json.loads(stdout.getvalue(), parse_constant=lambda c: 1 / 0)
            except Exception as exc:
                problems.append(f"manifest/JSON: {type(exc).__name__}: {exc}")
        if case.check is not None:
            complaint = case.check(work, err)
            if complaint:
                problems.append(complaint)
        first = errors[0] if errors else ""
        return ("; ".join(problems) or None), time.monotonic() - t0, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("-v", action="store_true", help="print every case and its error line")
    args = ap.parse_args()
    selected = [c for c in cases() if args.k in c.name]
    bad = []
    t0 = time.monotonic()
    for case in selected:
        problem, seconds, line = run_case(case)
        if problem:
            bad.append((case.name, problem))
        if args.v or problem:
            print(f"{'MISBEHAVES' if problem else 'ok':<10} {case.name!r} ({seconds:.1f} s)"
                  + (f": {problem}" if problem else "") + (f"\n           {line}" if line and args.v else ""))
    print(f"\n{len(bad)} of {len(selected)} hostile cases misbehave ({time.monotonic() - t0:.0f} s, "
          f"load {os.getloadavg()[0]:.1f})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
