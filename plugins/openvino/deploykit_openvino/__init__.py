"""OpenVINO backend for deploykit: canonical QDQ ONNX -> OpenVINO IR (.xml + .bin), run on
OpenVINO CPU / GPU / NPU, with a check that the IR keeps the canonical scales and an audit of
the precision each compute layer really runs in.

Importing this module never imports openvino: the SDK is loaded inside the backend's methods.
"""

from __future__ import annotations

from typing import Callable

import deploykit
from deploykit_openvino.backend import OpenVINOBackend

__all__ = ["OpenVINOBackend"]


@deploykit.hookimpl
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    register(OpenVINOBackend)
