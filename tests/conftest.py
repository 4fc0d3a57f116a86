"""Shared fixtures: a digits-trained CNN with its data files, and registries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class DigitsFiles:
    model: Path  # FP32 ONNX, dynamic batch, input "x" [N, 1, 8, 8]
    calib: Path  # .npz: x (256 training images)
    eval: Path  # .npz: x, labels (held-out split)
    fp32_accuracy: float


@pytest.fixture(autouse=True, scope="session")
def _private_history(tmp_path_factory):
    """CLI builds and matrices record into the results history: a test run never writes
    the user's."""
    import os

    saved = {k: os.environ.get(k) for k in ("DEPLOYKIT_DB",)}
    os.environ["DEPLOYKIT_DB"] = str(tmp_path_factory.mktemp("history") / "history.sqlite")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> DigitsFiles:
    torch = pytest.importorskip("torch", reason="training the test CNN needs torch (pip install torch==2.13.0)")
    from deploykit.testing import export_kind, models

    root = tmp_path_factory.mktemp("digits")
    _, module = export_kind("digits", root / "digits.onnx")  # trained once per process, shared
    data = models.digits()
    with torch.no_grad():
        acc = float((module(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    np.savez(root / "calib.npz", x=data.x_train[:256])
    np.savez(root / "eval.npz", x=data.x_test, labels=data.y_test)
    return DigitsFiles(root / "digits.onnx", root / "calib.npz", root / "eval.npz", acc)


@pytest.fixture()
def ort_registry():
    """A registry holding only the onnxruntime backend, loaded like any plugin module."""
    import deploykit_onnxruntime
    from deploykit.plugins import PluginInfo, Registry

    registry = Registry()
    registry.add_plugin(deploykit_onnxruntime, PluginInfo("onnxruntime", "deploykit_onnxruntime"))
    return registry
