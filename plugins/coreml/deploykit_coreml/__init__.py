"""Core ML backend for deploykit: canonical QDQ ONNX -> ML program (.mlpackage) built op by op with
coremltools' MIL builder (coremltools has no ONNX front end), keeping the canonical int8 weights
and every scale; a read-back check compares them with the canonical model on any OS. Prediction
needs macOS.

Importing this module never imports coremltools: the SDK is loaded inside the backend's methods.
"""

from __future__ import annotations

from typing import Callable

import deploykit
from deploykit_coreml.backend import CoreMLBackend

__all__ = ["CoreMLBackend"]


@deploykit.hookimpl
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    register(CoreMLBackend)
