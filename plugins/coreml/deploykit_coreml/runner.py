"""Running an .mlpackage with Core ML (macOS only).

The runner needs nothing but the package path and the compute units: the mapping from the
canonical model's input names and dtypes to the package's inputs travels inside the package
(user-defined metadata ``deploykit.inputs``), so a package built on Linux runs on any Mac.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deploykit.backend import Runner, check_feeds
from deploykit.errors import BackendUnavailable
from deploykit_coreml import sdk

META_INPUTS = "deploykit.inputs"
MACOS_ONLY = "needs macOS: Core ML prediction has no Linux runtime"


class CoreMLRunner(Runner):
    """``run(feeds)`` with NCHW numpy feeds keyed by canonical input names; outputs in canonical order."""

    model: Any  # coremltools.models.MLModel
    inputs: list[tuple[str, ...]]  # (Core ML name, canonical name, "fp32" | "int32")
    outputs: list[str]

    def __init__(self, package: Path | str, compute_units: str = "ALL") -> None:
        if sys.platform != "darwin":
            raise BackendUnavailable(f"cannot run {package}: {MACOS_ONLY}")
        ct = sdk.coremltools()
        self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))
        spec = self.model.get_spec()
        meta = dict(spec.description.metadata.userDefined)
        if META_INPUTS in meta:
            # [[Core ML name, canonical name, "fp32" | "int32"], ...]
            self.inputs = [tuple(i) for i in json.loads(meta[META_INPUTS])]
        else:  # a package deploykit did not build: names as they are
            from coremltools.proto import FeatureTypes_pb2

            int32 = FeatureTypes_pb2.ArrayFeatureType.INT32
            self.inputs = [(i.name, i.name, "int32" if i.type.multiArrayType.dataType == int32 else "fp32")
                           for i in spec.description.input]
        self.outputs = [o.name for o in spec.description.output]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds([canonical for _, canonical, _ in self.inputs], feeds)
        # Core ML has no int64 inputs: token ids and masks go in as int32
        data = {name: np.ascontiguousarray(feeds[canonical], np.float32 if dtype == "fp32" else np.int32)
                for name, canonical, dtype in self.inputs}
        result = self.model.predict(data)
        return [np.asarray(result[name]) for name in self.outputs]
