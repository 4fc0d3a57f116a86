"""Already-quantized models: a canonical one lowered as given, NNCF's made canonical exactly,
onnxruntime.quantization's refused naming the node (and built with --requantize)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit import data, model as modelmod
from deploykit.canonical import CalibrationTable, lint, model_profile
from deploykit.cli import main
from deploykit.pipeline import BuildOptions, build
from deploykit.quantize.adopt import NotCanonical, adopt, dequantize, is_quantized


def _calib_reader(files, n: int = 64):
    from onnxruntime.quantization import CalibrationDataReader

    x = np.load(files.calib)["x"][:n]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x[i:i + 8]} for i in range(0, n, 8)])

        def get_next(self):  # noqa: ANN201 -- onnxruntime's interface
            return next(self.items, None)

    return Reader()


@pytest.fixture(scope="module")
def ort_qdq(digits_files, tmp_path_factory) -> dict[str, Path]:
    """The digits CNN quantized by onnxruntime.quantization (QDQ): its default (uint8 activations,
    per-tensor weights) and the per-channel symmetric int8 settings closest to the contract."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    root = tmp_path_factory.mktemp("ortq")
    out = {"default": root / "default.onnx", "symmetric": root / "symmetric.onnx"}
    quantize_static(str(digits_files.model), str(out["default"]), _calib_reader(digits_files),
                    quant_format=QuantFormat.QDQ)
    quantize_static(str(digits_files.model), str(out["symmetric"]), _calib_reader(digits_files),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


@pytest.fixture(scope="module")
def nncf_qdq(digits_files, tmp_path_factory) -> Path:
    """The digits CNN as NNCF quantizes it: the input the adoption tests start from, kept in
    the suite's cache (deploykit.testing.cache), keyed by the FP32 model, the calibration
    samples, this file and the versions of NNCF and what it runs on (importing NNCF and
    quantizing cost ~3 s of CPU)."""
    from deploykit.testing import cache, skip_unless_installed

    skip_unless_installed("nncf", reason="NNCF is the anchor quantizer (pip install nncf)")
    x = np.load(digits_files.calib)["x"][:64]

    def make(out: Path) -> None:
        import nncf

        dataset = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda a: {"x": a})
        onnx.save(nncf.quantize(onnx.load(str(digits_files.model)), dataset, subset_size=64), str(out))

    key = [digits_files.model.read_bytes(), x.tobytes(), Path(__file__).read_bytes(),
           cache.versions(("nncf", "onnx", "onnxruntime", "openvino", "torch", "numpy"))]
    entry = cache.cached_file("inputs", "digits-nncf", key, ".onnx", make)
    path = tmp_path_factory.mktemp("nncf") / "digits_nncf.onnx"
    path.write_bytes(entry.read_bytes())
    return path


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from deploykit.ortsession import session

    return np.asarray(session(model, exact=True).run(None, {"x": x})[0])  # exact Q/DQ


def _source(files, model: onnx.ModelProto):
    return data.open_source(str(files.calib), modelmod.input_specs(model), None, 128)


def test_nncf_model_adopted_with_the_same_outputs(nncf_qdq, digits_files):
    original = onnx.load(str(nncf_qdq))
    assert is_quantized(original) and lint(original)  # NNCF's model is not canonical as written
    taken = adopt(original, calib=_source(digits_files, original), source_hash="abc")
    assert taken.status == "adopted" and lint(taken.model) == []
    # NNCF puts uint8 after ReLU: the same grid as int8 with zero point -128, so asymmetric
    assert model_profile(taken.model) == "asymmetric" and any("uint8" in c for c in taken.changes)
    x = np.load(digits_files.eval)["x"]
    np.testing.assert_array_equal(_run(taken.model, x), _run(original, x))  # not one value changed
    # the table holds every float tensor, the model's own scales where it quantizes
    table = CalibrationTable.from_model(taken.model)
    for node in (n for n in taken.model.graph.node if n.op_type == "QuantizeLinear"):
        scale = onnx.numpy_helper.to_array(next(i for i in taken.model.graph.initializer if i.name == node.input[1]))
        assert table.scale(node.input[0]) == pytest.approx(float(scale), rel=1e-7)
    assert len(table) >= len([n for n in taken.fp32.graph.node if n.op_type in ("Conv", "Relu", "Add", "Gemm")])


@pytest.mark.parametrize("kind", ["default", "symmetric"])
def test_onnxruntime_qdq_refused_naming_the_node(kind, ort_qdq):
    model = onnx.load(str(ort_qdq[kind]))
    with pytest.raises(NotCanonical) as exc:
        adopt(model, where=kind)
    message = str(exc.value)
    # the first node that breaks the contract, and why
    assert "'" in message and "--requantize" in message and "\n" not in message
    assert any(n.name in message for n in model.graph.node)


