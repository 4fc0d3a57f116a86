"""TensorRT latency: the canonical INT8 engine vs an FP32 engine of the same model, end-to-end
(deploykit.checks.measure_latency, copies included) and GPU time (CUDA events around the
engine's kernels, TensorRTRunner.last_gpu_ms), medians over many runs, ratios from one run.

    PYTHONPATH=.:plugins/tensorrt python bench/tensorrt_latency.py [--runs 500] [--kinds resnet,mobilenet]

Needs TensorRT and an NVIDIA GPU; elsewhere it prints why it cannot run and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

from deploykit.backend import CanonicalModel
from deploykit.checks import measure_latency
from deploykit.testing import eval_feeds, make_canonical, make_target
from deploykit_tensorrt import TensorRTBackend


def _profiles(model: onnx.ModelProto, max_batch: int) -> dict:
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        out[value.name] = {"min": shape, "opt": shape, "max": [max_batch] + shape[1:]}
    return out


def _time(runner, feeds, runs: int) -> tuple[float, float | None]:
    e2e = measure_latency(runner, feeds, warmup=50, runs=runs)
    gpu = []
    for _ in range(runs):
        runner.run(feeds)
        gpu.append(runner.last_gpu_ms)
    return e2e.p50_ms, (statistics.median(gpu) if None not in gpu else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--kinds", default="resnet,mobilenet,encoder")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    backend = TensorRTBackend()
    probe_target = make_target(TensorRTBackend)
    av = backend.probe(probe_target)
    if not av.can_run:
        print(f"tensorrt: cannot run here: {av.reason}\n  install: {av.install_hint}")
        return 0
    print(f"TensorRT {av.versions['tensorrt_version']} on {av.versions['gpu_name']} "
          f"(sm {av.versions['compute_capability']}, driver {av.versions['driver']}), runs={args.runs}")
    print(f"{'model':10} {'batch':>5} {'int8 e2e':>9} {'fp32 e2e':>9} {'ratio':>6} {'int8 gpu':>9} {'fp32 gpu':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in args.kinds.split(","):
            canonical = make_canonical(kind, root / kind)
            fp32 = onnx.load(str(canonical.fp32_path))
            reference = CanonicalModel(canonical.fp32_path, fp32, canonical.calibration, canonical.fp32_path)
            target = make_target(TensorRTBackend, name=kind, batch_sizes=tuple(batches),
                                 profiles=_profiles(canonical.model, max(batches)))
            runners = {name: backend.load(backend.lower(model, target, root / f"{kind}-{name}.engine"), target)
                       for name, model in (("int8", canonical), ("fp32", reference))}
            for batch in batches:
                feeds = eval_feeds(kind, batch)
                i8, f32 = _time(runners["int8"], feeds, args.runs), _time(runners["fp32"], feeds, args.runs)
                gpu = (f"{i8[1]:9.3f} {f32[1]:9.3f} {f32[1] / i8[1]:6.2f}" if i8[1] and f32[1] else "  (no cuda-python)")
                print(f"{kind:10} {batch:5d} {i8[0]:9.3f} {f32[0]:9.3f} {f32[0] / i8[0]:6.2f} {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
