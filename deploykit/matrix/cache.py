"""Content-addressed cache of canonical models and lowered artifacts.

A canonical model's key hashes the FP32 model's bytes, the calibration data's bytes, the
method and sample count and the toolchain versions; an artifact's key hashes its canonical
key, the backend, the target's options and the toolchain versions. A key that exists is
reused, never rebuilt; a new one is built in a staging folder and renamed into place, so an
interrupted build leaves no half-written entry.

Where: ``--cache DIR``, else ``$DEPLOYKIT_CACHE``, else ``~/.cache/deploykit`` (``$XDG_CACHE_HOME``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from deploykit._version import __version__
from deploykit.backend import Artifact, CheckResult

CACHE_ENV = "DEPLOYKIT_CACHE"
_TOOLCHAIN = ("numpy", "onnx", "onnxruntime", "openvino", "tensorflow", "ai-edge-litert", "coremltools",
              "tensorrt", "torch")


def default_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploykit"


def toolchain_versions() -> dict[str, str]:
    """deploykit, Python and every toolchain package installed here."""
    import platform

    out = {"deploykit": __version__, "python": platform.python_version()}
    for dist in _TOOLCHAIN:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Cache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_dir()

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The folder of ``kind/key``, calling ``build(staging)`` first when it is missing.
        Returns (folder, built_now)."""
        final = self.entry(kind, key)
        if (final / ".complete").is_file():
            return final, False
        staging = final.with_name(f".{key}.staging-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            build(staging)
            (staging / ".complete").write_text("ok", encoding="utf-8")
            if final.exists():  # an incomplete leftover (never a complete entry: checked above)
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final, True


def save_artifact(artifact: Artifact, folder: Path) -> None:
    """artifact.json beside the lowered files, paths relative to ``folder``."""
    def rel(p: Path) -> str:
        return str(Path(p).resolve().relative_to(folder.resolve()))

    raw = {"backend": artifact.backend, "path": rel(artifact.path), "files": [rel(f) for f in artifact.files],
           "metadata": json.loads(json.dumps(artifact.metadata, default=str)),
           "checks": [c.to_json() for c in artifact.checks]}
    (folder / "artifact.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")


def load_artifact(folder: Path) -> Artifact:
    raw = json.loads((folder / "artifact.json").read_text(encoding="utf-8"))
    checks = tuple(CheckResult(c["name"], c["status"], c.get("value"), c.get("threshold"), c.get("bound"),
                               c.get("message", ""), c.get("details") or {}) for c in raw["checks"])
    return Artifact(raw["backend"], folder / raw["path"], tuple(folder / f for f in raw["files"]),
                    raw["metadata"], checks)
