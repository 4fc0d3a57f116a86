"""Per-layer fidelity on EfficientNet-Lite0 (real weights, scikit-image photo crops): for each
backend (onnxruntime, OpenVINO's IR, the .tflite; each run by its own layer runner), the worst layer and its fraction of values within one int8 step of the canonical model
(each layer fed the canonical inputs), next to the end-to-end figures; and a 5% scale error
injected in one late layer of the onnxruntime artifact, as the per-layer comparison and the
end-to-end figures see it.

    PYTHONPATH=.:plugins/onnxruntime:plugins/openvino:plugins/tflite \\
        python bench/compare_layers_realnet.py [--samples 32] [--calib 64] [--backends onnxruntime,openvino]
        (onnxruntime-int8: int8 activations; openvino-all / openvino-none: that overflow_fix)
        [--plot /tmp/layers.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx


def _with_scale_error(src: Path, dest: Path, tensor: str, factor: float) -> None:
    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == tensor)
    scale = next(i for i in model.graph.initializer if i.name == node.input[1])
    value = (onnx.numpy_helper.to_array(scale) * np.float32(factor)).astype(np.float32)
    node.input[1] = f"{node.name}_bench_scale"
    model.graph.initializer.append(onnx.numpy_helper.from_array(value, node.input[1]))
    onnx.save(model, str(dest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--backends", default="onnxruntime,onnxruntime-int8,openvino")
    parser.add_argument("--plot", default="")
    parser.add_argument("--scale-error", type=float, default=1.05)
    args = parser.parse_args()

    from deploykit import checks, layers
    from deploykit.backend import Artifact
    from deploykit.plugins import load_registry
    from deploykit.testing import canonical_from_onnx, make_target, realnets

    missing = realnets.missing_packages("cnn") + realnets.missing_packages("photos")
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: {realnets.INSTALL_HINT}")
    work = Path(tempfile.mkdtemp(prefix="layers-effnet-"))
    calib = {"input": realnets.photo_crops(args.calib, split="calib")}
    canonical = canonical_from_onnx(realnets.efficientnet_lite0(), calib, work, "effnet")
    images = realnets.photo_crops(args.samples, split="eval")
    batches = [{"input": images[i:i + 8]} for i in range(0, len(images), 8)]
    cut = layers.find_cut(canonical.model)
    references = layers.reference(canonical.model, cut, batches)
    want = np.concatenate([layers.onnxruntime_runner(canonical.model)(b)["logits"] for b in batches])
    registry = load_registry()
    print(f"EfficientNet-Lite0: {len(cut)} quantized tensors, {args.samples} photo crops, calibrated on {args.calib}")
    print(f"{'target':<22} {'worst layer':<34} {'within 1 step':>13} {'max':>4} {'verdict':<16} counts | "
          f"end to end: cosine, rel-L2, top-1 agreement")
    reports = []
    for spec in args.backends.split(","):
        name, _, variant = spec.partition("-")
        backend = registry.get(name)
        options: dict = {"activations": "int8"} if variant == "int8" else {}
        if name == "openvino" and variant:  # openvino-all / openvino-none / openvino-first_layer
            options = {"overflow_fix": variant}
        target = make_target(type(backend), name=spec, **options)
        suffix = {"onnxruntime": ".onnx", "openvino": ".xml", "tflite": ".tflite"}.get(name, "")
        artifact = backend.lower(canonical, target, work / f"{spec}{suffix}")
        report = layers.compare_layers(spec, canonical.model, backend.layer_runner(artifact, canonical, target, cut),
                                       batches, cut, references)
        reports.append(report)
        runner = backend.load(artifact, target)
        got = np.concatenate([runner.run(b)[0] for b in batches])
        e2e = checks.compare([want], [got], classification=True)
        worst = report.worst
        counts = ", ".join(f"{k} {v}" for k, v in report.counts().items() if v)
        if report.not_compared:
            counts += f", not compared {len(report.not_compared)} ({', '.join(report.not_compared)})"
        print(f"{spec:<22} {worst.layer[:34]:<34} {worst.within_one_step:>13.2%} {worst.max_steps:>4} "
              f"{worst.verdict:<16} {counts} | {e2e['cosine']:.5f}, {e2e['rel_l2']:.4f}, {e2e['top1_agreement']:.3f}")
        if name == "onnxruntime" and variant == "int8":
            lowered = onnx.load(str(artifact.path))
            quantized = {n.output[0] for n in lowered.graph.node if n.op_type == "QuantizeLinear"}
            candidates = [t for t in cut.tensors if t.name in quantized]  # not folded into an integer Clip
            victim = candidates[int(len(candidates) * 0.8)]
            bad = work / "broken.onnx"
            _with_scale_error(artifact.path, bad, victim.name, args.scale_error)
            broken = Artifact(name, bad, (bad,))
            b_report = layers.compare_layers("broken", canonical.model,
                                             backend.layer_runner(broken, canonical, target, cut), batches, cut,
                                             references)
            b_got = np.concatenate([backend.load(broken, target).run(b)[0] for b in batches])
            b_e2e = checks.compare([want], [b_got], classification=True)
            flagged = [(r.layer, r.verdict, round(r.gain, 3)) for r in b_report.flagged()]
            print(f"  {args.scale_error:.2f}x scale injected at '{victim.layer}' ({victim.name}): per layer flags "
                  f"{flagged}; end to end cosine {b_e2e['cosine']:.5f} (correct artifact {e2e['cosine']:.5f}), "
                  f"rel-L2 {b_e2e['rel_l2']:.4f} ({e2e['rel_l2']:.4f}), top-1 {b_e2e['top1_agreement']:.3f}")
    for report in reports:
        print(f"\n{report.target}, worst layers:\n{layers.table(report, 5, worst_first=True)}")
    if args.plot:
        print(f"plot: {layers.plot(reports, Path(args.plot))}")


if __name__ == "__main__":
    main()
