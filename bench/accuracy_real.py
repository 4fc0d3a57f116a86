"""Accuracy on real pretrained networks: deploykit against onnxruntime.quantization and NNCF,
on the same model and the same real data, in the same run.

    python bench/accuracy_real.py --nets cnn,encoder [--calib 512] [--eval 512] [--no-nncf] [--json out.json]

- cnn: EfficientNet-Lite0 (ImageNet, depthwise convolutions, ReLU6) on photo crops from
  scikit-image; metric: top-1 agreement with FP32.
- encoder: all-MiniLM-L6-v2 on sentences from Python's own docs (sequence 64); metric: mean
  cosine of the mean-pooled embeddings with FP32.

deploykit calibrates once (ranges and histograms) and every deploykit row is placed from those
same statistics with ``requantize`` (no re-calibration); each canonical model is lowered by the
real onnxruntime and OpenVINO backends (default options; for the CNN also OpenVINO's other
``overflow_fix`` modes) and run there; the ``canonical`` column is the canonical model itself
(exact Q/DQ semantics), what the runtimes' integer kernels are judged against. Anchors: onnxruntime.quantization
(``quantize_static``, MinMax, per-channel; uint8 asymmetric and int8 symmetric activations;
MatMul only for the encoder) run in onnxruntime and OpenVINO; NNCF (``nncf.quantize`` on the
ONNX model: default and mixed presets; the transformer model type, i.e. SmoothQuant, for the
encoder). Calibration and evaluation data never overlap. Needs the ``realnets`` and ``bench``
extras. Scratch files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

Feeds = dict[str, np.ndarray]


def batches(feeds: Feeds, size: int) -> list[Feeds]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def run_ort(path_or_bytes: Any, feeds: Feeds, size: int = 16) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {k: b[k] for k in names})[0] for b in batches(feeds, size)])


def run_openvino(path: Path, feeds: Feeds, size: int = 16) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [i.get_any_name() for i in compiled.inputs]
    return np.concatenate([np.asarray(compiled({k: b[k] for k in names})[compiled.outputs[0]])
                           for b in batches(feeds, size)])


def run_backend(backend_name: str, canonical: Any, feeds: Feeds, workdir: Path, **options: Any) -> np.ndarray:
    """Lower the canonical model with the real backend plugin (default options unless given)
    and run the artifact."""
    from deploykit.plugins import load_registry
    from deploykit.testing import make_target

    backend_cls = load_registry().backends[backend_name]
    backend = backend_cls()
    target = make_target(backend_cls, **options)
    tag = "".join(f"_{v}" for v in options.values())
    dest = workdir / f"{backend_name}{tag}{backend.artifact_suffix}"
    artifact = backend.lower(canonical, target, dest)
    with backend.load(artifact, target) as runner:
        return np.concatenate([runner.run(b)[0] for b in batches(feeds, 16)])


def run_canonical_exact(path: Path, feeds: Feeds) -> np.ndarray:
    """The canonical model's own semantics (onnxruntime, graph optimizations off: exact Q/DQ)."""
    from deploykit.reference import canonical_runner

    runner = canonical_runner(path)
    return np.concatenate([runner.run(b)[0] for b in batches(feeds, 16)])


# ---------------------------------------------------------------------------------------- anchors
def ort_quantization(fp32_path: Path, calib: Feeds, workdir: Path, symmetric: bool, matmul_only: bool) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches(calib, 1))

        def get_next(self) -> Feeds | None:
            return next(self.it, None)

    pre = workdir / "pre.onnx"
    cwd = os.getcwd()
    os.chdir(workdir)  # quant_pre_process writes temporary files into the current folder
    try:
        if not pre.exists():
            try:
                quant_pre_process(str(fp32_path), str(pre), auto_merge=True)
            except Exception:  # noqa: BLE001 -- symbolic shape inference fails on some exports: quantize the model as it is
                pre.write_bytes(Path(fp32_path).read_bytes())
        tag = ("int8sym" if symmetric else "uint8") + ("_matmul" if matmul_only else "")
        out = workdir / f"ortq_{tag}.onnx"
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"] if matmul_only else None,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        os.chdir(cwd)
    return out


