"""Figures for the benchmark-matrix issue (docs/matrix.md, the closing note).

    python bench/matrix_figures.py prepare [--dir D]          # real nets + data + spec (3 models)
    deploykit matrix D/real.toml --out D/real-out --db D/real.sqlite
    python bench/matrix_figures.py reruns --spec S -n 5       # rebuilt artifacts and compare's false alarms
    python bench/matrix_figures.py reruns --spec S --compare-only  # judge the stored reruns again
    python bench/matrix_figures.py slowdown --variant threads1 # a deliberate slowdown must be flagged
    python bench/matrix_figures.py resume --spec S            # kill half-way, rerun: nothing lost or duplicated

Everything is written under --dir (default ~/.cache/deploykit/matrix-figures), never into the
repository. Each command prints what it measured and the load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "deploykit" / "samples"


def _dir(args: argparse.Namespace) -> Path:
    d = Path(args.dir or Path.home() / ".cache" / "deploykit" / "matrix-figures")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _matrix(spec: Path, out: Path, db: Path, *extra: str) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "deploykit.cli", "matrix", str(spec), "--out", str(out), "--db", str(db),
                           "--json", *extra], capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    doc = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    if proc.returncode not in (0, 1):
        print(proc.stderr[-2000:], file=sys.stderr)
    return proc.returncode, doc, wall


def _compare(db: Path, a: int, b: int) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "deploykit.cli", "compare", str(a), str(b), "--db", str(db)],
                          capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout


def prepare(args: argparse.Namespace) -> None:
    from deploykit.testing import realnets

    d = _dir(args)
    cnn = realnets.efficientnet_lite0()
    enc = realnets.minilm()
    cnn_calib, cnn_eval = realnets.write_cnn_data(d / "cnn", calib=args.calib, eval=args.eval)
    enc_calib, enc_eval = realnets.write_encoder_data(d / "enc", calib=args.calib, eval=args.eval, seq_len=64)
    spec = d / "real.toml"
    spec.write_text(f"""# 3 models (2 CNNs, a transformer encoder) x 4 targets x batch 1, 8 x fp32/int8
[[models]]
name = "digits32_cnn"
path = "{SAMPLES / 'digits32_cnn.onnx'}"
calib = "{SAMPLES / 'digits32_calib.npz'}"
eval = "{SAMPLES / 'digits32_eval.npz'}"

[[models]]
name = "efficientnet_lite0"
path = "{cnn}"
calib = "{cnn_calib}"
eval = "{cnn_eval}"

[[models]]
name = "minilm_l6"
path = "{enc}"
calib = "{enc_calib}"
eval = "{enc_eval}"
task = "other"

