"""Targets with defaults and small canonical models, for plugin authors and deploykit's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backend import Backend
from deploykit.canonical import CanonicalModel
from deploykit.targets import Device, Target


def skip_unless_installed(*modules: str, reason: str = "") -> None:
    """Skip the calling test module unless every one of ``modules`` is installed. Found, not
    imported (``pytest.importorskip`` imports): pytest-xdist workers each collect every test
    file, so a module-level import costs every worker, used or not (TensorFlow about 11 s of
    CPU, torchao 5 s, torch 3 s). The tests import what they use where they use it."""
    import importlib.util

    import pytest

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed" + (f": {reason}" if reason else ""), allow_module_level=True)


#: the built-in backend plugins (their packages)
PLUGIN_PACKAGES = ("deploykit_onnxruntime", "deploykit_openvino", "deploykit_tflite", "deploykit_coreml",
                   "deploykit_tensorrt")

_IMPORTED_BY: dict[str, frozenset[str]] = {}


def imported_by_plugins() -> dict[str, frozenset[str]]:
    """What importing each built-in plugin package loads: the plugins imported one after the
    other in one fresh Python process (PYTHONPATH: this process's sys.path; nothing else from
    the environment); per plugin, the top-level names in ``sys.modules`` right after its import
    (the earlier plugins' included). A plugin imports its vendor SDK only when a target uses it:
    each plugin's tests check its SDK is not there. One process for all of them, once per test
    process: each fresh Python pays ~1.5 s of CPU importing onnx."""
    import json
    import os
    import subprocess
    import sys

    if not _IMPORTED_BY:
        code = ("import importlib, json, sys\nout = {}\n"
                f"for name in {PLUGIN_PACKAGES!r}:\n"
                "    importlib.import_module(name)\n"
                "    out[name] = sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None})\n"
                "print(json.dumps(out))\n")
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"importing the plugins failed:\n{proc.stderr}")
        _IMPORTED_BY.update({name: frozenset(mods) for name, mods in json.loads(proc.stdout).items()})
    return dict(_IMPORTED_BY)


def make_target(backend: type[Backend], name: str | None = None, device: str = "local",
                batch_sizes: tuple[int, ...] = (1,), thresholds: dict[str, float] | None = None,
                warmup: int = 2, runs: int = 10, **options: Any) -> Target:
    """A Target for ``backend`` with its option defaults, overridden by ``options``."""
    unknown = set(options) - set(backend.options)
    if unknown:
        raise KeyError(f"{backend.name} has no options {sorted(unknown)}")
    opts = {k: o.default for k, o in backend.options.items()}
    opts.update(options)
    return Target(name or backend.name, backend.name, Device(device, "cpu"), opts, dict(thresholds or {}),
                  tuple(batch_sizes), warmup, runs)


# ---------------------------------------------------------------------------------------
# small canonical models
# ---------------------------------------------------------------------------------------
#: kind -> (builder, example input shapes); "digits" is the trained ResNet-style CNN
#: "bert" is transformers' BertModel, small, exported with a dynamic batch AND sequence
KINDS = ("resnet", "mobilenet", "encoder", "digits", "bert")


def eval_feeds(kind: str, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for a test model kind (digits: held-out digits images)."""
    from deploykit.testing import models

    if kind == "encoder":
        return models.encoder_inputs(n, seed=seed)
    if kind == "bert":
        return models.bert_inputs(n, seed=seed)
    if kind == "digits":
        return {"x": models.digits().x_test[:n]}
    rng = np.random.default_rng(seed)
    shape = (n, 1, 8, 8) if kind == "resnet" else (n, 3, 32, 32)
    return {"x": rng.random(shape, dtype=np.float32)}


_EXPORTED: dict[tuple[str, int], tuple[bytes, Any]] = {}  # (kind, seed) -> (onnx bytes, module): train and export once per process


def _module(kind: str, seed: int) -> Any:
    """The test model ``kind`` as a torch module in eval mode: the same weights for a seed."""
    import torch

    from deploykit.testing import models

    torch.manual_seed(seed)
    if kind == "digits":
        module, _, _ = models.train_digits_cnn(seed=seed)
    elif kind == "resnet":
        module = models.resnet_cnn()
    elif kind == "mobilenet":
        module = models.mobilenet_cnn()
    elif kind == "encoder":
        module = models.tiny_encoder()
    elif kind == "bert":
        module = models.bert_encoder()
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    module.eval()
    return module


def exported_onnx(kind: str, path: Path | str, seed: int = 0, exporter: str = "dynamo") -> Path:
    """Write the ONNX export of a test model kind (dynamic batch; ``exporter``: "dynamo", what
    ``deploykit build`` uses, or "legacy", torch's TorchScript exporter with batch and sequence
    dynamic, as older pipelines export encoders) to ``path``.

    torch's exporter takes seconds to a minute per model and the suite exports every kind in
    every process, so the bytes are kept on this machine (:mod:`deploykit.testing.cache`),
    keyed by everything they are made from: the source of the model definitions, of the
    exporter wrappers and of this module, and the versions of the packages that build or
    export the weights. Change any of them and the export runs again."""
    from deploykit import model as model_module
    from deploykit.testing import cache, models

    if (kind, seed) in _EXPORTED and exporter == "dynamo":
        Path(path).write_bytes(_EXPORTED[(kind, seed)][0])
        return Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"unknown exporter {exporter!r}; 'dynamo' or 'legacy'")

    def make(out: Path) -> None:
        import torch

        module = _module(kind, seed)
        feeds = eval_feeds(kind, 2, seed=seed)
        example = tuple(torch.from_numpy(v) for v in feeds.values())
        if exporter == "legacy":
            models.export_legacy(module, example, out, list(feeds))
        else:
            models.export_onnx(module, example, out, list(feeds), dynamic_sequence=kind == "bert")

    sources = [Path(m.__file__).read_bytes() for m in (models, model_module, cache) if m.__file__]
    sources.append(Path(__file__).read_bytes())
    key = [*sources, repr((kind, seed, exporter)).encode(), cache.versions((*cache.EXPORT_PACKAGES, "scikit-learn"))]
    stem = f"{kind}-{seed}" if exporter == "dynamo" else f"{kind}-{seed}-{exporter}"
    entry = cache.cached_file("exports", stem, key, ".onnx", make)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(entry.read_bytes())
    return Path(path)


