"""The Core ML tests import coremltools as the plugin does: through deploykit_coreml.sdk, without
its TensorFlow/torch/torchao front ends (a plain ``import coremltools`` first would load them
all, ~16 s of CPU). Imported by the first test of each file, not at collection: every
pytest-xdist worker collects every file, and coremltools with sympy costs ~3 s to import."""

from __future__ import annotations

import pytest

from deploykit.errors import BackendUnavailable


@pytest.fixture(autouse=True, scope="module")
def _coremltools_as_the_plugin_imports_it() -> None:
    from deploykit_coreml import sdk

    try:
        sdk.coremltools()
    except BackendUnavailable as exc:
        pytest.skip(f"the Core ML backend needs coremltools: {exc}")
