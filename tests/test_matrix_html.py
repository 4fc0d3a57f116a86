"""The matrix's HTML report in a real headless browser (Debian's chromium): it loads offline
without script errors, every plot draws its data, and a screenshot is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deploykit.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "deploykit" / "samples"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium here: apt-get install -y chromium (.ci/run installs it)")


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args], check=False, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_html_report_renders_offline_in_headless_chromium(tmp_path, monkeypatch):
    browser = _chromium()
    monkeypatch.setenv("DEPLOYKIT_DB", str(tmp_path / "h.sqlite"))
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "m.toml"
    spec.write_text(f'[[models]]\nname = "digits"\npath = "{SAMPLES / "digits_cnn.onnx"}"\n'
                    f'calib = "{SAMPLES / "digits_calib.npz"}"\neval = "{SAMPLES / "digits_eval.npz"}"\n'
                    '[matrix]\ntargets = ["onnxruntime"]\nbatch_sizes = [1, 2]\nrounds = 2\nwarmup = 1\n'
                    'min_round_ms = 5\neval_samples = 64\n')
    out = tmp_path / "out"
    assert main(["matrix", str(spec), "--out", str(out), "--json"]) == 0
    page = out / "matrix.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", text), "the report must not load scripts from the network"
    assert "cdn" not in text.split("<script type=\"text/javascript\">")[0].lower()

    # one browser run: the DOM after the page's scripts ran (stdout) and a screenshot of it
    shot = tmp_path / "shot.png"
    dom = _headless(browser, "--window-size=1280,1600", f"--screenshot={shot}", "--dump-dom", page.as_uri()).stdout
    status = re.search(r'<div id="dk-status" data-plots="(\d+)" data-rendered="(\d+)" data-errors="(\d+)"', dom)
    assert status, "the page's own check did not run (script error before load?)"
    plots, rendered, errors = map(int, status.groups())
    assert plots == 3 and rendered == plots and errors == 0, dom[dom.find('id="dk-errors"'):][:500]

    from PIL import Image

    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    non_white = sum(histogram[:240]) / (image.width * image.height)
    assert non_white > 0.02, f"screenshot is blank ({non_white:.1%} non-white pixels)"
    colours = len(set(Image.open(shot).convert("RGB").getdata()))
    assert colours > 50  # plots drew coloured markers, not just text
    doc = json.loads((out / "matrix.json").read_text())
    assert len(doc["cells"]) == 4
