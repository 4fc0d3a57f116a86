"""deploykit's TensorRT backend plugin. Importing it never imports tensorrt."""

from typing import Callable

import deploykit
from deploykit_tensorrt.backend import TensorRTBackend

__all__ = ["TensorRTBackend"]


@deploykit.hookimpl
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    register(TensorRTBackend)
