"""Core ML lowering time: canonical QDQ ONNX -> MIL program -> .mlpackage -> read-back verification,
per stage, median over repeated runs in one process (coremltools' import is timed once, apart).

    PYTHONPATH=.:plugins/coreml python bench/coreml_lowering.py [--repeats 5] [--precision fp16|fp32]

Models: the test models (deploykit.testing.make_canonical: resnet, mobilenet, encoder) and a
wider ResNet-style CNN (width 64, 3x64x64 input) so the weight-size dependence is visible.
There is no Core ML runtime on Linux, so this measures lowering only; latency needs a Mac.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def wide_resnet(workdir: Path):
    import torch

    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing.models import export_onnx, resnet_cnn

    torch.manual_seed(0)
    example = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    src = export_onnx(resnet_cnn(in_ch=3, width=64, blocks=4), (torch.from_numpy(example),), workdir / "wide.onnx",
                      ["x"])
    fp32 = model.normalise(model.load_onnx(src), str(src))
    calib = {"x": np.random.default_rng(1).random((32, 3, 64, 64), dtype=np.float32)}
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    return write_canonical(quantize(fp32, source, "minmax"), fp32, workdir, "wide_resnet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--target", default="iOS17")
    args = parser.parse_args()

    from deploykit.testing import make_canonical, make_target
    from deploykit_coreml import CoreMLBackend, lowering, verify

    workdir = Path(tempfile.mkdtemp(prefix="coreml-bench-"))
    try:
        models = {kind: make_canonical(kind, workdir / kind) for kind in ("resnet", "mobilenet", "encoder")}
        models["wide_resnet"] = wide_resnet(workdir / "wide")

        t0 = time.perf_counter()
        import coremltools

        import_s = time.perf_counter() - t0
        print(f"coremltools {coremltools.__version__}, python {sys.version.split()[0]}; "
              f"import coremltools: {import_s:.2f} s (once per process)")
        target = make_target(CoreMLBackend, minimum_deployment_target=args.target, compute_precision=args.precision)
        options = dict(target.options)
        print(f"target {args.target}, compute precision {args.precision}, median of {args.repeats} runs after 1 warm-up\n")
        header = f"{'model':<12} {'weights':>9} {'Q/DQ':>5} {'build MIL':>10} {'convert':>9} {'save':>7} " \
                 f"{'verify':>7} {'total':>8}  scales_match"
        print(header)
        print("-" * len(header))
        for kind, canonical in models.items():
            stages: dict[str, list[float]] = {k: [] for k in ("build", "convert", "save", "verify", "total")}
            status = ""
            for i in range(args.repeats + 1):
                dest = workdir / "out" / f"{kind}-{i}.mlpackage"
                dest.parent.mkdir(parents=True, exist_ok=True)
                t_start = time.perf_counter()
                lowered = lowering.build_program(canonical.model, args.target, "range", 1, args.precision == "fp16")
                t_built = time.perf_counter()
                mlmodel = lowering.convert(lowered, options, max_batch=8)
                t_converted = time.perf_counter()
                mlmodel.user_defined_metadata[verify.META_QDQ_OPS] = json.dumps(
                    {q.onnx_node: q.mil_op for q in lowered.qdq_names})
                mlmodel.user_defined_metadata[verify.META_PRECISION] = args.precision
                mlmodel.save(str(dest))
                t_saved = time.perf_counter()
                check = verify.verify_package(canonical.model, dest)
                t_verified = time.perf_counter()
                status = f"{check.status} ({check.details.get('weights_compared', 0)} weights, " \
                         f"{check.details.get('scales_compared', 0)} scales)"
                if i == 0:
                    continue  # warm-up: first use of each MIL op builder
                for key, value in (("build", t_built - t_start), ("convert", t_converted - t_built),
                                   ("save", t_saved - t_converted), ("verify", t_verified - t_saved),
                                   ("total", t_verified - t_start)):
                    stages[key].append(value)
            inits = {i.name: i for i in canonical.model.graph.initializer}
            n_weights = sum(int(np.prod(inits[n.input[0]].dims)) for n in canonical.model.graph.node
                            if n.op_type == "DequantizeLinear" and n.input[0] in inits)
            n_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in canonical.model.graph.node)
            med = {k: float(np.median(v)) for k, v in stages.items()}
            print(f"{kind:<12} {n_weights:>9} {n_qdq:>5} {med['build']:>9.3f}s {med['convert']:>8.3f}s "
                  f"{med['save']:>6.3f}s {med['verify']:>6.3f}s {med['total']:>7.3f}s  {status}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
