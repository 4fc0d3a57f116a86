"""Accuracy of the digits-trained ResNet-style CNN after `deploykit build --target onnxruntime`
with each calibration method (held-out digits, 540 images).

    python bench/calibration_accuracy.py [--targets onnxruntime,openvino,tflite]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnxruntime")
    args = ap.parse_args()

    import deploykit
    from deploykit.testing import exported_onnx, models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported_onnx("digits", tmp / "digits.onnx")
        data = models.digits()
        np.savez(tmp / "calib.npz", x=data.x_train[:256])
        np.savez(tmp / "eval.npz", x=data.x_test, labels=data.y_test)
        print(f"{'method':<11} {'target':<12} {'FP32 acc':>9} {'INT8 acc':>9} {'drop (points)':>14} {'top-1 agreement':>16}")
        for method in ("minmax", "percentile", "entropy", "mse"):
            result = deploykit.build(tmp / "digits.onnx", args.targets, calib=str(tmp / "calib.npz"),
                                     eval=str(tmp / "eval.npz"), method=method, out_dir=tmp / method, baseline=False)
            fp32 = result.manifest["evaluation"]["fp32_accuracy"]
            for t in result.targets:
                checks = {c.name: c.value for c in t.checks}
                if checks.get("accuracy") is None:
                    print(f"{method:<11} {t.target.name:<12} {t.status}: {t.reason}")
                    continue
                print(f"{method:<11} {t.target.name:<12} {fp32 * 100:>8.2f}% {checks['accuracy'] * 100:>8.2f}% "
                      f"{checks['accuracy_drop'] * 100:>14.2f} {checks['top1_agreement'] * 100:>15.2f}%")


if __name__ == "__main__":
    main()