def export_kind(kind: str, path: Path | str, seed: int = 0) -> tuple[Path | str, Any]:
    """Export a test model kind to ONNX (dynamic batch). Returns (path, torch module)."""
    if (kind, seed) in _EXPORTED:
        blob, module = _EXPORTED[(kind, seed)]
        Path(path).write_bytes(blob)
        return path, module
    exported_onnx(kind, path, seed)
    module = _module(kind, seed)
    _EXPORTED[(kind, seed)] = (Path(path).read_bytes(), module)
    return path, module


def canonical_from_onnx(src: Path | str, calib: dict[str, np.ndarray], workdir: Path | str, stem: str,
                        method: str = "minmax", activations: str = "symmetric",
                        keep_float: tuple[str, ...] = (), recipe: str | None = None) -> CanonicalModel:
    """Normalise an FP32 .onnx, calibrate it on ``calib`` (one dict of arrays) and write
    ``<stem>.qdq.onnx`` and friends under ``workdir`` (``recipe``: as ``quantize``'s, default
    none). Returns the CanonicalModel."""
    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical

    fp32 = model.normalise(model.load_onnx(src), str(src))
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    assert source is not None
    result = quantize(fp32, source, method, source_hash=model.model_hash(fp32), activations=activations,
                      keep_float=keep_float, recipe=recipe)
    return write_canonical(result, fp32, Path(workdir), stem)


def make_canonical(kind: str, workdir: Path | str, method: str = "minmax", samples: int = 64,
                   activations: str = "symmetric", keep_float: tuple[str, ...] = ()) -> CanonicalModel:
    """Export a test model, calibrate it on real-looking data and write its canonical model
    (``activations``: the activation profile; ``keep_float``: float-island patterns).

    Returns a :class:`deploykit.canonical.CanonicalModel` (files under ``workdir``).
    """
    from deploykit.testing import models

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = exported_onnx(kind, workdir / f"{kind}.onnx")
    calib = {"x": models.digits().x_train[:samples]} if kind == "digits" else eval_feeds(kind, samples, seed=0)
    return canonical_from_onnx(src, calib, workdir, kind, method, activations, keep_float)
