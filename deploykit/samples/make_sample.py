"""Regenerate the bundled samples (needs torch and scikit-learn; deterministic for the seed).

    python -m deploykit.samples.make_sample            # the tiny 8x8 digits CNN
    python -m deploykit.samples.make_sample digits32   # the real-sized 32x32 CNN

digits: a ResNet-style CNN on scikit-learn's 8x8 digits (digits_cnn.onnx, digits_calib.npz with
256 training images, digits_eval.npz with the held-out split and labels). So small that per-call
overhead dominates: INT8 is not faster than FP32 on it.

digits32: six 3x3 convolutions on the same digits upsampled to 32x32 (~40 M multiply-adds per
image; digits32_cnn.onnx, digits32_calib.npz, digits32_eval.npz). Real-sized enough that INT8
is faster than FP32 on every CPU runtime: the sample of the README's matrix (matrix.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from deploykit.testing import models

HERE = Path(__file__).parent


def main(which: str = "digits") -> None:
    import torch

    if which == "digits32":
        module, data, acc = models.train_digits32_cnn(seed=0)
        stem = "digits32"
    elif which == "digits":
        module, data, acc = models.train_digits_cnn(seed=0)
        stem = "digits"
    else:
        raise SystemExit(f"unknown sample {which!r}: digits or digits32")
    models.export_onnx(module, (torch.from_numpy(data.x_train[:2]),), HERE / f"{stem}_cnn.onnx", ["x"])
    np.savez_compressed(HERE / f"{stem}_calib.npz", x=data.x_train[:256])
    np.savez_compressed(HERE / f"{stem}_eval.npz", x=data.x_test, labels=data.y_test)
    print(f"{stem} CNN: FP32 test accuracy {acc:.4f}; wrote {HERE}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
