"""The test suite's on-disk cache of slow, deterministic test INPUTS (ONNX exports of torch test
models): under ``$DEPLOYKIT_CACHE`` (default ``~/.cache/deploykit``), keyed by everything the
bytes are made from, written through a temporary file and a rename (two pytest-xdist workers
making the same entry is harmless). Change anything in a key and the input is made again.

Only what a test starts from is cached, never what it asserts about: the lowering, the
quantizer and the checks under test always run."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

#: the packages an ONNX export of a torch module depends on (their code is not hashed: their version is)
EXPORT_PACKAGES = ("torch", "onnx", "onnxscript", "transformers", "numpy")


def root() -> Path:
    return Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit"))


def versions(packages: Iterable[str]) -> bytes:
    out = []
    for package in packages:
        try:
            out.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            out.append(f"{package}=none")
    return repr(out).encode()


def cached_file(folder: str, stem: str, key: Iterable[bytes], suffix: str, make: Callable[[Path], Any]) -> Path:
    """The cache entry ``<root>/<folder>/<stem>-<hash of key><suffix>``; on a miss ``make(tmp)``
    writes it to a temporary path that is then renamed into place (atomic)."""
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    entry = root() / folder / f"{stem}-{digest}{suffix}"
    if entry.is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.stem}.", suffix=suffix, dir=entry.parent)
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, entry)  # atomic: a concurrent identical entry simply wins or loses
    finally:
        Path(tmp).unlink(missing_ok=True)
    return entry


def _tensor_key(name: str, value: Any) -> bytes:
    a = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else np.ascontiguousarray(value)
    return f"{name}:{a.dtype}:{a.shape}:".encode() + a.tobytes()


def _definition_sources(module: Any) -> list[bytes] | None:
    """The source files defining the module's own classes and every submodule's (torch's and
    transformers' classes are covered by their versions); None if a file cannot be read."""
    out: dict[str, bytes] = {}
    for sub in module.modules():
        for cls in type(sub).__mro__:
            top = cls.__module__.split(".")[0]
            if top in ("builtins", "torch", "transformers"):
                continue
            try:
                path = inspect.getfile(cls)
                out.setdefault(path, Path(path).read_bytes())
            except (TypeError, OSError):
                return None
    return [out[p] for p in sorted(out)]


def export_onnx(module: Any, example: tuple[Any, ...], path: Path | str, input_names: list[str] | None = None,
                dynamic_batch: bool = True, dynamic_sequence: bool = False) -> Path:
    """:func:`deploykit.testing.models.export_onnx` (the dynamo exporter, what ``deploykit
    build`` uses), the bytes kept on this machine: keyed by the module's class definitions (the
    source files that define them), its structure, its weights and buffers by content, the
    example inputs (shapes, types, values), the export arguments, the exporter wrapper's and
    this module's source, and the versions of torch, onnx, onnxscript, transformers and numpy.
    A module whose defining source cannot be read is exported every time."""
    from deploykit import model as model_module
    from deploykit.testing import models

    def make(out: Path) -> None:
        models.export_onnx(module, example, out, input_names, dynamic_batch, dynamic_sequence)

    sources = _definition_sources(module)
    if sources is None:
        make(Path(path))
        return Path(path)
    key = [*sources, repr(module).encode(), repr((module.training, input_names, dynamic_batch, dynamic_sequence)).encode()]
    key += [_tensor_key(name, t) for name, t in sorted(module.state_dict().items())]
    key += [_tensor_key(f"input{i}", x) for i, x in enumerate(example)]
    key += [Path(m.__file__).read_bytes() for m in (model_module, models, sys.modules[__name__]) if m.__file__]
    key.append(versions(EXPORT_PACKAGES))
    entry = cached_file("exports", type(module).__name__.lower(), key, ".onnx", make)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(entry.read_bytes())
    return Path(path)
