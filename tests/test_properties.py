"""Property tests (Hypothesis) for the command line's inputs: target names, TOML values,
numbers, preprocessing strings, --out paths and data arrays. Whatever the input:

- no traceback, and never the "unexpected fault" exit code 3;
- nothing written or deleted outside --out;
- bad input: a non-zero exit and exactly one error line; good input: a published folder that
  holds exactly what its manifest lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from deploykit.testing.tiny import tiny_classifier

SETTINGS = settings(max_examples=int(os.environ.get("DEPLOYKIT_PROPERTY_EXAMPLES", "12")), deadline=None,
                    suppress_health_check=list(HealthCheck), derandomize=True)
FAST = '[defaults]\nruns = 2\nwarmup = 0\n'


def _snapshot(root: Path, skip: Path | None) -> dict[str, str]:
    """Every file and link under ``root`` except under ``skip``, with a content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath).resolve() == skip:
            dirnames[:] = []
            continue
        for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = (os.readlink(p) if p.is_symlink() else
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run(tmp: Path, args: list[str], out: str = "out", toml: str | None = None) -> tuple[int, str]:
    """``deploykit build m.onnx ARGS --out OUT`` in ``tmp``; checks the invariants; returns (code, stderr)."""
    from deploykit.cli import main

    (tmp / "targets.toml").write_text(FAST + (toml or ""), encoding="utf-8")
    out_path = (tmp / out).resolve() if not os.path.isabs(out) else Path(out).resolve()
    sandbox = tmp.parent
    before = _snapshot(sandbox, out_path)
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["build", "m.onnx", "--method", "minmax", "--no-baseline", "--samples", "8",
                         "--eval-samples", "8", *args, "--out", out])
    finally:
        os.chdir(cwd)
    err = stderr.getvalue()
    assert "Traceback" not in err, err
    assert code != 3, err
    after = _snapshot(sandbox, out_path)
    assert after == before, f"written outside --out: {set(after.items()) ^ set(before.items())}"
    errors = [line for line in err.splitlines() if line.startswith("deploykit: error:")]
    if code == 0:
        manifest = json.loads((out_path / "manifest.json").read_text(), parse_constant=pytest.fail)
        on_disk = sorted(str(p.relative_to(out_path)) for p in out_path.rglob("*")
                         if p.is_file() and ".deploykit" not in p.relative_to(out_path).parts)
        assert manifest["files"] == on_disk
        assert not errors
    else:
        assert len(errors) == 1, err
    return code, err


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="dk-prop-") as sandbox:
        tmp = Path(sandbox) / "work"
        tmp.mkdir()
        (Path(sandbox) / "victim").mkdir()
        (Path(sandbox) / "victim" / "keep.txt").write_text("keep")
        tiny_classifier(tmp / "m.onnx")
        np.savez(tmp / "c.npz", x=np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32),
                 labels=np.arange(16) % 4)
        yield tmp


@pytest.fixture(autouse=True)
def _only_onnxruntime(monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_DISABLE_PLUGINS", "openvino,tflite,coreml,tensorrt")


NAMES = st.one_of(st.text(min_size=0, max_size=12),
                  st.sampled_from(["../x", "../../victim/keep.txt", "/tmp/x", "a/b", ".", "..", ".deploykit",
                                   "manifest.json", "ok-name", "a\x1b[2J", "con", "x" * 70]))


@SETTINGS
@given(name=NAMES)
def test_any_target_name(name):
    with workdir() as tmp:
        toml = f'[targets.{json.dumps(name)}]\nbackend = "onnxruntime"\n'
        code, _ = run(tmp, ["-t", name.replace(",", "") or "x", "--calib", "c.npz"], toml=toml)
        assert code in (0, 2)


TOML_VALUES = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=8), st.booleans(), st.lists(st.integers(-3, 3), max_size=3))


@SETTINGS
@given(key=st.sampled_from(["method", "samples", "percentile", "batch_size", "seed", "data", "eval", "bogus"]),
       value=TOML_VALUES)
def test_any_calibration_value(key, value):
    from deploykit.outdir import dumps

    with workdir() as tmp:
        literal = {float("inf"): "inf", float("-inf"): "-inf"}.get(value, None) if isinstance(value, float) else None
        if isinstance(value, float) and value != value:
            literal = "nan"
        text = literal or (json.dumps(value) if not isinstance(value, bool) else str(value).lower())
        if isinstance(value, float) and literal is None:
            text = repr(value)
        code, _ = run(tmp, ["-t", "onnxruntime"], toml=f"[calibration]\n{key} = {text}\n")
        assert code in (0, 2), dumps({key: value})


@SETTINGS
@given(option=st.sampled_from(["--percentile", "--samples", "--eval-samples", "--calib-batch-size"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 3000).map(str),
                       st.text(max_size=6)))
def test_any_number_on_the_command_line(option, value):
    with workdir() as tmp:
        code, _ = run(tmp, ["-t", "onnxruntime", "--calib", "c.npz", "--method", "percentile", option, value])
        assert code in (0, 2)


@SETTINGS
@given(text=st.one_of(st.text(max_size=30),
                      st.lists(st.tuples(st.sampled_from(["resize", "crop", "mean", "std", "scale", "layout", "color",
                                                          "x"]),
                                         st.text(alphabet="0123456789./-naie", max_size=8)), max_size=4)
                      .map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))))
def test_any_preprocess_string(text):
    with workdir() as tmp:
        code, _ = run(tmp, ["-t", "onnxruntime", "--calib", "c.npz", "--preprocess", text or "x"])
        assert code in (0, 2)


@SETTINGS
@given(parts=st.lists(st.sampled_from(["out", "..", ".", "sub", "victim", "m.onnx", "c.npz", "work"]), min_size=1,
                      max_size=3))
def test_any_out_path(parts):
    with workdir() as tmp:
        out = os.path.join(*parts)
        code, _ = run(tmp, ["-t", "onnxruntime", "--calib", "c.npz"], out=out)
        assert code in (0, 2)
        assert (tmp.parent / "victim" / "keep.txt").read_text() == "keep"
        assert (tmp / "m.onnx").is_file() and (tmp / "c.npz").is_file()


@SETTINGS
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16", "complex64"]),
       fill=st.sampled_from([0.0, 1.0, 1e30, float("nan"), float("inf")]),
       labels=st.one_of(st.none(), st.integers(-2, 9)))
def test_any_array(shape, dtype, fill, labels):
    with workdir() as tmp:
        with np.errstate(all="ignore"):
            x = np.full(shape, fill).astype(dtype)
        arrays = {"x": x}
        if labels is not None:
            arrays["labels"] = np.full(shape[:1] or [1], labels)
        np.savez(tmp / "d.npz", **arrays)
        code, _ = run(tmp, ["-t", "onnxruntime", "--calib", "d.npz"])
        assert code in (0, 1, 2)
