"""deploykit: one canonical QDQ INT8 ONNX model, lowered to many targets with its scales kept."""

from deploykit._version import __version__
from deploykit.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__", "build"]


def build(model, targets, **options):
    """Python API for ``deploykit build``: ``model`` is an .onnx path or a torch.nn.Module
    (then pass ``example_inputs=(tensor, ...)``); ``options`` are
    :class:`deploykit.pipeline.BuildOptions` fields (``calib``, ``eval``, ``method``, ``out_dir``, ...).
    Returns a :class:`deploykit.pipeline.BuildResult` (``.manifest``, ``.targets``, ``.ok``)."""
    from deploykit.pipeline import BuildOptions
    from deploykit.pipeline import build as _build

    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return _build(model, BuildOptions(targets=list(targets), **options))
