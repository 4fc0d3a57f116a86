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


def _export_cache(kind: str, seed: int) -> Path:
    """Where the ONNX export of a test model kind lives on this machine. torch's exporter takes
    seconds to a minute per model and the suite exports every kind in every process, so the
    exported bytes are kept, keyed by everything they are made from: the source of the model
    definitions, of the exporter wrapper and of this module, and the versions of the packages
    that build or export the weights. Change any of them and the export runs again."""
    import hashlib
    import os
    from importlib import metadata

    from deploykit import model as model_module
    from deploykit.testing import models

    sources = [Path(m.__file__).read_bytes() for m in (models, model_module) if m.__file__]
    sources.append(Path(__file__).read_bytes())
    versions = []
    for package in ("torch", "onnx", "onnxscript", "transformers", "numpy", "scikit-learn"):
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    key = hashlib.sha256(b"\0".join([*sources, repr((kind, seed, versions)).encode()])).hexdigest()[:16]
    root = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit"))
    return root / "exports" / f"{kind}-{seed}-{key}.onnx"


def exported_onnx(kind: str, path: Path | str, seed: int = 0) -> Path:
    """Write the ONNX export of a test model kind (dynamic batch) to ``path``: exported once
    per machine (:func:`_export_cache`), copied after that."""
    import os
    import tempfile

    if (kind, seed) in _EXPORTED:
        Path(path).write_bytes(_EXPORTED[(kind, seed)][0])
        return Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    cache = _export_cache(kind, seed)
    if not cache.is_file():
        import torch

        from deploykit.testing import models

        module = _module(kind, seed)
        feeds = eval_feeds(kind, 2, seed=seed)
        example = tuple(torch.from_numpy(v) for v in feeds.values())
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.stem}.", suffix=".onnx", dir=cache.parent)
        os.close(fd)
        try:
            models.export_onnx(module, example, tmp, list(feeds), dynamic_sequence=kind == "bert")
            os.replace(tmp, cache)  # atomic: a concurrent identical export simply wins or loses
        finally:
            Path(tmp).unlink(missing_ok=True)
    Path(path).write_bytes(cache.read_bytes())
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
