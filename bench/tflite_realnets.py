"""TFLite on real pretrained networks (issues 12 and 13): does the .tflite keep every canonical
scale, how close is it to the canonical model, and how fast is INT8 against float TFLite.

    python bench/tflite_realnets.py [--nets cnn,dynamo,legacy] [--samples 64] [--seq 64] [--rounds 10]

- cnn: EfficientNet-Lite0 (``deploykit.testing.realnets``), minmax canonical model calibrated on
  ``--calib`` photo crops; ``scales_match`` (tensors compared, mismatches, dead channels not kept),
  top-1 agreement with the canonical model (onnxruntime, graph optimizations off: exact Q/DQ).
- dynamo / legacy: all-MiniLM-L6-v2 exported by torch's dynamo or legacy exporter, sequence
  ``--seq``; ``scales_match``, MatMuls run int8 / float on canonical int8 inputs, cosine of the
  mean-pooled embeddings with the canonical model (mean and worst sentence).
- latency: the INT8 artifact against the same graph converted in float, batch 1, LiteRT, in
  interleaved rounds in one process (medians); say the load average with the figures.

Canonical models are cached under ~/.cache/deploykit/bench_tflite (keyed by net, calibration size
and sequence); the lowering itself always runs (it is what is measured).
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


def canonical_cached(net: str, calib: int, seq: int):
    from deploykit.quantize import load_canonical
    from deploykit.testing import canonical_from_onnx, realnets

    work = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit")) / "bench_tflite" / \
        f"{net}_c{calib}_s{seq}"
    path = work / f"{net}.qdq.onnx"
    if path.exists():
        return load_canonical(path)
    if net == "cnn":
        src, data = realnets.efficientnet_lite0(), {"input": realnets.photo_crops(calib, split="calib")}
    else:
        src, data = realnets.minilm(net), realnets.sentences_feeds(calib, seq_len=seq, split="calib")
    return canonical_from_onnx(src, data, work, net)


def canonical_outputs(canonical, feeds) -> np.ndarray:
    from deploykit.reference import (
        run_canonical,  # exact Q/DQ semantics (optimizations off)
    )

    return run_canonical(canonical.path, feeds)[0]


def bench(net: str, args) -> dict:
    from deploykit.testing import make_target, realnets
    from deploykit_tflite import TFLiteBackend

    t0 = time.monotonic()
    canonical = canonical_cached(net, args.calib, args.seq)
    row: dict = {"net": net, "canonical_s": round(time.monotonic() - t0, 1)}
    backend = TFLiteBackend()
    options = {"threads": args.threads}
    if net != "cnn":
        options["input_shapes"] = {k: [1, args.seq] for k in realnets.ENCODER_INPUTS}
    target = make_target(TFLiteBackend, **options)
    out_dir = Path(args.out) / net
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
        cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
        row["cosine_with_canonical"] = {"mean": float(cos.mean()), "min": float(cos.min())}
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
    args = ap.parse_args()
    for net in args.nets.split(","):
        print(json.dumps(bench(net.strip(), args), indent=1), flush=True)


if __name__ == "__main__":
    main()
