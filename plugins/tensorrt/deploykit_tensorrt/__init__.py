"""deploykit's TensorRT backend plugin. Importing it never imports tensorrt."""

import deploykit
from deploykit_tensorrt.backend import TensorRTBackend

__all__ = ["TensorRTBackend"]


@deploykit.hookimpl
def deploykit_register_backends(register) -> None:
    register(TensorRTBackend)
