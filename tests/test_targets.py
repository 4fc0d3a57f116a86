"""targets.toml validation: every mistake is a ConfigError naming the file, the table and the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deploykit.errors import ConfigError, PluginError
from deploykit.targets import Calibration, Device, load_targets

REPO_TARGETS = Path(__file__).resolve().parents[1] / "targets.toml"
ALL_BACKENDS = {"onnxruntime", "openvino", "tflite", "coreml", "tensorrt"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _target_error(tmp_path, registry, text: str, name: str = "t") -> str:
    path = _write(tmp_path, text)
    tf = load_targets(path)
    with pytest.raises(ConfigError) as exc:
        registry.resolve(tf, [name])
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    return msg


def _load_error(tmp_path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_targets(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------ the repo's file
def test_repo_targets_toml_validates_with_all_backends(monkeypatch):
    from deploykit.plugins import DISABLE_ENV, load_registry

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    try:
        registry = load_registry()
    except PluginError as exc:
        pytest.skip(f"a backend plugin fails to import: {exc}")
    missing = ALL_BACKENDS - set(registry.names())
    if missing:
        pytest.skip(f"backend plugins not registering yet: {', '.join(sorted(missing))}")
    tf = load_targets(REPO_TARGETS)
    targets = {t.name: t for t in registry.all_targets(tf)}
    assert {t.backend for t in targets.values()} == ALL_BACKENDS
    assert ALL_BACKENDS <= set(targets)  # one entry named after each backend
    assert targets["onnxruntime"].batch_sizes == (1, 8)
    assert targets["tensorrt"].device.name == "a100"


def test_repo_targets_toml_onnxruntime_entry(ort_registry):
    """The onnxruntime entry of the shipped file resolves with the real plugin's option schema."""
    tf = load_targets(REPO_TARGETS)
    assert tf.calibration.method in ("minmax", "percentile", "entropy", "mse")
    assert "jetson-orin" in tf.devices and tf.devices["jetson-orin"].address
    (target,) = ort_registry.resolve(tf, ["onnxruntime"])
    assert target.backend == "onnxruntime"
    assert target.device == tf.devices["x86-cpu"]
    assert target.options["threads"] == 2 and target.options["activations"] == "uint8"
    assert target.thresholds["min_top1_agreement"] == pytest.approx(0.98)
    assert target.warmup == 10 and target.runs == 100


# ------------------------------------------------------------------------------ file level
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="targets file not found"):
        load_targets(tmp_path / "nope.toml")


def test_no_file_is_an_empty_configuration(ort_registry):
    tf = load_targets(None)
    assert tf.raw_targets == {} and tf.devices == {} and tf.calibration == Calibration()
    (target,) = ort_registry.resolve(tf, ["onnxruntime"])
    assert target.name == "onnxruntime"


def test_malformed_toml(tmp_path):
    msg = _load_error(tmp_path, """
        [targets.t]
        backend = "onnxruntime
    """)
    assert "not valid TOML" in msg and "line 3" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _load_error(tmp_path, """
        [target.t]
        backend = "onnxruntime"
    """)
    assert "top level" in msg and "unknown key 'target'" in msg and "targets" in msg


def test_unknown_device_key(tmp_path):
    msg = _load_error(tmp_path, """
        [devices.phone]
        kind = "cpu"
        adress = "x:1"
    """)
    assert "[devices.phone]" in msg and "unknown key 'adress'" in msg


def test_wrong_value_type_in_a_table(tmp_path):
    msg = _load_error(tmp_path, """
        [defaults]
        runs = "many"
    """)
    assert "[defaults]" in msg and "key 'runs'" in msg and "expected int" in msg


def test_calibration_method_and_percentile(tmp_path):
    msg = _load_error(tmp_path, '[calibration]\nmethod = "kl"\n')
    assert "[calibration]" in msg and "key 'method'" in msg and "'kl'" in msg
    msg = _load_error(tmp_path, "[calibration]\npercentile = 101\n")
    assert "[calibration]" in msg and "key 'percentile'" in msg
    msg = _load_error(tmp_path, "[calibration]\nsamples = 0\n")
    assert "[calibration]" in msg and "key 'samples'" in msg and ">= 1" in msg
    msg = _load_error(tmp_path, "[calibration]\nbatch_size = -1\n")
    assert "[calibration]" in msg and "key 'batch_size'" in msg and ">= 1" in msg
    msg = _load_error(tmp_path, "[calibration]\nsample = 5\n")
    assert "[calibration]" in msg and "unknown key 'sample'" in msg


def test_preprocess_table(tmp_path):
    msg = _load_error(tmp_path, '[preprocess]\nlayout = "CHW"\n')
    assert "[preprocess]" in msg and "key 'layout'" in msg
    msg = _load_error(tmp_path, "[preprocess]\nstd = [0.5, 0.0, 0.5]\n")
    assert "[preprocess]" in msg and "key 'std'" in msg
    tf = load_targets(_write(tmp_path, "[preprocess]\nresize = 256\ncrop = 224\nmean = [0.5, 0.5, 0.5]\n"))
    assert tf.preprocess.resize == 256 and tf.preprocess.crop == 224 and tf.preprocess.mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------ targets