def test_onnxruntime_qdq_built_with_requantize(ort_qdq, digits_files, ort_registry, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["build", str(ort_qdq["default"]), "--target", "onnxruntime", "--calib", str(digits_files.calib),
            "--eval", str(digits_files.eval), "--no-baseline", "--out", str(tmp_path / "refused")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploykit: error: ") and "--requantize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused" / "manifest.json").exists()
    result = build(ort_qdq["default"], BuildOptions(targets=["onnxruntime"], out_dir=tmp_path / "requantized",
                                                    calib=str(digits_files.calib), eval=str(digits_files.eval),
                                                    baseline=False, requantize=True), ort_registry)
    (target,) = result.targets
    assert target.status == "ok", target.reason
    assert lint(onnx.load(str(result.canonical.path))) == []
    assert result.manifest["calibration"]["method"] == "minmax"  # calibrated again, from its float reference
    assert not is_quantized(onnx.load(str(result.canonical.fp32_path)))


def test_calibration_options_refused_for_a_quantized_model(nncf_qdq, digits_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["build", str(nncf_qdq), "--target", "onnxruntime", "--calib", str(digits_files.calib),
                 "--keep-float", "Gemm", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--keep-float does not apply" in err and "--requantize" in err


@pytest.mark.slow
def test_canonical_model_built_twice_gives_identical_artifacts(nncf_qdq, digits_files, tmp_path):
    """The adopted model is canonical: built again it is lowered as given (byte for byte), and
    two builds of it give the same artifacts."""
    first = build(nncf_qdq, BuildOptions(targets=["onnxruntime", "openvino"], out_dir=tmp_path / "first",
                                         calib=str(digits_files.calib), eval=str(digits_files.eval), baseline=False))
    assert all(t.status == "ok" for t in first.targets), [(t.target.name, t.reason) for t in first.targets]
    adoption = first.manifest["quantization"]["adoption"]
    assert adoption["source"] == "adopted" and adoption["changes"]
    canonical = first.canonical.path
    runs = []
    for name in ("again", "again2"):
        result = build(canonical, BuildOptions(targets=["onnxruntime", "openvino"], out_dir=tmp_path / name,
                                               calib=str(digits_files.calib), eval=str(digits_files.eval),
                                               baseline=False))
        assert all(t.status == "ok" for t in result.targets), [(t.target.name, t.reason) for t in result.targets]
        assert result.manifest["quantization"]["adoption"]["source"] == "canonical"
        assert filecmp.cmp(result.canonical.path, canonical, shallow=False)  # lowered as it is
        # the FP32 reference beside it is the one the first build wrote (not dequantized weights)
        assert filecmp.cmp(result.canonical.fp32_path, first.canonical.fp32_path, shallow=False)
        runs.append(result)
    for a, b in zip(runs[0].targets, runs[1].targets):
        assert a.artifact is not None and b.artifact is not None
        files_a = sorted(p for p in Path(a.artifact.path).parent.rglob("*") if p.is_file())
        files_b = sorted(p for p in Path(b.artifact.path).parent.rglob("*") if p.is_file())
        assert [p.name for p in files_a] == [p.name for p in files_b]
        for fa, fb in zip(files_a, files_b):
            if fa.suffix == ".xml":  # OpenVINO numbers the constants it creates per process: same graph
                assert _unnumbered(fa) == _unnumbered(fb), fa.name
            else:
                assert filecmp.cmp(fa, fb, shallow=False), fa.name
        scales = next(c for c in a.checks if c.name == "scales_match")
        assert scales.status == "pass"


def test_a_quantized_model_built_without_calibration_data_has_no_random_data_warning(nncf_qdq, digits_files,
                                                                                     tmp_path, capsys):
    """No --calib: a quantized model keeps its own scales, so nothing was calibrated on random
    data and neither the manifest nor the report may say so."""
    result = build(nncf_qdq, BuildOptions(targets=["onnxruntime"], out_dir=tmp_path / "out",
                                          eval=str(digits_files.eval), baseline=False))
    assert [t.status for t in result.targets] == ["ok"]
    calibration = result.manifest["calibration"]
    assert calibration["random_data"] is False and calibration["warning"] == ""
    assert "random data" not in (tmp_path / "out" / "report.md").read_text()


def _unnumbered(path: Path) -> str:
    import re

    return re.sub(r'name="([A-Za-z]+)_[0-9]+"', r'name="\1_N"', path.read_text())


def test_dequantize_gives_the_float_reference(nncf_qdq, digits_files):
    model = onnx.load(str(nncf_qdq))
    fp32 = dequantize(model)
    assert not is_quantized(fp32)
    x = np.load(digits_files.eval)["x"]
    reference = _run(onnx.load(str(digits_files.model)), x)
    got = _run(fp32, x)
    # int8 weights only (activations float): within weight quantization of the original
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.97
