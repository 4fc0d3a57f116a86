"""Why the performance guard fires on TFLite at batch 8 for the bundled digits32 CNN: INT8 vs
float TFLite (the same graph without fake-quant) by batch size and thread count, with and
without XNNPACK, in interleaved rounds in one process (docs/matrix.md, "Performance guard").

    python bench/tflite_batch_guard.py [--batches 1,2,4,8,16] [--threads 1,2] [--rounds 7]

"int8" and "float" are the interpreters as the tflite backend runs them (LiteRT's default
delegates: XNNPACK); "int8 builtin" is the INT8 model without the default delegates (TFLite's
own kernels), which says whether XNNPACK runs the INT8 graph at all. Each round times every
contender after a few untimed calls (the previous contender's thread pool may still be
spinning on the cores). The figures: median wall ms per call, median CPU ms per call (this
process, all threads: what other processes' load does not stretch), and the INT8 speed-up
(float / int8) in both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "deploykit" / "samples"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=10)
    args = ap.parse_args()

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from deploykit import cpu
    from deploykit.testing import canonical_from_onnx, make_target
    from deploykit_tflite import TFLiteBackend
    from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph

    with np.load(SAMPLES / "digits32_calib.npz") as npz:
        calib = {"x": npz["x"][:256]}
    with np.load(SAMPLES / "digits32_eval.npz") as npz:
        evalx = npz["x"]
    print(f"digits32 CNN (x [N,1,32,32], six 3x3 convs), CPU {cpu.cpu_name()}, "
          f"{'no VNNI (u8 x s8 saturates)' if cpu.u8s8_saturates() else 'VNNI or not x86'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        canonical = canonical_from_onnx(SAMPLES / "digits32_cnn.onnx", calib, work, "digits32")
        backend = TFLiteBackend()
        artifact = backend.lower(canonical, make_target(TFLiteBackend), work / "int8.tflite")
        shapes = fixed_input_shapes(canonical.model, {}, "bench")
        (work / "float.tflite").write_bytes(convert(lower_graph(canonical, shapes, False, "bench", fake_quant=False),
                                                    quantize=False))
        print(f"int8 ops: {' '.join(artifact.metadata.get('ops', []))}")
        for threads in [int(t) for t in args.threads.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                calls = {}
                for name, path, resolver in (
                        ("int8", artifact.path, OpResolverType.AUTO),
                        ("float", work / "float.tflite", OpResolverType.AUTO),
                        ("int8 builtin", artifact.path, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)):
                    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
                    d = it.get_input_details()[0]
                    it.resize_tensor_input(d["index"], [batch, *d["shape"][1:]])
                    it.allocate_tensors()
                    d = it.get_input_details()[0]
                    x = np.transpose(evalx[:batch], (0, 2, 3, 1))  # NHWC, as the runner feeds it
                    if d["dtype"] == np.int8:
                        s, z = d["quantization"]
                        x = np.clip(np.round(x / s) + z, -128, 127)
                    it.set_tensor(d["index"], x.astype(d["dtype"]))
                    calls[name] = it.invoke
                wall, cpu = _interleaved(calls, args.rounds, args.per_round)
                print(f"threads {threads} batch {batch:>2}: wall ms int8 {wall['int8']:8.3f} float {wall['float']:8.3f} "
                      f"int8-builtin {wall['int8 builtin']:8.3f} | CPU ms int8 {cpu['int8']:7.3f} float "
                      f"{cpu['float']:7.3f} | INT8 speed-up wall {wall['float'] / wall['int8']:.2f}x, CPU "
                      f"{cpu['float'] / cpu['int8']:.2f}x (XNNPACK int8 vs builtin int8, wall: "
                      f"{wall['int8 builtin'] / wall['int8']:.1f}x)", flush=True)


def _interleaved(calls: dict, rounds: int, per_round: int, warmup: int = 5,
                 settle: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms and median CPU ms (process, all threads) per call, in alternating rounds."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(settle):
                fn()
            c0 = time.process_time()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3 / per_round)
    return ({k: float(np.median(v)) for k, v in wall.items()}, {k: float(np.median(v)) for k, v in cpu.items()})


if __name__ == "__main__":
    main()
