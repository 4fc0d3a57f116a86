"""Quantization-aware training on real pretrained networks, against PTQ and the anchors, in one run.

    python bench/qat_real.py --net cnn --train 2000 --calib 128 --eval 500 --budget 900 --lower onnxruntime,openvino,tflite,coreml
    python bench/qat_real.py --net encoder --train 1000 --calib 128 --eval 256 --budget 600 --lower onnxruntime,openvino

- cnn: EfficientNet-Lite0 (ImageNet, depthwise convolutions, ReLU6) on photo crops from
  scikit-image (training and calibration crops from one index range, evaluation crops from a
  disjoint one); metric: top-1 agreement with FP32.
- encoder: all-MiniLM-L6-v2 on sentences from Python's own docs (sequence 64; training sentences from
  the language reference's calibration half and the standard library's docstrings, evaluation
  sentences from the reference's other half); metric: mean
  cosine of the mean-pooled embeddings with FP32.

Rows, all on the same evaluation data, every model run in onnxruntime with exact Q/DQ
semantics (graph optimisations off: what the canonical model means, before any backend):
deploykit PTQ (minmax, symmetric and asymmetric activations, the build's default recipe);
onnxruntime.quantization (QDQ, per-channel, uint8 and int8 symmetric activations); NNCF
(default preset; the transformer model type for the encoder); deploykit QAT (``prepare`` with
the same calibration and the build's recipe, ``distill`` on the unlabeled training inputs
within ``--budget`` wall seconds and ``--cpu-budget`` CPU seconds, ``export``; asymmetric
activations by default, which onnxruntime, OpenVINO, TFLite and Core ML lower). ``--lower``
then builds the exported model with ``deploykit build`` as given and reports each target's
agreement with FP32 and whether every scale was kept (``scales_match``). Scratch files go
to ``--work`` (default: a temporary folder). Needs the ``realnets``, ``bench`` and ``qat`` extras.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))

from accuracy_real import batches, nncf_quantize, ort_quantization  # noqa: E402

Feeds = dict[str, np.ndarray]


def run_exact(model: Any, feeds: Feeds, size: int = 16) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {k: b[k] for k in names})[0] for b in batches(feeds, size)])


def heldout_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL divergence of the candidate's softmax from the reference's (nats per input)."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return np.asarray(x - np.log(np.exp(x).sum(-1, keepdims=True)))

    p, q = log_softmax(reference), log_softmax(candidate)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def margins(reference: np.ndarray) -> np.ndarray:
    """FP32's logit margin per input: its top-1 logit minus its top-2."""
    top = np.sort(reference, -1)
    return np.asarray(top[:, -1] - top[:, -2])


def decided_agreement(reference: np.ndarray, candidate: np.ndarray, margin: float) -> tuple[float, float]:
    """(share of inputs whose FP32 margin exceeds ``margin``, top-1 agreement on those): agreement
    on crops FP32 itself hardly decides (top-2 logits within a few hundredths) moves with any
    perturbation, so this separates the quantized model's errors from the eval set's ties."""
    decided = margins(reference) > margin
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return float(decided.mean()), float(agree[decided].mean()) if decided.any() else float("nan")