[matrix]
targets = ["onnxruntime", "openvino", "tflite", "coreml"]
batch_sizes = [1, 8]
precisions = ["fp32", "int8"]
calib_samples = {args.calib}
eval_samples = {args.eval}
rounds = 3
""")
    print(f"wrote {spec}")


def reruns(args: argparse.Namespace) -> None:
    """N+1 runs of one unchanged matrix into one database, then ``deploykit compare`` on every
    pair of them: each flag is a false alarm (nothing changed). ``--compare-only`` judges the
    runs already in the database again (e.g. after a change to compare's noise model)."""
    d = _dir(args)
    out, db = d / "reruns-out", d / "reruns.sqlite"
    runs: list[int] = []
    if args.compare_only:
        with sqlite3.connect(db) as con:
            runs = [r[0] for r in con.execute("SELECT id FROM runs WHERE status = 'complete' ORDER BY id")]
    else:
        for _ in range(args.n + 1):
            code, doc, wall = _matrix(Path(args.spec), out, db, *args.extra)
            run = doc.get("run", {})
            runs.append(run.get("run_id"))
            print(f"run {run.get('run_id')}: exit {code}, {wall:.0f} s, rebuilt {run.get('rebuilt')}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    flagged_pairs, cells_flagged, cells_compared = 0, 0, 0
    consecutive = 0
    for a, b in itertools.combinations(runs, 2):
        proc = subprocess.run([sys.executable, "-m", "deploykit.cli", "compare", str(a), str(b), "--db", str(db),
                               "--json"], capture_output=True, text=True, check=False)
        doc = json.loads(proc.stdout)
        flags = [c for c in doc["changes"] if c["flags"]]
        measured = [c for c in doc["changes"] if c["status_a"] == c["status_b"] == "ok"]
        flagged_pairs += proc.returncode == 1
        consecutive += proc.returncode == 1 and runs.index(b) == runs.index(a) + 1
        cells_flagged += len(flags)
        cells_compared += len(measured)
        print(f"compare {a} -> {b}: exit {proc.returncode}; {len(flags)} of {len(measured)} cells flagged", flush=True)
        for c in flags:
            print(f"    {c['key']}: {'; '.join(c['flags'])}")
    pairs = len(runs) * (len(runs) - 1) // 2
    print(f"false alarms: {consecutive} of {len(runs) - 1} consecutive compares; {flagged_pairs} of {pairs} compares "
          f"over all pairs of runs; {cells_flagged} of {cells_compared} cell comparisons flagged")


def slowdown(args: argparse.Namespace) -> None:
    """A baseline run, then the same matrix (digits32 on onnxruntime and OpenVINO, batch 1 and 8)
    with a worse onnxruntime configuration through its targets file; compare must flag the
    second. OpenVINO's cells are the unchanged rest (a run where every cell got slower reads as
    the machine). Variants: threads1 (1 intra-op thread instead of 2: costs no CPU time),
    int8act (int8 activations instead of uint8), noopt (graph optimisations off: Q/DQ not fused)."""
    d = _dir(args)
    out, db = d / "slow-out", d / "slow.sqlite"
    db.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # scratch of an earlier run: start clean
    worse = {"threads1": ('threads = 2', 'threads = 1'),
             "int8act": ('activations = "uint8"', 'activations = "int8"'),
             "noopt": ('graph_optimization_level = "all"', 'graph_optimization_level = "disable"')}[args.variant]
    base = f'[targets.onnxruntime]\nbackend = "onnxruntime"\n[targets.onnxruntime.options]\n{worse[0]}\n'
    if args.variant != "threads1":
        base += "threads = 2\n"
    ids = []
    for name, targets in (("base", base), ("slow", base.replace(worse[0], worse[1]))):
        tf = d / f"targets-{name}.toml"
        tf.write_text(targets)
        spec = d / f"slow-{name}.toml"
        spec.write_text(f"""[[models]]
name = "digits32_cnn"
path = "{SAMPLES / 'digits32_cnn.onnx'}"
calib = "{SAMPLES / 'digits32_calib.npz'}"
eval = "{SAMPLES / 'digits32_eval.npz'}"

[matrix]
targets = ["onnxruntime", "openvino"]
targets_file = "{tf}"
batch_sizes = [1, 8]
rounds = 5
""")
        code, doc, wall = _matrix(spec, out / name, db)
        ids.append(doc.get("run", {}).get("run_id"))
        print(f"{name} ({args.variant}): run {ids[-1]} exit {code} in {wall:.0f} s, load {os.getloadavg()[0]:.1f}")
    code, text = _compare(db, ids[0], ids[1])
    print(text)
    print(f"compare exit {code}")


def resume(args: argparse.Namespace) -> None:
    d = _dir(args)
    out, db = d / "resume-out", d / "resume.sqlite"
    for p in (db,):
        p.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)

    def stored() -> int:  # cells journaled and stored so far (the history gets each cell right after its step)
        try:
            with sqlite3.connect(db, timeout=1) as con:
                return int(con.execute("SELECT COUNT(*) FROM cells").fetchone()[0])
        except sqlite3.Error:
            return 0

    proc = subprocess.Popen([sys.executable, "-m", "deploykit.cli", "matrix", args.spec, "--out", str(out), "--db",
                             str(db), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = args.total
    while proc.poll() is None:
        if stored() >= total // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    print(f"killed (SIGKILL) with {stored()} of {total} cells stored")
    code, doc, wall = _matrix(Path(args.spec), out, db)
    run = doc.get("run", {})
    con = sqlite3.connect(db)
    rows = con.execute("SELECT run_id, COUNT(*), COUNT(DISTINCT key) FROM cells GROUP BY run_id").fetchall()
    runs = con.execute("SELECT id, status FROM runs").fetchall()
    print(f"rerun: exit {code} in {wall:.0f} s, run {run.get('run_id')}, resumed {run.get('resumed')}, "
          f"cells in output {len(doc.get('cells', []))}")
    print(f"database: runs {runs}; cells per run (rows, distinct keys) {rows}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--eval", type=int, default=128)
    p = sub.add_parser("reruns")
    p.add_argument("--spec", required=True)
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--compare-only", action="store_true", help="judge the runs already in the database again")
    p.add_argument("extra", nargs="*", help="extra flags for deploykit matrix, after --")
    p = sub.add_parser("slowdown")
    p.add_argument("--variant", choices=["threads1", "int8act", "noopt"], default="noopt")
    p = sub.add_parser("resume")
    p.add_argument("--spec", required=True)
    p.add_argument("--total", type=int, required=True, help="cells in the matrix")
    args = ap.parse_args()
    {"prepare": prepare, "reruns": reruns, "slowdown": slowdown, "resume": resume}[args.cmd](args)


if __name__ == "__main__":
    main()
