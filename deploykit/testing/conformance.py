"""Backend conformance suite for plugin authors.

    from deploykit.testing.conformance import run_conformance
    def test_my_backend(tmp_path):
        run_conformance(MyBackend, tmp_path)

It lowers a small canonical model, checks the artifact and the backend's own verification,
runs the runner against the canonical model in onnxruntime (when this host can run the
backend), and feeds an op no backend knows to check the error is clear. Each failure is an
AssertionError saying which promise of the contract was broken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from deploykit.backend import Artifact, Availability, Backend, CanonicalModel, Runner
from deploykit.checks import compare
from deploykit.errors import DeploykitError
from deploykit.reference import run_canonical
from deploykit.targets import Target
from deploykit.testing.fixtures import eval_feeds, make_canonical, make_target

UNSUPPORTED_OP = "DeploykitConformanceUnsupportedOp"


@dataclass
class ConformanceReport:
    backend: str
    availability: Availability
    lowered: bool = False
    ran: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    unsupported_error: str = ""
    notes: list[str] = field(default_factory=list)


def run_conformance(backend_cls: type[Backend], workdir: Path | str, kind: str = "resnet",
                    min_cosine: float = 0.99, canonical: CanonicalModel | None = None,
                    **options: Any) -> ConformanceReport:
    workdir = Path(workdir)
    backend = backend_cls()
    target = make_target(backend_cls, **options)
    av = backend.probe(target)
    assert isinstance(av, Availability), f"{backend_cls.__name__}.probe must return Availability, got {av!r}"
    report = ConformanceReport(backend_cls.name, av)
    if not av.can_lower:
        assert av.reason, "an unavailable backend must say why (Availability.reason)"
        report.notes.append(f"not lowered: {av.reason}")
        return report
    canonical = canonical or make_canonical(kind, workdir / "canonical")
    artifact = check_lowering(backend, canonical, target, workdir / "artifact")
    report.lowered = True
    if av.can_run:
        report.metrics = check_runner_agrees(backend, artifact, target, canonical, kind, min_cosine)
        report.ran = True
    else:
        report.notes.append(f"not run: {av.reason}")
    report.unsupported_error = check_rejects_unsupported(backend, target, canonical, workdir / "unsupported", av.can_run)
    return report


def check_lowering(backend: Backend, canonical: CanonicalModel, target: Target, workdir: Path) -> Artifact:
    dest = workdir / f"{target.name}{backend.artifact_suffix}"
    artifact = backend.lower(canonical, target, dest)
    assert isinstance(artifact, Artifact), f"lower() must return an Artifact, got {artifact!r}"
    assert Path(artifact.path).exists(), f"lower() returned {artifact.path}, which does not exist"
    for f in artifact.files:
        assert Path(f).exists(), f"artifact file {f} does not exist"
    leftovers = [p.name for p in workdir.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"lower() left temporary files behind: {leftovers}"
    for check in artifact.checks:
        assert check.status in ("pass", "fail", "info", "not_run"), f"check {check.name}: bad status {check.status!r}"
        assert check.status != "fail", f"the backend's own verification failed: {check.name}: {check.message}"
    return artifact


def check_runner_agrees(backend: Backend, artifact: Artifact, target: Target, canonical: CanonicalModel, kind: str,
                        min_cosine: float) -> dict[str, float]:
    runner = backend.load(artifact, target)
    assert isinstance(runner, Runner), f"load() must return a deploykit.backend.Runner subclass, got {runner!r}"
    with runner:
        feeds = eval_feeds(kind, 4)
        want = run_canonical(canonical.path, feeds)
        got = [np.asarray(o) for o in runner.run(feeds)]
        assert len(got) == len(want), f"runner returned {len(got)} outputs, the canonical model has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape, f"output {i}: shape {g.shape}, canonical {w.shape} (NCHW in, canonical order out)"
        metrics = compare(want, got)
        assert metrics["cosine"] >= min_cosine, \
            f"runner disagrees with the canonical model: cosine {metrics['cosine']:.5f} < {min_cosine}"
        single = runner.run({k: v[:1] for k, v in feeds.items()})
        assert single[0].shape[0] == 1, "runner must accept batch size 1 as well as the calibration batch"
    return metrics


def unsupported_model(canonical: CanonicalModel) -> onnx.ModelProto:
    """The canonical model with an op no backend implements appended to its first output."""
    m = onnx.ModelProto()
    m.CopyFrom(canonical.model)
    out = m.graph.output[0]
    node = helper.make_node(UNSUPPORTED_OP, [out.name], [out.name + "_unsupported"], name="conformance_unsupported",
                            domain="deploykit.conformance")
    m.graph.node.append(node)
    out.name = out.name + "_unsupported"
    m.opset_import.append(helper.make_opsetid("deploykit.conformance", 1))
    return m


def check_rejects_unsupported(backend: Backend, target: Target, canonical: CanonicalModel, workdir: Path,
                              can_run: bool) -> str:
    """Lowering (or loading) a model with an unknown op must raise a DeploykitError naming it."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = unsupported_model(canonical)
    path = workdir / "unsupported.qdq.onnx"
    onnx.save(model, str(path))
    bad = CanonicalModel(path, model, canonical.calibration, canonical.fp32_path)
    dest = workdir / f"{target.name}{backend.artifact_suffix}"
    try:
        artifact = backend.lower(bad, target, dest)
        if can_run:
            backend.load(artifact, target).close()
    except DeploykitError as exc:
        msg = str(exc)
        assert "conformance_unsupported" in msg or UNSUPPORTED_OP in msg, \
            f"the error for an unsupported op must name the node or the op: {msg!r}"
        assert "\n" not in msg.strip(), f"the error must be one line: {msg!r}"
        return msg
    raise AssertionError(f"{backend.name}: an unsupported op ({UNSUPPORTED_OP}) was accepted without an error")
