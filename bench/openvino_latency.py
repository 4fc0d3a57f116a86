"""OpenVINO INT8 (the lowered canonical model) vs OpenVINO FP32 (the FP32 model with
INFERENCE_PRECISION_HINT=f32), median latency at batch 1 and 8, measured in one process with
the two runners alternating call by call so machine noise hits both alike.

    PYTHONPATH=.:plugins/openvino python bench/openvino_latency.py [--threads N] [--hint latency]

Model: deploykit.testing.models.resnet_cnn(in_ch=3, width=32) at 3x64x64, calibrated by the core
quantizer (minmax on random inputs: latency does not depend on the scales' values).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def build_models(workdir: Path, width: int, size: int):
    import onnx
    import torch

    from deploykit import model as modelmod
    from deploykit.data import RandomSource
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing.models import export_onnx, resnet_cnn

    torch.manual_seed(0)
    raw = export_onnx(resnet_cnn(in_ch=3, width=width), (torch.randn(1, 3, size, size),), workdir / "raw.onnx", ["x"])
    fp32 = modelmod.normalise(onnx.load(str(raw)), str(raw))
    result = quantize(fp32, RandomSource(modelmod.input_specs(fp32), samples=64), method="minmax")
    return write_canonical(result, fp32, workdir, "resnet")


def interleaved_medians(runners: dict, feeds: dict, runs: int, warmup: int) -> dict[str, float]:
    """Alternate the runners call by call, so load from other processes hits both alike."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(feeds)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(feeds)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS (0: OpenVINO chooses)")
    ap.add_argument("--streams", type=int, default=0, help="NUM_STREAMS (0: the hint chooses)")
    ap.add_argument("--hint", default="latency", choices=("latency", "throughput"))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=400, help="timed calls per runner and batch size")
    args = ap.parse_args()

    import onnx
    import openvino as ov

    from deploykit.backend import precision_audit
    from deploykit.testing import make_target
    from deploykit_openvino import OpenVINOBackend
    from deploykit_openvino.backend import compile_config
    from deploykit_openvino.verify import runtime_layers

    options = {"performance_hint": args.hint, "num_threads": args.threads, "num_streams": args.streams,
               "inference_precision": "f32"}
    target = make_target(OpenVINOBackend, **options)
    backend = OpenVINOBackend()
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        canonical = build_models(Path(tmp), args.width, args.size)
        artifact = backend.lower(canonical, target, Path(tmp) / "resnet.xml")
        for check in artifact.checks:
            print(f"INT8 {check.name}: {check.status} {check.message}")
        # the FP32 baseline: the FP32 model, the same properties, INFERENCE_PRECISION_HINT=f32 explicitly
        runners = {"int8": backend.load(artifact, target), "fp32": backend.fp32_runner(canonical, target)}
        config = compile_config(options)
        print(f"\nOpenVINO {ov.get_version()} CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}), "
              f"resnet_cnn(in_ch=3, width={args.width}) at 3x{args.size}x{args.size}, config {config}")
        print(f"{'batch':>5} {'INT8 ms':>9} {'FP32 ms':>9} {'speed-up':>9}")
        rng = np.random.default_rng(0)
        for batch in (1, 8):
            feeds = {"x": rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)}
            med = interleaved_medians(runners, feeds, args.runs, warmup=20)
            print(f"{batch:>5} {med['int8']:>9.3f} {med['fp32']:>9.3f} {med['fp32'] / med['int8']:>8.2f}x")
        # what each one really ran in
        fp32_proto = onnx.load(str(canonical.fp32_path))
        for name, runner in runners.items():
            compiled = runner.compiled_models()[-1]
            audit = precision_audit(runtime_layers(compiled.get_runtime_model(),
                                                   fp32_proto if name == "fp32" else canonical.model))
            print(f"{name}: INFERENCE_PRECISION_HINT={compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}; "
                  f"{audit.message}")


if __name__ == "__main__":
    main()
