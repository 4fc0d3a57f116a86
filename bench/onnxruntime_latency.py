"""FP32 vs INT8 (canonical model lowered by the onnxruntime backend) median latency in
onnxruntime, ResNet-style CNN, batch 1 and 8, measured in one run.

    python bench/onnxruntime_latency.py [--threads 2] [--size 64] [--width 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import canonical_from_module, interleaved_medians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="input height/width")
    ap.add_argument("--width", type=int, default=32, help="channels of the first stage")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import torch

    from deploykit.testing import make_target
    from deploykit.testing.models import resnet_cnn
    from deploykit_onnxruntime import OnnxRuntimeBackend, OrtRunner

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)
    calib = {"x": rng.standard_normal((64, *shape), dtype=np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        canonical = canonical_from_module(resnet_cnn(3, 10, args.width), {"x": calib["x"][:2]}, calib, Path(tmp))
        backend = OnnxRuntimeBackend()
        results = {}
        import onnxruntime as ort

        for variant, activations in (("int8 (uint8 activations)", "uint8"), ("int8 (canonical int8)", "int8")):
            target = make_target(OnnxRuntimeBackend, threads=args.threads, activations=activations)
            artifact = backend.lower(canonical, target, Path(tmp) / f"{activations}.onnx")
            results[variant] = backend.load(artifact, target)
        fp32 = OrtRunner(canonical.fp32_path, {"threads": args.threads, "graph_optimization_level": "all"}, ort)
        print(f"ResNet-style CNN {shape}, width {args.width}, onnxruntime {ort.__version__}, {args.threads} threads")
        print(f"{'batch':>5}  {'fp32 ms':>9}  " + "  ".join(f"{k:>26}" for k in results) + "  speed-up (uint8 path)")
        for batch in (1, 8):
            feeds = {"x": rng.standard_normal((batch, *shape), dtype=np.float32)}
            runners = {"fp32": lambda: fp32.run(feeds)}
            runners.update({k: (lambda r=r: r.run(feeds)) for k, r in results.items()})
            med = interleaved_medians(runners, rounds=args.rounds)
            ints = "  ".join(f"{med[k]:>26.3f}" for k in results)
            print(f"{batch:>5}  {med['fp32']:>9.3f}  {ints}  {med['fp32'] / med['int8 (uint8 activations)']:.2f}x")


if __name__ == "__main__":
    main()