def test_unknown_target_key(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        batch_size = [1]
    """)
    assert "[targets.t]" in msg and "unknown key 'batch_size'" in msg and "batch_sizes" in msg


def test_unknown_option_key(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        [targets.t.options]
        thread = 2
    """)
    assert "[targets.t.options]" in msg and "unknown key 'thread'" in msg and "threads" in msg


def test_bad_option_type(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        [targets.t.options]
        threads = "two"
    """)
    assert "[targets.t.options]" in msg and "key 'threads'" in msg and "expected int" in msg


def test_bool_is_not_an_int_option(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        options = { threads = true }
    """)
    assert "[targets.t.options]" in msg and "key 'threads'" in msg


def test_bad_option_choice(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        [targets.t.options]
        graph_optimization_level = "max"
    """)
    assert "[targets.t.options]" in msg and "key 'graph_optimization_level'" in msg
    assert "'max'" in msg and "extended" in msg


def test_unknown_threshold_key(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        [targets.t.thresholds]
        min_speed = 3
    """)
    assert "[targets.t.thresholds]" in msg and "unknown key 'min_speed'" in msg and "min_/max_cosine" in msg


def test_backend_metric_threshold_needs_that_backend(tmp_path, ort_registry):
    """min_int8_fraction belongs to backends that report it; onnxruntime does not."""
    if "int8_fraction" in ort_registry.backends["onnxruntime"].metrics:
        pytest.skip("the onnxruntime backend reports int8_fraction")
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        thresholds = { min_int8_fraction = 0.9 }
    """)
    assert "[targets.t.thresholds]" in msg and "'min_int8_fraction'" in msg


def test_threshold_must_be_a_number(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        thresholds = { min_cosine = "high" }
    """)
    assert "[targets.t.thresholds]" in msg and "key 'min_cosine'" in msg and "number" in msg


def test_unknown_device(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [devices.phone]
        kind = "cpu"
        [targets.t]
        backend = "onnxruntime"
        device = "moon"
    """)
    assert "[targets.t]" in msg and "key 'device'" in msg and "'moon'" in msg and "phone" in msg


def test_unknown_backend(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "tensorflow-magic"
    """)
    assert "[targets.t]" in msg and "key 'backend'" in msg and "'tensorflow-magic'" in msg and "onnxruntime" in msg


def test_missing_backend(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        device = "local"
    """)
    assert "[targets.t]" in msg and "key 'backend'" in msg and "missing" in msg


def test_unknown_target_name_on_resolve(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.fast-cpu]
        backend = "onnxruntime"
    """, name="fastcpu")
    assert "unknown target 'fastcpu'" in msg and "fast-cpu" in msg and "onnxruntime" in msg


def test_bare_backend_name_resolves(tmp_path, ort_registry):
    tf = load_targets(_write(tmp_path, """
        [defaults]
        batch_sizes = [1, 4]
        runs = 7
    """))
    (target,) = ort_registry.resolve(tf, ["onnxruntime"])
    backend = ort_registry.backends["onnxruntime"]
    assert target.name == "onnxruntime" and target.backend == "onnxruntime"
    assert target.device == Device("local", "cpu", "this machine")
    assert dict(target.options) == {k: o.default for k, o in backend.options.items()}
    assert target.batch_sizes == (1, 4) and target.runs == 7 and target.warmup == 10


def test_entry_wins_over_backend_name_and_options_merge_with_defaults(tmp_path, ort_registry):
    tf = load_targets(_write(tmp_path, """
        [devices.box]
        kind = "cpu"
        [targets.onnxruntime]
        backend = "onnxruntime"
        device = "box"
        batch_sizes = [2]
        options = { threads = 3 }
    """))
    (target,) = ort_registry.resolve(tf, ["onnxruntime"])
    assert target.device.name == "box" and target.batch_sizes == (2,)
    assert target.options["threads"] == 3
    assert target.options["graph_optimization_level"] == ort_registry.backends["onnxruntime"].options[
        "graph_optimization_level"].default


@pytest.mark.parametrize("value", ["[]", "[0]", "[1, -2]", "[1.5]", "[true]", '["1"]'])
def test_batch_sizes_validation(tmp_path, ort_registry, value):
    msg = _target_error(tmp_path, ort_registry, f"""
        [targets.t]
        backend = "onnxruntime"
        batch_sizes = {value}
    """)
    assert "[targets.t]" in msg and "key 'batch_sizes'" in msg and "positive integers" in msg


def test_batch_sizes_not_a_list(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, """
        [targets.t]
        backend = "onnxruntime"
        batch_sizes = 8
    """)
    assert "[targets.t]" in msg and "key 'batch_sizes'" in msg and "expected list" in msg


def test_warmup_and_runs_bounds(tmp_path, ort_registry):
    msg = _target_error(tmp_path, ort_registry, '[targets.t]\nbackend = "onnxruntime"\nwarmup = -1\n')
    assert "[targets.t]" in msg and "key 'warmup'" in msg
    msg = _target_error(tmp_path, ort_registry, '[targets.t]\nbackend = "onnxruntime"\nruns = 0\n')
    assert "[targets.t]" in msg and "key 'runs'" in msg
