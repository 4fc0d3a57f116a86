"""Where a trained BERT-family encoder's error to FP32 sits: its activation quantizers bypassed by kind.

    python bench/qat_error_budget.py WORK

WORK: a folder bench/qat_real.py wrote (``--work``): ``encoder_qat.qdq.onnx`` (the trained export),
``encoder_qat.fp32.onnx`` (its FP32 teacher) and ``eval.npz`` (the held-out sentences). Each row removes
the Q/DQ pairs of one kind of activation (each DequantizeLinear's readers read the float tensor the
QuantizeLinear read) and measures the mean cosine with FP32 in onnxruntime, exact Q/DQ semantics. What
is left with every activation float is the int8 weights' share. The canonical encoder has eight
activation quantizers per layer, in this order: the QKV input, Q, V, K^T, the softmax probabilities,
the attention output projection's input, the FFN input, the FFN intermediate (checked against the
producers' op types: another model is refused, not misread).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

KINDS = ("qkv_in", "q", "v", "k", "probs", "ctx", "ffn_in", "ffn_mid")
PRODUCERS = ("Mul", "Transpose", "Transpose", "Transpose", "Softmax", "Mul", "Mul", "Mul")  # SmoothQuant's Mul


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], size: int = 32) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    n = len(next(iter(feeds.values())))
    return np.concatenate([session.run(None, {k: feeds[k][i:i + size] for k in names})[0] for i in range(0, n, size)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def bypass(model: onnx.ModelProto, chosen: list[int]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    quantizers = [n for n in out.graph.node if n.op_type == "QuantizeLinear"]
    rename: dict[str, str] = {}
    for i in chosen:
        q = quantizers[i]
        for dq in (n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]):
            rename[dq.output[0]] = q.input[0]
    for node in out.graph.node:
        for j, name in enumerate(node.input):
            node.input[j] = rename.get(name, name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="bench/qat_real.py's --work folder of an encoder run")
    args = ap.parse_args()
    model = onnx.load(str(args.work / "encoder_qat.qdq.onnx"))
    fp32 = onnx.load(str(args.work / "encoder_qat.fp32.onnx"))
    feeds = dict(np.load(args.work / "eval.npz"))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    layers = len(quantizers) // len(KINDS)
    got = [producer.get(q.input[0]) for q in quantizers]
    if len(quantizers) % len(KINDS) or got != list(PRODUCERS) * layers:
        raise SystemExit(f"{args.work / 'encoder_qat.qdq.onnx'}: not a canonical BERT-family encoder "
                         f"(activation quantizers read {got[:8]}...); this budget reads only those")
    reference = run(fp32, feeds)
    base = cosine(reference, run(model, feeds))
    print(f"all int8: cosine {base:.5f}, error {1 - base:.6f}")
    rows = [("every activation float (int8 weights only)", list(range(len(quantizers))))]
    rows += [(f"{kind} float in all {layers} layers", [i for i in range(len(quantizers)) if i % len(KINDS) == k])
             for k, kind in enumerate(KINDS)]
    rows += [(f"layer {layer}: its activations float", list(range(layer * len(KINDS), (layer + 1) * len(KINDS))))
             for layer in range(layers)]
    for name, chosen in rows:
        c = cosine(reference, run(bypass(model, chosen), feeds))
        print(f"{name:44s} cosine {c:.5f}  error removed {(c - base) / (1 - base) * 100:5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