def setup(net: str, n_train: int, n_calib: int, n_eval: int) -> dict[str, Any]:
    from deploykit.testing import realnets

    if net == "cnn":
        module = realnets.efficientnet_lite0_module()
        train = {"input": realnets.photo_crops(n_train, split="calib")}
        evaluation = {"input": realnets.photo_crops(n_eval, split="eval")}
        return {"module": module, "onnx": realnets.efficientnet_lite0(), "train": train,
                "calib": {k: v[:n_calib] for k, v in train.items()}, "eval": evaluation, "names": ["input"],
                "metric": "top1_agreement", "score": realnets.top1_agreement, "loss": "kl", "transformer": False}
    module = realnets.minilm_module()
    # "train": the language reference's calibration half plus the standard library's docstrings
    # (~5,600 distinct sentences, none held out); the calibration half alone repeats after ~1,450.
    train = realnets.sentences_feeds(n_train, split="train")
    evaluation = realnets.sentences_feeds(n_eval, split="eval")
    names = list(realnets.ENCODER_INPUTS)
    return {"module": module, "onnx": realnets.minilm("dynamo"), "train": train,
            "calib": {k: v[:n_calib] for k, v in train.items()}, "eval": evaluation, "names": names,
            "metric": "cosine", "score": realnets.mean_cosine, "loss": "cosine", "transformer": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", choices=["cnn", "encoder"], default="cnn")
    ap.add_argument("--train", type=int, default=2000, help="unlabeled training inputs for distill")
    ap.add_argument("--calib", type=int, default=128, help="calibration inputs (the first of the training ones)")
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--budget", type=float, default=900.0, help="wall seconds of distillation at most")
    ap.add_argument("--cpu-budget", type=float, default=None,
                    help="CPU seconds of distillation at most (this process, all threads; 2 cores x 15 min = 1800): "
                         "on a shared machine a wall budget buys fewer steps than idle cores would")
    ap.add_argument("--warmup", type=float, default=0.0, help="fraction of the run the learning rate rises over")
    ap.add_argument("--loss", default=None, help="distill loss (default: kl for cnn, cosine for encoder)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="distill's seed (the order it draws the training inputs in)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--learn-scales", action="store_true", help="prepare(learn_scales=True): LSQ activation scales")
    ap.add_argument("--learn-smoothing", action="store_true",
                    help="prepare(learn_smoothing=True): SmoothQuant's per-channel factors train too")
    ap.add_argument("--scale-lr", type=float, default=None, help="distill(scale_lr=...): default 10 x --lr")
    ap.add_argument("--activations", choices=["symmetric", "asymmetric"], default="asymmetric",
                    help="QAT's activation profile (asymmetric lowers to onnxruntime, OpenVINO, TFLite, Core ML)")
    ap.add_argument("--recipe", default="auto", help="prepare(recipe=...): the build's float rewrites first")
    ap.add_argument("--keep-float", default="", help="comma-separated submodules QAT keeps float, such as _conv_stem "
                                                     "(prepare(keep_float=...): float islands the export declares)")
    ap.add_argument("--temperature", type=float, default=1.0, help="distill's KL temperature (cnn)")
    ap.add_argument("--no-anchors", action="store_true", help="skip onnxruntime.quantization and NNCF")
    ap.add_argument("--no-ptq", action="store_true", help="skip deploykit's own PTQ rows too (QAT rows only)")
    ap.add_argument("--lower", default="", help="comma-separated targets to build the QAT export for")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import os

    import torch

    from deploykit import data, model as modelmod, qat
    from deploykit.quantize import quantize, requantize

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = args.work or Path(tempfile.mkdtemp(prefix="qat-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    s = setup(args.net, args.train, args.calib, args.eval)
    score, metric = s["score"], s["metric"]
    fp32 = modelmod.normalise(modelmod.load_onnx(s["onnx"]), str(s["onnx"]))
    fp32_path = work / "fp32.onnx"
    onnx.save(fp32, str(fp32_path))
    reference = run_exact(fp32, s["eval"])
    rows: list[dict[str, Any]] = []

    # the last evaluate()'s held-out KL and agreement where FP32's margin > 0.5 (classifiers):
    # steadier than agreement on every crop, where the eval set's near-ties weigh in
    fit_note: list[str] = []
    if args.net == "cnn":
        gap = margins(reference)
        print(f"FP32 on the {len(gap)} eval crops: logit margin (top-1 - top-2) <= 0.1 on {np.mean(gap <= 0.1):.1%}, "
              f"<= 0.5 on {np.mean(gap <= 0.5):.1%}; median top-1 probability "
              f"{np.median(1.0 / np.exp(reference - reference.max(-1, keepdims=True)).sum(-1)):.2f}", flush=True)

    def evaluate(model: Any) -> float:
        out = run_exact(model, s["eval"])
        if args.net == "cnn":
            share, agree = decided_agreement(reference, out, 0.5)
            fit_note[:] = [f"held-out KL {heldout_kl(reference, out):.4f}; agreement {agree:.1%} on the {share:.0%} "
                             f"of crops with FP32 margin > 0.5"]
        return float(score(reference, out))

    def row(name: str, value: float, seconds: float, note: str = "") -> None:
        if fit_note:
            note = fit_note[0] + (f"; {note}" if note else "")
        rows.append({"row": name, metric: value, "seconds": round(seconds, 1), "note": note})
        print(f"{name:58s} {metric} {value:.4f}  ({seconds:.0f} s){'  ' + note if note else ''}", flush=True)

    print(f"{args.net}: {args.train} training / {args.calib} calibration / {args.eval} evaluation inputs; "
          f"setup {time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
    if not args.no_ptq:
        t = time.monotonic()
        calib_src = data.open_source(lambda: [s["calib"]], modelmod.input_specs(fp32))
        ptq = quantize(fp32, calib_src, "minmax", activations="symmetric", recipe="auto")
        row(f"deploykit PTQ minmax, symmetric, recipe {ptq.recipe}", evaluate(ptq.model),
            time.monotonic() - t)
        t = time.monotonic()
        asym = requantize(ptq, fp32, activations="asymmetric")
        row(f"deploykit PTQ minmax, asymmetric, recipe {ptq.recipe}", evaluate(asym.model),
            time.monotonic() - t)
    if not args.no_anchors:
        for symmetric in (False, True):
            t = time.monotonic()
            path = ort_quantization(fp32_path, s["calib"], work, symmetric, matmul_only=s["transformer"])
            row(f"onnxruntime.quantization per-channel, {'int8 symmetric' if symmetric else 'uint8'}",
                evaluate(onnx.load(str(path))), time.monotonic() - t)
        t = time.monotonic()
        path = nncf_quantize(fp32_path, s["calib"], work, "performance", s["transformer"])
        row("NNCF default preset" + (", transformer" if s["transformer"] else ""),
            evaluate(onnx.load(str(path))), time.monotonic() - t)

    t = time.monotonic()
    example = tuple(torch.from_numpy(s["calib"][k][:2]) for k in s["names"])
    cpu = time.process_time()  # CPU seconds of this process (both cores): the budget on a shared machine
    prepared = qat.prepare(s["module"], example, s["calib"], input_names=s["names"], learn_scales=args.learn_scales,
                           learn_smoothing=args.learn_smoothing, activations=args.activations, recipe=args.recipe,
                           keep_float=[x.strip() for x in args.keep_float.split(",") if x.strip()])
    t_prepare, c_prepare = time.monotonic() - t, time.process_time() - cpu
    t = time.monotonic()
    before = qat.export(prepared, work / "untrained.qdq.onnx")
    row(f"deploykit QAT export before training ({args.activations}, recipe {prepared.recipe})",
        evaluate(onnx.load(str(before))), time.monotonic() - t,
        f"prepare {t_prepare:.0f} s")
    t = time.monotonic()
    cpu = time.process_time()
    qat.distill(prepared, s["train"], epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                loss=args.loss or s["loss"], budget_s=args.budget, cpu_budget_s=args.cpu_budget,
                warmup=args.warmup, temperature=args.temperature, scale_lr=args.scale_lr, seed=args.seed)
    t_distill, c_distill = time.monotonic() - t, time.process_time() - cpu
    seen = len(prepared.history) * args.batch
    t, cpu = time.monotonic(), time.process_time()
    path = qat.export(prepared, work / f"{args.net}_qat.qdq.onnx")
    t_export, c_export = time.monotonic() - t, time.process_time() - cpu
    row(f"deploykit QAT: distill {len(prepared.history)} steps x {args.batch}", evaluate(onnx.load(str(path))),
        t_prepare + t_distill + t_export,
        f"prepare {t_prepare:.0f} s + distill {t_distill:.0f} s ({min(seen, args.train)} distinct inputs seen) "
        f"+ export {t_export:.0f} s wall; CPU {c_prepare:.0f} + {c_distill:.0f} + {c_export:.0f} s; load average "
        f"{os.getloadavg()[0]:.1f}; loss {np.mean(prepared.history[:10]):.4g} -> {np.mean(prepared.history[-10:]):.4g}")

    targets = [x.strip() for x in args.lower.split(",") if x.strip()]
    lowered: list[dict[str, Any]] = []
    if targets:
        from deploykit.pipeline import BuildOptions, build

        np.savez(work / "eval.npz", **s["eval"])
        t = time.monotonic()
        result = build(path, BuildOptions(targets=targets, out_dir=work / "build", eval=str(work / "eval.npz"),
                                          eval_samples=args.eval, baseline=False,
                                          task="classification" if args.net == "cnn" else "other"))
        print(f"build of the QAT export as given ({result.manifest['quantization']['adoption']['source']}): "
              f"{time.monotonic() - t:.0f} s", flush=True)
        for target in result.targets:
            checks = {c.name: c for c in target.checks}
            value = checks.get(metric).value if metric in checks else None
            scales = checks.get("scales_match")
            entry = {"target": target.target.name, "status": target.status, metric: value,
                     "scales_match": scales.status if scales else None,
                     "scales_note": (scales.message if scales else "")[:200]}
            lowered.append(entry)
            shown = f"{value:.4f}" if isinstance(value, float) else "not run"
            print(f"  {entry['target']:12s} {entry['status']:8s} {metric} {shown}  scales_match "
                  f"{entry['scales_match']}  {entry['scales_note']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"net": args.net, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "lowered": lowered}, indent=2))
    print(f"total {time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}; work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
