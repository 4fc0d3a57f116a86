"""deploykit: one canonical QDQ INT8 ONNX model, lowered to many targets with its scales kept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from deploykit._version import __version__
from deploykit.hookspecs import hookimpl

if TYPE_CHECKING:  # the build pipeline is imported when first used: `import deploykit` stays light
    from deploykit.pipeline import BuildResult

__all__ = ["hookimpl", "__version__", "build"]


def build(model: Any, targets: str | Sequence[str], **options: Any) -> BuildResult:
    """Python API for ``deploykit build``: ``model`` is an .onnx path or a torch.nn.Module
    (then pass ``example_inputs=(tensor, ...)``); ``options`` are
    :class:`deploykit.pipeline.BuildOptions` fields (``calib``, ``eval``, ``method``, ``out_dir``, ...).
    Returns a :class:`deploykit.pipeline.BuildResult` (``.manifest``, ``.targets``, ``.ok``)."""
    from deploykit.pipeline import BuildOptions, build as _build

    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    return _build(model, BuildOptions(targets=names, **options))
