"""INT8 vs FP32 latency on real pretrained networks, onnxruntime and OpenVINO, in one process.

    python bench/realnet_speed.py --nets encoder,cnn [--calib 64] [--rounds 10] [--batch 1,8]
    python bench/realnet_speed.py --nets cnn --canonical OUT/canonical.qdq.onnx   # a build's shipped model

The canonical model is the default build's (minmax, asymmetric activations, recipe ``auto``)
calibrated on real data (photo crops / pydoc sentences, deploykit/testing/realnets.py); it is
lowered by the real onnxruntime and OpenVINO plugins with their default options. FP32 baselines:
the FP32 model in onnxruntime (default optimizations), and in OpenVINO with
INFERENCE_PRECISION_HINT=f32 (the backend's ``fp32_runner``). The four runners alternate in
rounds (bench/_common.interleaved_medians) so machine noise hits them alike; medians and the
speed-ups are from that one run. The OpenVINO audit line says how many layers really ran int8.
OpenVINO's ``overflow_fix`` modes (``--overflow``: convolutions and weighted MatMuls split into two
halves that cannot saturate on CPUs without VNNI) are timed as separate runners.
``--canonical``: time that canonical model (e.g. what ``deploykit build --accuracy-target``
shipped, float layers included, against the FP32 model written beside it) instead of calibrating.
Scratch files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians  # noqa: E402


def canonical_for(net: str, n_calib: int, workdir: Path):  # type: ignore[no-untyped-def]
    from deploykit import data, model as modelmod
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing import realnets

    if net == "cnn":
        path = realnets.efficientnet_lite0()
        calib = {"input": realnets.photo_crops(n_calib, split="calib")}
        sample = {"input": realnets.photo_crops(8, split="eval")}
    else:
        path = realnets.minilm("dynamo")
        calib = realnets.sentences_feeds(n_calib, split="calib")
        sample = realnets.sentences_feeds(8, split="eval")
    fp32 = modelmod.normalise(modelmod.load_onnx(path), str(path))

    def batches() -> list[dict[str, np.ndarray]]:
        return [{k: v[i:i + 16] for k, v in calib.items()} for i in range(0, n_calib, 16)]

    source = data.open_source(batches, modelmod.input_specs(fp32))
    result = quantize(fp32, source, "minmax", batch_size=16, activations="asymmetric", recipe="auto")
    return write_canonical(result, fp32, workdir, net), sample, result.recipe


def shipped(path: Path, net: str):  # type: ignore[no-untyped-def]
    """A canonical model written by a build (its FP32 reference beside it) and sample inputs."""
    from deploykit.quantize import load_canonical
    from deploykit.quantize.recipes import META_RECIPE
    from deploykit.testing import realnets

    canonical = load_canonical(path)
    sample = ({"input": realnets.photo_crops(8, split="eval")} if net == "cnn"
              else realnets.sentences_feeds(8, split="eval"))
    meta = {p.key: p.value for p in canonical.model.metadata_props}
    return canonical, sample, f"{meta.get(META_RECIPE, '?')} (shipped: {path})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="encoder,cnn", help="comma-separated: cnn, encoder")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples (latency does not depend on them)")
    ap.add_argument("--batch", default="1,8", help="batch sizes")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--per-round", type=int, default=10, help="timed calls per runner per round")
    ap.add_argument("--canonical", type=Path, help="time this canonical .qdq.onnx (one net) instead of calibrating")
    ap.add_argument("--overflow", default="first_layer,all,none",
                    help="OpenVINO overflow_fix modes timed (splits convolutions and weighted MatMuls)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    from deploykit.plugins import load_registry
    from deploykit.reference import fp32_runner
    from deploykit.testing import make_target

    registry = load_registry()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for net in [n.strip() for n in args.nets.split(",") if n.strip()]:
        with tempfile.TemporaryDirectory(prefix="deploykit-speed-") as tmp:
            work = Path(tmp)
            if args.canonical:
                canonical, sample, recipe = shipped(args.canonical, net)
            else:
                canonical, sample, recipe = canonical_for(net, args.calib, work)
            runners = {}
            for name in ("onnxruntime", "openvino"):
                cls = registry.backends[name]
                backend = cls()
                modes = args.overflow.split(",") if name == "openvino" else [""]
                for mode in modes:
                    target = make_target(cls, **({"overflow_fix": mode} if mode else {}))
                    label = f"{name} int8" + (f" [{mode}]" if mode else "")
                    artifact = backend.lower(canonical, target, work / f"{net}_{name}{mode}{backend.artifact_suffix}")
                    runners[label] = backend.load(artifact, target)
                    audit = next((c for c in artifact.checks if c.name == "int8_fraction"), None)
                    if audit is not None:
                        print(f"{net}: {label}: {audit.message}", flush=True)
                if name == "openvino":
                    runners["openvino fp32"] = backend.fp32_runner(canonical, make_target(cls))
            runners["onnxruntime fp32"] = fp32_runner(canonical.fp32_path)
            print(f"{net}: canonical model minmax, asymmetric, recipe {recipe}", flush=True)
            for batch in [int(b) for b in args.batch.split(",")]:
                feeds = {k: v[:batch] for k, v in sample.items()}
                med = interleaved_medians({k: (lambda r=r: r.run(feeds)) for k, r in runners.items()},
                                          rounds=args.rounds, per_round=args.per_round, warmup=5, settle=2)
                for label, i8 in med.items():
                    if "int8" not in label:
                        continue
                    f32 = med[label.split(" int8")[0] + " fp32"]
                    print(f"{net:8s} batch {batch}: {label:28s} {i8:8.2f} ms  fp32 {f32:8.2f} ms  "
                          f"speed-up {f32 / i8:5.2f}x", flush=True)
            for r in runners.values():
                r.close()
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
