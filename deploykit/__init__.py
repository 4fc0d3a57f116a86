"""deploykit: one canonical QDQ INT8 ONNX model, lowered to many targets with its scales kept."""

from deploykit.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
