"""Core ML lowering of all-MiniLM-L6-v2 (dynamo and legacy exports): stored weights and scales
read back, and what the program computes, layer by layer, in the test MIL interpreter
(plugins/coreml/tests/mil_reference.py; no Core ML runtime off macOS) against onnxruntime running
the canonical model without optimisations (exact Q/DQ semantics).

    PYTHONPATH=.:plugins/coreml python bench/coreml_encoders.py [--exporters dynamo,legacy]
        [--calib 64] [--eval 16] [--seq 64,24]

Prints, per export: lowering seconds, the scales_match figures, int8 inputs of matmuls, and per
sequence length: every int8 tensor's largest difference in steps and equal fraction, the integer
and boolean tensors compared exactly, and the cosine of the sentence embeddings.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def _mil_reference():
    path = Path(__file__).resolve().parents[1] / "plugins" / "coreml" / "tests" / "mil_reference.py"
    spec = importlib.util.spec_from_file_location("coreml_mil_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(a).astype(np.int32) - np.asarray(b).astype(np.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporters", default="dynamo,legacy")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--seq", default="64,24")
    args = parser.parse_args()

    import onnxruntime as ort

    from deploykit.testing import canonical_from_onnx, make_target, realnets
    from deploykit_coreml import CoreMLBackend, lowering

    missing = realnets.missing_packages("encoder")
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: {realnets.INSTALL_HINT}")
    run_program = _mil_reference().run_program
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for exporter in args.exporters.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"coreml-minilm-{exporter}-"))
        calib = realnets.sentences_feeds(args.calib, seq_len=64, split="calib")
        canonical = canonical_from_onnx(realnets.minilm(exporter), calib, work, "minilm")
        model = canonical.model
        t0 = time.perf_counter()
        artifact = CoreMLBackend().lower(canonical, make_target(CoreMLBackend, batch_sizes=(1, 8), max_dim=128),
                                         work / "minilm.mlpackage")
        seconds = time.perf_counter() - t0
        checks = {c.name: c for c in artifact.checks}
        d = checks["scales_match"].details
        print(f"\n== all-MiniLM-L6-v2, {exporter} export: {len(model.graph.node)} nodes, lowered (iOS17, fp16) in "
              f"{seconds:.1f} s")
        print(f"scales_match {checks['scales_match'].status}: {d['weights_compared']} int8 weights "
              f"({d['weight_values']:,} values) and {d['scales_compared']} scales ({d['scale_values']} values), "
              f"{d['mismatch_count']} mismatches")
        print(f"int8_fraction: {checks['int8_fraction'].message}")

        lowered = lowering.build_program(model, "iOS17")
        fp32 = {"minimum_deployment_target": "iOS17", "compute_precision": "fp32", "compute_units": "ALL",
                "batch": "range", "batch_size": 1, "shapes": "range", "max_dim": 128, "dim_sizes": []}
        program = lowering.convert(lowered, fp32, max_batch=args.eval)._mil_program
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        nodes = {n.name: n for n in model.graph.node}
        q_out = {nodes[q.onnx_node].output[0]: q.mil_op for q in lowered.qdq_names
                 if not q.weight and nodes[q.onnx_node].op_type == "QuantizeLinear"}
        exact_kinds = (onnx.TensorProto.BOOL, onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        for seq in (int(s) for s in args.seq.split(",")):
            feeds = realnets.sentences_feeds(args.eval, seq_len=seq, split="eval")
            mil_feeds = {i.coreml_name: feeds[i.onnx_name].astype(np.int32) for i in lowered.inputs}
            trace: dict = {}
            got = run_program(program, mil_feeds, trace)[0]  # end to end (differences compound)
            exact = {t: lowering.mil_identifier(t) for t, k in types.items() if k in exact_kinds}
            exact = {t: m for t, m in exact.items() if m in trace and np.size(trace[m]) > 1}
            exposed = onnx.ModelProto()
            exposed.CopyFrom(model)
            exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in [*q_out, *exact])
            session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
            want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            chained = {t: _steps(trace[m], want[t]) for t, m in q_out.items()}
            layered: dict = {}  # layer by layer: each quantize op fed the canonical model's own inputs
            run_program(program, mil_feeds, layered, substitute={m: want[t] for t, m in q_out.items()})
            per_layer = {t: _steps(layered[m], want[t]) for t, m in q_out.items()}
            print(f"  sequence {seq}: layer by layer, largest difference {max(s.max() for s in per_layer.values())} "
                  f"step(s), worst within-one-step {min(np.mean(s <= 1) for s in per_layer.values()):.5%}, worst "
                  f"equal {min(np.mean(s == 0) for s in per_layer.values()):.5%}")
            worst_steps = max(int(s.max()) for s in chained.values())
            worst_equal = min(float(np.mean(s == 0)) for s in chained.values())
            exact_equal = sum(np.array_equal(trace[m].astype(np.int64), want[t].astype(np.int64))
                              for t, m in exact.items())
            reference = want[model.graph.output[0].name]
            cosine = (got * reference).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1))
            print(f"  sequence {seq}, {args.eval} sentences, whole program (compounding): {len(q_out)} int8 tensors, "
                  f"largest difference "
                  f"{worst_steps} step(s), worst equal fraction {worst_equal:.5%}; integer/boolean tensors equal: "
                  f"{exact_equal}/{len(exact)}; embedding cosine mean {cosine.mean():.6f} min {cosine.min():.6f}")


if __name__ == "__main__":
    main()
