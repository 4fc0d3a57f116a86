"""TFLite on real pretrained networks (issues 12 and 13): does the .tflite keep every canonical
scale, how close is it to the canonical model, and how fast is INT8 against float TFLite.

    python bench/tflite_realnets.py [--nets cnn,dynamo,legacy] [--samples 64] [--seq 64] [--rounds 10]
        [--recipes none,smoothquant:0.8] [--layers 8] [--anchors onnxruntime]

- cnn: EfficientNet-Lite0 (``deploykit.testing.realnets``), minmax canonical model calibrated on
  ``--calib`` photo crops; ``scales_match`` (tensors compared, mismatches, dead channels not kept),
  top-1 agreement with the canonical model (onnxruntime, graph optimizations off: exact Q/DQ).
- dynamo / legacy: all-MiniLM-L6-v2 exported by torch's dynamo or legacy exporter, sequence
  ``--seq``; ``scales_match``, MatMuls run int8 / float on canonical int8 inputs, cosine of the
  mean-pooled embeddings with the canonical model (mean and worst sentence).
- latency: the INT8 artifact against the same graph converted in float, batch 1, LiteRT, in
  interleaved rounds in one process (medians); say the load average with the figures.
- ``--recipes``: one row per PTQ recipe of the canonical model (``none``; ``smoothquant:0.8`` is
  what ``deploykit build`` picks for an encoder), with the canonical model's and the .tflite's
  cosine with FP32 beside the cosine with the canonical model.
- ``--anchors onnxruntime``: the same canonical model lowered to another backend and run as a user
  would (onnxruntime: its integer kernels), its agreement with the canonical model beside TFLite's.
- ``--layers N``: the per-layer comparison (deploykit.layers, the TFLite layer runner) on the
  first N evaluation samples: worst layer, verdict counts.

Canonical models are cached under ~/.cache/deploykit/bench_tflite (keyed by net, calibration size,
sequence and recipe); the lowering itself always runs (it is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians


def canonical_cached(net: str, calib: int, seq: int, recipe: str = "none"):
    from deploykit.quantize import load_canonical
    from deploykit.testing import canonical_from_onnx, realnets

    suffix = "" if recipe == "none" else "_" + recipe.replace(":", "")
    work = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit")) / "bench_tflite" / \
        f"{net}_c{calib}_s{seq}{suffix}"
    path = work / f"{net}.qdq.onnx"
    if path.exists():
        return load_canonical(path)
    if net == "cnn":
        src, data = realnets.efficientnet_lite0(), {"input": realnets.photo_crops(calib, split="calib")}
    else:
        src, data = realnets.minilm(net), realnets.sentences_feeds(calib, seq_len=seq, split="calib")
    return canonical_from_onnx(src, data, work, net, recipe=None if recipe == "none" else recipe)


def canonical_outputs(canonical, feeds) -> np.ndarray:
    from deploykit.reference import (
        run_canonical,  # exact Q/DQ semantics (optimizations off)
    )

    return run_canonical(canonical.path, feeds)[0]


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)}


def bench(net: str, recipe: str, args) -> dict:
    from deploykit.testing import make_target, realnets
    from deploykit_tflite import TFLiteBackend

    t0 = time.monotonic()
    canonical = canonical_cached(net, args.calib, args.seq, recipe)
    row: dict = {"net": net, "recipe": recipe, "canonical_s": round(time.monotonic() - t0, 1)}
    backend = TFLiteBackend()
    options = {"threads": args.threads}
    if net != "cnn":
        options["input_shapes"] = {k: [1, args.seq] for k in realnets.ENCODER_INPUTS}
    target = make_target(TFLiteBackend, **options)
    out_dir = Path(args.out) / f"{net}_{recipe.replace(':', '')}"
    t0 = time.monotonic()
    artifact = backend.lower(canonical, target, out_dir / f"{net}.tflite")
    row["lower_s"] = round(time.monotonic() - t0, 1)
    checks = {c.name: c for c in artifact.checks}
    sm = checks["scales_match"]
    row["scales_match"] = {"status": sm.status, "activations": sm.details.get("activations"),
                           "weights": sm.details.get("weights"), "mismatches": sm.details.get("mismatches", [])[:5],
                           "not_kept": len(sm.details.get("not_kept", []))}
    row["patched"] = {k: (len(v) if isinstance(v, list) else v) for k, v in artifact.metadata["patched"].items()
                      if k != "not_kept_channels"}
    row["int8_fraction"] = checks["int8_fraction"].message if "int8_fraction" in checks else None
    if net == "cnn":
        feeds = {"input": realnets.photo_crops(args.samples, split="eval")}
    else:
        feeds = realnets.sentences_feeds(args.samples, seq_len=args.seq, split="eval")
    ref = canonical_outputs(canonical, feeds)
    runner = backend.load(artifact, target)
    out = np.concatenate([runner.run({k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(args.samples)])
    if net == "cnn":
        row["top1_agreement_with_canonical"] = realnets.top1_agreement(ref, out)
    else:
        from deploykit.reference import fp32_runner

        fp32_out = fp32_runner(canonical.fp32_path).run(feeds)[0]
        row["cosine_with_canonical"] = cosines(ref, out)
        row["cosine_canonical_vs_fp32"] = cosines(ref, fp32_out)
        row["cosine_tflite_vs_fp32"] = cosines(out, fp32_out)
    for name in [a for a in args.anchors.split(",") if a]:
        # the same canonical model on another backend, as a user would run it: how close does a
        # runtime with its own integer kernels get to the canonical model (onnxruntime: optimizations on)
        from deploykit.plugins import load_registry

        other = load_registry().get(name)
        other_target = make_target(type(other))
        suffix = {"onnxruntime": ".onnx", "openvino": ".xml"}.get(name, "")
        other_artifact = other.lower(canonical, other_target, out_dir / f"anchor_{name}{suffix}")
        other_out = other.load(other_artifact, other_target).run(feeds)[0]
        key = "top1_agreement_with_canonical" if net == "cnn" else "cosine_with_canonical"
        row[f"anchor_{name}"] = {key: realnets.top1_agreement(ref, other_out) if net == "cnn"
                                 else cosines(ref, other_out)}
    if args.layers:
        from deploykit import layers

        first = {k: v[:args.layers] for k, v in feeds.items()}
        report = layers.layer_report(backend, artifact, canonical, target, [first], args.layers)
        worst = report.worst
        row["layers"] = {"compared": len(report.layers), "not_compared": len(report.not_compared),
                         "counts": report.counts(), "samples": report.samples,
                         "worst": None if worst is None else {"layer": worst.layer, "tensor": worst.tensor,
                                                              "within_one_step": round(worst.within_one_step, 5),
                                                              "max_steps": worst.max_steps, "verdict": worst.verdict},
                         "five_worst": layers.table(report, 5, worst_first=True).splitlines()}
    if args.rounds:
        fp32 = backend.fp32_runner(canonical, target, out_dir)
        one = {k: v[:1] for k, v in feeds.items()}
        med = interleaved_medians({"int8": lambda: runner.run(one), "float": lambda: fp32.run(one)},
                                  rounds=args.rounds, per_round=5, warmup=3, settle=2)
        row["latency_ms"] = {k: round(v, 2) for k, v in med.items()}
        row["speedup"] = round(med["float"] / med["int8"], 2)
    row["load_average"] = os.getloadavg()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="cnn,dynamo", help="comma list of cnn, dynamo, legacy")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="latency rounds (0: skip latency)")
    ap.add_argument("--out", default="/tmp/deploykit_tflite_realnets")
    ap.add_argument("--recipes", default="none", help="comma list of canonical-model recipes: none, smoothquant:0.8, ...")
    ap.add_argument("--layers", type=int, default=0, help="per-layer comparison on this many samples (0: skip)")
    ap.add_argument("--anchors", default="", help="comma list of other backends run on the same canonical model "
                                                  "(e.g. onnxruntime): their agreement with it, same inputs")
    args = ap.parse_args()
    for net in args.nets.split(","):
        for recipe in args.recipes.split(","):
            print(json.dumps(bench(net.strip(), recipe.strip(), args), indent=1), flush=True)


if __name__ == "__main__":
    main()
