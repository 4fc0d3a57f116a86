"""Peak memory of a build from a compressed .npz with --samples 64.

A 1.2 GB array (2,000 images of 3x224x224 float32) compresses to a few MB; reading it whole
costs its raw size in RAM. Measures the peak RSS of ``deploykit build`` in a fresh process per
round, for this checkout and optionally another one (``--before DIR``, e.g. an earlier commit
unpacked with ``git archive``), interleaved.

    python bench/npz_memory.py --rounds 2 [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit")) / "bench-npz-memory"
N, SIZE = 2000, 224

_RUN = """
import resource, sys
from deploykit.cli import main
code = main(sys.argv[1:])
print("RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "EXIT", code)
"""


def write_npz(path: Path) -> None:
    """Stream a compressible [N, 3, 224, 224] float32 array into an .npz without holding it."""
    shape = (N, 3, SIZE, SIZE)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for i in range(N):
                img = np.stack([xx * (i % 7), yy * (i % 5), (xx + yy) * 0.5]).astype(np.float32)
                fh.write(img.tobytes())


def pythonpath(root: Path) -> str:
    plugins = [str(p) for p in sorted((root / "plugins").glob("*")) if p.is_dir()]
    return os.pathsep.join([str(root), *plugins])


def measure(root: Path, model: Path, data: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="dk-npzmem-") as out:
        env = dict(os.environ, PYTHONPATH=pythonpath(root), CI="1")
        args = ["build", str(model), "--target", "onnxruntime", "--calib", str(data), "--samples", "64",
                "--eval-samples", "64", "--method", "minmax", "--no-baseline", "--out", str(Path(out) / "o")]
        proc = subprocess.run([sys.executable, "-c", _RUN, *args], env=env, capture_output=True, text=True, cwd=out)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RSS_MB")), None)
        if line is None:
            raise SystemExit(f"build failed under {root}:\n{proc.stderr[-2000:]}")
        _, rss, _, code = line.split()
        if code not in ("0", "1"):  # 1: a check failed its threshold, the build itself ran
            raise SystemExit(f"build exited {code} under {root}:\n{proc.stderr[-2000:]}")
        return float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", type=Path, help="another checkout to compare against (e.g. the commit before)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from deploykit.testing.tiny import tiny_classifier

    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "big.npz"
    if not data.exists():
        write_npz(data)
    model = tiny_classifier(CACHE / "tiny224.onnx", size=SIZE)
    contenders = {"after (this checkout)": ROOT}
    if args.before:
        contenders = {"before": args.before.resolve(), **contenders}
    peaks: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, root in contenders.items():
            peaks[name].append(measure(root, model, data))
    raw_mb = N * 3 * SIZE * SIZE * 4 / 2**20
    print(f"data: {data} ({raw_mb:,.0f} MB raw, {data.stat().st_size / 2**20:.1f} MB on disk), --samples 64, "
          f"--eval-samples 64, load {os.getloadavg()[0]:.2f}")
    for name, values in peaks.items():
        print(f"{name:<22} peak RSS median {np.median(values):7.0f} MB  (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    print(json.dumps({k: float(np.median(v)) for k, v in peaks.items()}))


if __name__ == "__main__":
    main()
