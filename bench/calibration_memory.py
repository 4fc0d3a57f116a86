"""Calibration peak memory for 100 vs 2,000 samples (it must be flat: observation streams).

    python bench/calibration_memory.py [--method entropy] [--samples 100 2000]

Each sample count runs in a fresh subprocess; the figure is that process's peak resident
memory (ru_maxrss) minus its resident memory just before calibrating, so model loading and
imports cancel out. The data comes from a generator, so the samples themselves are never all
in memory either: what is measured is deploykit's own observation state.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(samples: int, method: str, model_dir: str) -> None:
    import numpy as np

    from deploykit import data, model
    from deploykit.quantize import quantize

    fp32 = model.normalise(model.load_onnx(Path(model_dir) / "model.onnx"))
    specs = model.input_specs(fp32)

    def batches():
        rng = np.random.default_rng(0)
        for start in range(0, samples, 50):
            yield {"x": rng.standard_normal((min(50, samples - start), 3, 64, 64), dtype=np.float32)}

    source = data.open_source(batches, specs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as fh:
        rss_before = int(fh.read().split()[1]) * resource.getpagesize() / 1024
    t0 = time.perf_counter()
    result = quantize(fp32, source, method, batch_size=50)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"samples": result.samples, "peak_mb": peak / 1024, "rss_before_mb": rss_before / 1024,
                      "growth_mb": (peak - max(before, rss_before)) / 1024, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="entropy")
    ap.add_argument("--samples", type=int, nargs="+", default=[100, 2000])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2])
        return
    import torch

    from deploykit.testing.models import export_onnx, resnet_cnn

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        export_onnx(resnet_cnn(3, 10, 32), (torch.randn(2, 3, 64, 64),), Path(tmp) / "model.onnx", ["x"])
        print(f"ResNet-style CNN 3x64x64, method {args.method}, calibration batch 50")
        print(f"{'samples':>8}  {'peak RSS MB':>12}  {'growth during calibration MB':>29}  {'seconds':>8}")
        for n in args.samples:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), args.method, tmp],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['samples']:>8}  {r['peak_mb']:>12.1f}  {r['growth_mb']:>29.1f}  {r['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
