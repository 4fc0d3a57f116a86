"""The plugin system: registration, errors that name the plugin, entry-point discovery of a
backend installed from a separate distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deploykit
from deploykit.backend import Availability, Backend
from deploykit.errors import ConfigError, PluginError
from deploykit.plugins import PluginInfo, Registry


class _Fake(Backend):
    name = "fake"
    description = "a fake backend for plugin-system tests"

    def probe(self, target):
        return Availability.missing("fake backends never run", "nothing to install")


class _FakePlugin:
    @deploykit.hookimpl
    def deploykit_register_backends(self, register):
        register(_Fake)


def test_plugin_registers_backend_and_unregisters():
    registry = Registry()
    registry.add_plugin(_FakePlugin(), PluginInfo("fake-plugin", "tests"))
    assert registry.names() == ["fake"]
    assert registry.owner("fake") == "fake-plugin"
    assert isinstance(registry.get("fake"), _Fake)
    registry.remove_plugin("fake-plugin")
    assert list(registry.names()) == []
    with pytest.raises(ConfigError, match="unknown backend 'fake'"):
        registry.get("fake")


def test_duplicate_backend_name_names_both_plugins():
    registry = Registry()
    registry.add_plugin(_FakePlugin(), PluginInfo("first", "tests"))
    with pytest.raises(PluginError, match="registered twice: by plugin 'first' and by plugin 'second'"):
        registry.add_plugin(_FakePlugin(), PluginInfo("second", "tests"))


def test_registering_a_non_backend_is_refused():
    class Bad:
        @deploykit.hookimpl
        def deploykit_register_backends(self, register):
            register(object)

    with pytest.raises(PluginError, match="plugin 'bad' registered .* not a deploykit.backend.Backend"):
        Registry().add_plugin(Bad(), PluginInfo("bad", "tests"))


def test_misspelt_hook_fails_at_load():
    class Typo:
        @deploykit.hookimpl
        def deploykit_register_backend(self, register):  # missing 's'
            pass

    with pytest.raises(PluginError, match="plugin 'typo' is invalid"):
        Registry().add_plugin(Typo(), PluginInfo("typo", "tests"))


def _dist(site: Path, dist: str, module: str, source: str) -> None:
    """A minimal installed distribution (dist-info with an entry point) on a path entry."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[deploykit]\n{module} = {module}\n")


def test_plugin_import_error_names_the_plugin(tmp_path, monkeypatch):
    _dist(tmp_path, "deploykit-broken", "deploykit_broken", "import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    with pytest.raises(PluginError) as err:
        registry.load_entry_points()
    msg = str(err.value)
    assert "plugin 'deploykit_broken'" in msg and "deploykit-broken" in msg and "no_such_module_anywhere" in msg
    monkeypatch.setenv("DEPLOYKIT_DISABLE_PLUGINS", "deploykit_broken")
    Registry().load_entry_points()  # disabling it by name lets everything else load


THIRD_PARTY = '''
"""A third-party backend: runs the canonical model unchanged in onnxruntime, single-threaded,
with graph optimizations off (exactly the canonical Q/DQ semantics)."""
import shutil
import deploykit
from deploykit.backend import Artifact, Availability, Backend, Option, Runner
from deploykit.fileio import atomic_output


class EchoBackend(Backend):
    name = "echo"
    description = "third-party test backend"
    artifact_suffix = ".onnx"
    options = {"threads": Option(int, 1, "onnxruntime threads")}

    def probe(self, target):
        return Availability.ready(echo="1.0")

    def lower(self, canonical, target, dest):
        with atomic_output(dest) as tmp:
            shutil.copyfile(canonical.path, tmp)
        return Artifact(self.name, dest, (dest,))

    def load(self, artifact, target):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = target.options["threads"]
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(artifact.path), opts, providers=["CPUExecutionProvider"])

        class EchoRunner(Runner):
            def run(self, feeds):
                return session.run(None, dict(feeds))
        return EchoRunner()


@deploykit.hookimpl
def deploykit_register_backends(register):
    register(EchoBackend)
'''


@pytest.mark.slow
def test_third_party_distribution_is_discovered_and_builds(tmp_path, digits_files):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "deploykit_echo.py").write_text(THIRD_PARTY)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "deploykit-echo"
        version = "1.0"
        [tool.setuptools]
        py-modules = ["deploykit_echo"]
        [project.entry-points.deploykit]
        echo = "deploykit_echo"
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "deploykit.cli"]
    listed = subprocess.run(cli + ["plugins", "--json"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout) if p["name"] == "echo")
    assert plugin["distribution"] == "deploykit-echo" and plugin["backends"] == ["echo"]
    out = tmp_path / "out"
    run = subprocess.run(cli + ["build", str(digits_files.model), "--target", "echo", "--calib", str(digits_files.calib),
                                "--eval", str(digits_files.eval), "--out", str(out), "--method", "minmax", "--json",
                                "--no-baseline"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    manifest = json.loads(run.stdout)
    (target,) = manifest["targets"]
    assert target["backend"] == "echo" and target["status"] == "ok"
    fidelity = next(c for c in target["checks"] if c["name"] == "fidelity_max_abs")
    assert fidelity["value"] == 0.0  # the echo backend runs the canonical model itself
    assert (out / "echo" / "echo.onnx").is_file()
