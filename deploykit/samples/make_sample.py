"""Regenerate the bundled sample: a ResNet-style CNN trained on scikit-learn's digits.

    python -m deploykit.samples.make_sample

Writes digits_cnn.onnx, digits_calib.npz (256 training images) and digits_eval.npz (the
held-out split with labels) beside this file. Needs torch and scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.testing import models

HERE = Path(__file__).parent


def main() -> None:
    import torch

    module, data, acc = models.train_digits_cnn(seed=0)
    models.export_onnx(module, (torch.from_numpy(data.x_train[:2]),), HERE / "digits_cnn.onnx", ["x"])
    np.savez_compressed(HERE / "digits_calib.npz", x=data.x_train[:256])
    np.savez_compressed(HERE / "digits_eval.npz", x=data.x_test, labels=data.y_test)
    print(f"digits CNN: FP32 test accuracy {acc:.4f}; wrote {HERE}")


if __name__ == "__main__":
    main()
