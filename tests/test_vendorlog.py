"""Vendor start-up noise is dropped from stderr in every process the command starts; -v shows it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploykit.testing import skip_unless_installed
from deploykit.vendorlog import is_noise

ROOT = Path(__file__).resolve().parents[1]

# Recorded from TensorFlow 2.21 / LiteRT / coremltools 9 on this machine (a TFLite + Core ML build).
VENDOR_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    ("I0000 00:00:1796587475.646672    8338 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
     "GPU will not be used."),
    ("E0000 00:00:1796587483.663710    8338 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
     "Failed call to cuInit: UNKNOWN ERROR (303)"),
    ("I0000 00:00:1732000000.123456   12345 port.cc:153] oneDNN custom operations are on. You may see slightly "
     "different numerical results due to floating-point round-off errors from different computation orders."),
    ("I0000 00:00:1732000000.123456   12345 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use "
     "available CPU instructions in performance-critical operations."),
    ("To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
     "appropriate compiler flags."),
    "W0000 00:00:1732000000.123456   12345 tf_tfl_flatbuffer_helpers.cc:364] Ignored output_format.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    ("scikit-learn version 1.9.1 is not supported. Minimum required version: 0.17. Maximum required version: "
     "1.5.1. Disabling scikit-learn conversion API."),
    "Torch version 2.13.0+cpu has not been tested with coremltools. You may run into unexpected errors.",
    "Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'",
]

OUR_LINES = [
    "calibrating (entropy) on deploykit/samples/digits_calib.npz",
    "target tflite (tflite)",
    "deploykit: error: tflite: TensorFlow could not convert node conv1 (op Conv)",
    "E: this is not an absl line",
    "WARNING: calibrated on random data: scales are not meaningful",
    "calibrate: ranges ━━━━━━━━━━━━━━ 12/512 sample 0:00:01 eta 0:00:40",
]


@pytest.mark.parametrize("line", VENDOR_LINES)
def test_recorded_vendor_lines_are_noise(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", OUR_LINES)
def test_deploykit_lines_are_not_noise(line):
    assert not is_noise(line)


_SCRIPT = textwrap.dedent(r"""
    import os, subprocess, sys
    from deploykit import vendorlog
    vendorlog.install()
    # native writes straight to fd 2, as TensorFlow's C++ does, mixed with ours
    os.write(2, b"I0000 00:00:1796587475.646672    8338 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"native line of our own\n")
    os.write(2, b"progress 1/3\rprogress 2/3\rprogress 3/3\n")
    print("python line of our own", file=sys.stderr)
    print("stdout line")
    # a child process inherits the filter (and the quiet environment)
    subprocess.run([sys.executable, "-c", "import os, sys; "
                    "os.write(2, b'E0000 00:00:1.0   1 cuda_platform.cc:52] failed call to cuInit: INTERNAL\\n'); "
                    "os.write(2, b'child line of our own\\n'); "
                    "print('child TF_CPP_MIN_LOG_LEVEL=' + os.environ.get('TF_CPP_MIN_LOG_LEVEL', '-'), file=sys.stderr)"],
                   check=True)
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nlast line without newline")
    vendorlog.stop()
""")


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DEPLOYKIT_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, timeout=60, env=env, check=False)


def test_filter_drops_native_vendor_lines_in_this_process_and_children():
    proc = _run({})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "cudart_stub" not in err and "cuInit" not in err and "XNNPACK" not in err
    for ours in ("native line of our own\n", "progress 1/3\rprogress 2/3\rprogress 3/3\n", "python line of our own\n",
                 "child line of our own\n", "child TF_CPP_MIN_LOG_LEVEL=3\n", "last line without newline"):
        assert ours in err, (ours, err)
    assert proc.stdout.decode() == "stdout line\n"


def test_verbose_passes_everything():
    proc = _run({"DEPLOYKIT_VERBOSE": "1"})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "cudart_stub.cc:31] Could not find cuda drivers" in err
    assert "failed call to cuInit" in err and "XNNPACK delegate" in err
    assert "child TF_CPP_MIN_LOG_LEVEL=-" in err  # no quiet defaults under -v
    assert "native line of our own" in err and "last line without newline" in err


@pytest.mark.slow
def test_tflite_build_stderr_has_nothing_from_tensorflow(tmp_path):
    """A real TFLite build (TensorFlow imported, converter and LiteRT run) in a real subprocess:
    stderr holds deploykit's own lines and nothing from TensorFlow."""
    # found, not imported (pytest.importorskip would import TensorFlow here, ~10 s of CPU): the build imports it
    skip_unless_installed("tensorflow", reason="the TFLite backend needs it (pip install -e '.[tflite]')")
    samples = ROOT / "deploykit" / "samples"
    env = {k: v for k, v in os.environ.items() if k not in ("DEPLOYKIT_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "tflite"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "deploykit.cli", "build", str(samples / "digits_cnn.onnx"), "--target", "tflite",
           "--calib", str(samples / "digits_calib.npz"), "--out", str(tmp_path / "out"), "--no-baseline"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tflite").is_dir()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "deploykit says what it is doing on stderr"
    vendor = [line for line in lines if any(word in line for word in (
        "absl", "cuda", "cuInit", "TensorFlow", "tensorflow", "XNNPACK", "oneDNN", "cpu_feature_guard", ".cc:"))]
    assert not vendor, proc.stderr
    assert any(line.startswith("target tflite") for line in lines), proc.stderr