def nncf_quantize(fp32_path: Path, calib: Feeds, workdir: Path, preset: str, transformer: bool) -> Path:
    import nncf

    model = onnx.load(str(fp32_path))
    n = len(next(iter(calib.values())))
    dataset = nncf.Dataset(batches(calib, 1))
    kwargs: dict[str, Any] = {"subset_size": n}
    kwargs["preset"] = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, dataset, **kwargs)
    out = workdir / f"nncf_{preset}{'_transformer' if transformer else ''}.onnx"
    onnx.save(quantized, str(out))
    return out


# ---------------------------------------------------------------------------------------- the bench
def net_setup(net: str, n_calib: int, n_eval: int) -> tuple[Path, Feeds, Feeds, str, Callable]:
    from deploykit.testing import realnets

    if net == "cnn":
        path = realnets.efficientnet_lite0()
        calib = {"input": realnets.photo_crops(n_calib, split="calib")}
        evaluation = {"input": realnets.photo_crops(n_eval, split="eval")}
        return path, calib, evaluation, "top1_agreement", realnets.top1_agreement
    path = realnets.minilm("dynamo")
    calib = realnets.sentences_feeds(n_calib, split="calib")
    evaluation = realnets.sentences_feeds(n_eval, split="eval")
    return path, calib, evaluation, "cosine", realnets.mean_cosine


