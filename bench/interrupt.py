"""Ctrl-C at random points of a three-target build (onnxruntime, OpenVINO, TFLite), each
followed by a rerun of the same command.

A round misbehaves when the interrupted process does not exit 130 (or 0 if it had already
finished), prints a traceback or dies of a signal, or when the rerun does not complete with
all three targets, a folder holding exactly what its manifest lists (hashes checked), and
no staging left in OUT/.deploykit.

    python bench/interrupt.py --rounds 10 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "onnxruntime,openvino,tflite"


def env() -> dict[str, str]:
    plugins = [str(p) for p in sorted((ROOT / "plugins").glob("*")) if p.is_dir()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *plugins]), CI="1")


def command(work: Path) -> list[str]:
    return [sys.executable, "-m", "deploykit.cli", "build", str(work / "m.onnx"), "-t", TARGETS, "--calib",
            str(work / "c.npz"), "--method", "minmax", "--no-baseline", "--out", str(work / "out"),
            "--targets-file", str(work / "targets.toml")]


def verify(out: Path) -> str | None:
    """A complaint about a finished folder, or None."""
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and ".deploykit" not in p.relative_to(out).parts)
    if manifest["files"] != on_disk:
        return f"folder differs from manifest: {sorted(set(on_disk) ^ set(manifest['files']))[:4]}"
    names = [t["name"] for t in manifest["targets"]]
    if names != TARGETS.split(","):
        return f"targets {names}"
    for t in manifest["targets"]:
        if t["status"] not in ("ok", "skipped"):
            return f"target {t['name']}: {t['status']} {t['reason']}"
        for rel, digest in ((t.get("artifact") or {}).get("files") or {}).items():
            if hashlib.sha256((out / rel).read_bytes()).hexdigest() != digest:
                return f"hash mismatch: {rel}"
    state = sorted(os.listdir(out / ".deploykit"))
    if state != ["journal.json", "lock"]:
        return f"left in .deploykit: {state}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from deploykit.testing.tiny import tiny_classifier

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="dk-interrupt-") as tmp:
        work = Path(tmp)
        tiny_classifier(work / "m.onnx", size=32, classes=10)
        np.savez(work / "c.npz", x=np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32),
                 labels=np.arange(64) % 10)
        (work / "targets.toml").write_text("[defaults]\nruns = 20\nwarmup = 2\n")
        t0 = time.monotonic()
        full = subprocess.run(command(work), env=env(), capture_output=True, text=True)
        full_s = time.monotonic() - t0
        if full.returncode != 0:
            print(full.stderr[-3000:])
            return 2
        print(f"a full build takes {full_s:.1f} s (load {os.getloadavg()[0]:.1f}); interrupting at uniform "
              f"random points in [0.3 s, {full_s:.1f} s]")
        bad = 0
        for i in range(args.rounds):
            shutil.rmtree(work / "out", ignore_errors=True)
            at = rng.uniform(0.3, full_s)
            proc = subprocess.Popen(command(work), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(at)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            _, err1 = proc.communicate()
            stop_s = time.monotonic() - sent
            rerun = subprocess.run(command(work), env=env(), capture_output=True, text=True)
            kept = [line.split(":")[0] for line in rerun.stderr.splitlines() if "kept" in line]
            problems = []
            if proc.returncode not in (130, 0):
                problems.append(f"interrupted run exited {proc.returncode}")
            if "Traceback" in err1 or "Traceback" in rerun.stderr:
                problems.append("traceback")
            if rerun.returncode != 0:
                problems.append(f"rerun exited {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}")
            else:
                complaint = verify(work / "out")
                if complaint:
                    problems.append(complaint)
            bad += bool(problems)
            print(f"round {i + 1}: SIGINT at {at:5.1f} s -> exit {proc.returncode} after {stop_s:4.1f} s; rerun exit "
                  f"{rerun.returncode}, kept: {', '.join(kept) or 'nothing'}"
                  + (f"  MISBEHAVES: {'; '.join(problems)}" if problems else ""))
            if problems:  # where it went wrong: the last lines that are not traceback bodies
                tail = [line for line in err1.splitlines() if line and not line.startswith(" ")][-3:]
                print("    interrupted run's stderr: " + " / ".join(tail))
        print(f"\n{bad} of {args.rounds} rounds misbehave")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
