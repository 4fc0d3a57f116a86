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


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> DigitsFiles:
    torch = pytest.importorskip("torch", reason="training the test CNN needs torch (pip install torch==2.13.0)")
    from deploykit.testing import models

    root = tmp_path_factory.mktemp("digits")
    module, data, acc = models.train_digits_cnn(seconds=6.0, seed=0)
    models.export_onnx(module, (torch.from_numpy(data.x_train[:2]),), root / "digits.onnx", ["x"])
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
