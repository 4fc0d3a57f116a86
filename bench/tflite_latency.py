"""INT8 TFLite (canonical model lowered by the tflite backend) vs float TFLite (the same graph
without fake-quant) median latency in the LiteRT interpreter, ResNet-style CNN, batch 1,
measured in one run; then the lowering time of the test models.

    python bench/tflite_latency.py [--threads 2] [--size 32] [--width 32]

"invoke" times the interpreter alone (tensors already set); "runner" adds what every backend's
runner does for the user (NCHW -> NHWC, int8 quantize/dequantize of the I/O).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import canonical_from_module, interleaved_medians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="input height/width")
    ap.add_argument("--width", type=int, default=32, help="channels of the first stage")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import torch

    from deploykit.testing import make_canonical, make_target
    from deploykit.testing.models import resnet_cnn
    from deploykit_tflite import TFLiteBackend
    from deploykit_tflite.lowering import convert, fixed_input_shapes, lower_graph
    from deploykit_tflite.runner import LiteRTRunner, interpreter_class

    t0 = time.monotonic()
    import tensorflow as tf

    tf_import = time.monotonic() - t0
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)
    calib = {"x": rng.standard_normal((64, *shape), dtype=np.float32)}
    backend = TFLiteBackend()
    target = make_target(TFLiteBackend, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        canonical = canonical_from_module(resnet_cnn(3, 10, args.width), {"x": calib["x"][:2]}, calib, tmp, "minmax")
        artifact = backend.lower(canonical, target, tmp / "int8.tflite")
        scales = {c.name: c.status for c in artifact.checks}["scales_match"]
        shapes = fixed_input_shapes(canonical.model, {}, "bench")
        float_graph = lower_graph(canonical, shapes, False, "bench", fake_quant=False)
        (tmp / "float.tflite").write_bytes(convert(float_graph, quantize=False))

        Interpreter = interpreter_class()
        interpreters, runners = {}, {}
        x = rng.standard_normal((1, *shape), dtype=np.float32)
        for name, path in (("int8", artifact.path), ("float", tmp / "float.tflite")):
            it = Interpreter(model_path=str(path), num_threads=args.threads)
            it.allocate_tensors()
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            interpreters[name] = it
            runners[name] = LiteRTRunner(Path(path), ["x"], [canonical.model.graph.output[0].name], args.threads)
        print(f"ResNet-style CNN {shape}, width {args.width}, tensorflow {tf.__version__}, "
              f"{args.threads} threads, batch 1 (scales_match: {scales})")
        print(f"ops: {' '.join(artifact.metadata['ops'])}")
        calls = {f"{k} invoke": it.invoke for k, it in interpreters.items()}
        calls.update({f"{k} runner": (lambda r=r: r.run({"x": x})) for k, r in runners.items()})
        med = interleaved_medians(calls, rounds=args.rounds)
        for what in ("invoke", "runner"):
            i8, f32 = med[f"int8 {what}"], med[f"float {what}"]
            print(f"{what:>7}: int8 {i8:.4f} ms   float {f32:.4f} ms   int8 speed-up {f32 / i8:.2f}x")

        print(f"\nlowering time (tensorflow import once: {tf_import:.1f} s)")
        for kind in ("resnet", "mobilenet", "digits"):
            c = make_canonical(kind, tmp / kind)
            start = time.monotonic()
            a = backend.lower(c, target, tmp / f"{kind}.tflite")
            took = time.monotonic() - start
            s = a.metadata["seconds"]
            print(f"  {kind:<10} {took:.3f} s  (trace {s['trace']:.3f}, convert {s['convert']:.3f}, "
                  f"verify {s['verify']:.3f})")


if __name__ == "__main__":
    main()