def bench_net(net: str, n_calib: int, n_eval: int, use_nncf: bool, root: Path, configs: list[tuple[str, ...]],
              overflow_modes: list[str]) -> list[dict]:
    from deploykit import data, model as modelmod
    from deploykit.quantize import quantize, requantize, write_canonical

    path, calib, evaluation, metric_name, metric = net_setup(net, n_calib, n_eval)
    work = root / net
    work.mkdir(parents=True, exist_ok=True)
    fp32 = modelmod.normalise(modelmod.load_onnx(path), str(path))
    fp32_path = work / "fp32.onnx"
    onnx.save(fp32, str(fp32_path))
    ref = run_ort(fp32_path, evaluation)
    ref_ov = run_openvino(fp32_path, evaluation)
    rows: list[dict] = []

    def row(name: str, onnxruntime: float | None, openvino: float | None, seconds: float, note: str = "",
            **extra: float | None) -> None:
        r = {"net": net, "metric": metric_name, "what": name, "onnxruntime": onnxruntime, "openvino": openvino,
             **extra, "seconds": round(seconds, 1), "note": note}
        rows.append(r)

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        more = "".join(f"  {k} {fmt(v)}" for k, v in extra.items())
        print(f"{net:8s} {name:48s} onnxruntime {fmt(onnxruntime)}  openvino {fmt(openvino)}{more}  "
              f"({seconds:.0f} s) {note}", flush=True)

    row("FP32 (OpenVINO f32 vs onnxruntime)", 1.0, metric(ref, ref_ov), 0.0)

    # deploykit: one calibration (ranges + histograms), every row placed from those statistics
    t0 = time.monotonic()
    source = data.open_source(lambda: batches(calib, 16), modelmod.input_specs(fp32))
    from deploykit.quantize.observe import needs_histograms

    first = next((m for m, *_ in configs if needs_histograms(m)), "minmax")  # histograms only when a row needs them
    observed = quantize(fp32, source, first, batch_size=16)
    calib_s = time.monotonic() - t0
    what = "ranges + histograms" if needs_histograms(first) else "ranges"
    print(f"{net}: deploykit calibration ({what}, {n_calib} samples): {calib_s:.0f} s", flush=True)
    for method, profile, *rest in configs:
        t0 = time.monotonic()
        recipe = rest[0] if rest else "none"
        if recipe == "none":
            result = requantize(observed, fp32, method=method, activations=profile)
        else:  # a recipe rewrites the graph or the weights: its own calibration
            result = quantize(fp32, source, method, batch_size=16, activations=profile, recipe=recipe)
        d = work / f"dk_{method}_{profile}_{recipe.replace(':', '').replace(',', '_')}"
        d.mkdir(exist_ok=True)
        canonical = write_canonical(result, fp32, d)
        values: dict[str, float | None] = {}
        runs: list[tuple[str, str, dict[str, Any]]] = [("onnxruntime", "onnxruntime", {}), ("openvino", "openvino", {})]
        if net == "cnn":  # OpenVINO's overflow fix for CPUs without VNNI (default auto), each mode
            runs += [(f"openvino[{m}]", "openvino", {"overflow_fix": m}) for m in overflow_modes]
        for label, backend, options in runs:
            try:
                values[label] = metric(ref, run_backend(backend, canonical, evaluation, d, **options))
            except Exception as exc:  # noqa: BLE001 -- one failing backend must not lose the others
                print(f"  {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                values[label] = None
        values["canonical"] = metric(ref, run_canonical_exact(canonical.path, evaluation))
        label = f"deploykit {method}, {profile}" + (f", {result.recipe}" if recipe != "none" else "")
        row(label, values.pop("onnxruntime"), values.pop("openvino"), time.monotonic() - t0, **values)

    matmul_only = net == "encoder"
    for symmetric in (False, True):
        t0 = time.monotonic()
        name = f"onnxruntime.quantization {'int8 symmetric' if symmetric else 'uint8 asymmetric'}" + (
            ", MatMul only" if matmul_only else "")
        try:
            q = ort_quantization(fp32_path, calib, work, symmetric, matmul_only)
            row(name, metric(ref, run_ort(q, evaluation)), metric(ref, run_openvino(q, evaluation)), time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 -- an anchor that fails is a row, not a crash
            row(name, None, None, time.monotonic() - t0, f"failed: {type(exc).__name__}: {str(exc)[:120]}")

    if use_nncf:
        variants = [("default", net == "encoder"), ("mixed", net == "encoder")]
        for preset, transformer in variants:
            t0 = time.monotonic()
            name = f"NNCF {preset} preset" + (" (transformer: SmoothQuant)" if transformer else "")
            try:
                q = nncf_quantize(fp32_path, calib, work, preset, transformer)
                row(name, metric(ref, run_ort(q, evaluation)), metric(ref, run_openvino(q, evaluation)),
                    time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 -- an anchor that fails is a row, not a crash
                row(name, None, None, time.monotonic() - t0, f"failed: {type(exc).__name__}: {str(exc)[:120]}")
    return rows


DEFAULT_CONFIGS = [("minmax", "asymmetric"), ("minmax", "symmetric"), ("entropy", "symmetric"),
                   ("entropy", "asymmetric"), ("mse", "asymmetric"), ("percentile", "asymmetric"),
                   ("minmax", "asymmetric", "auto")]  # auto: the default recipe of each kind of network


def parse_configs(spec: str) -> list[tuple[str, ...]]:
    """``method:profile[:recipe],...``; a recipe's own commas stay in it (a piece that does not
    start with a calibration method continues the previous row's recipe):
    ``minmax:asymmetric:smoothquant:0.9,gptq,minmax:asymmetric:auto`` is two rows."""
    from deploykit.quantize.observe import METHODS

    rows: list[list[str]] = []
    for piece in spec.split(","):
        if rows and piece.split(":", 1)[0] not in METHODS and len(rows[-1]) == 3:
            rows[-1][2] += "," + piece
        else:
            rows.append(piece.split(":", 2))
    return [tuple(r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="cnn,encoder", help="comma-separated: cnn, encoder")
    ap.add_argument("--calib", type=int, default=512, help="calibration samples")
    ap.add_argument("--eval", type=int, default=512, help="held-out evaluation samples")
    ap.add_argument("--no-nncf", action="store_true", help="skip the NNCF anchors")
    ap.add_argument("--configs", default="", help="deploykit rows as method:profile[:recipe],... e.g. "
                    "minmax:asymmetric:bias_correction, minmax:asymmetric:smoothquant:0.9,gptq (default: six, plus the "
                    "default recipe of each net)")
    ap.add_argument("--overflow", default="none,all", help="OpenVINO overflow_fix modes measured as extra columns "
                    "of the CNN's deploykit rows, besides the default (auto); empty: none")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    from deploykit.testing import realnets

    missing = realnets.missing_packages("all")
    if missing:
        print(f"missing packages {missing}: {realnets.INSTALL_HINT}", file=sys.stderr)
        return 2
    configs = parse_configs(args.configs) if args.configs else DEFAULT_CONFIGS
    print(f"load average {os.getloadavg()[0]:.1f}; calib {args.calib}, eval {args.eval}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="deploykit-accuracy-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for net in [n.strip() for n in args.nets.split(",") if n.strip()]:
            rows += bench_net(net, args.calib, args.eval, not args.no_nncf, Path(tmp), configs,
                              [m for m in args.overflow.split(",") if m])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
